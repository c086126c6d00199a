"""Maps the top-level folders onto the `walle` import namespace.

`walle` is an implicit namespace package: the repository root has no `walle/` folder and none of
the mapped folders has an `__init__.py` at its top, so running Python from the root never shadows
the standard library's `platform` module (numpy, GitPython, faiss and MNN all import it).
Declarative `package-dir` cannot add the `walle.` prefix to discovered subpackages, hence this file.
"""
import os

from setuptools import setup

FOLDERS = {"platform": "walle.platform", "device_host": "walle.device_host",
           "protos": "walle.protos", "tasks": "walle.tasks"}


def _packages():
    mapping = {}
    for folder, name in FOLDERS.items():
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
            rel = os.path.relpath(root, folder)
            pkg = name if rel == "." else name + "." + rel.replace(os.sep, ".")
            mapping[pkg] = root
    return mapping


PACKAGES = _packages()
setup(
    packages=sorted(PACKAGES),
    package_dir=PACKAGES,
    package_data={pkg: ["*.proto", "*.toml", "*.md", "*.json", "*.txt", "*.html", "*.js", "*.css"] for pkg in PACKAGES},
    include_package_data=True,
)
