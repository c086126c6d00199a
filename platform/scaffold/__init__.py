"""`walle task new NAME`: a new task folder from the template beside this file (task.toml, main.py,
storage.json: a schedule trigger, an event trigger, storage and a log line), ready to submit."""
from __future__ import annotations

import importlib.resources
import pathlib
import re

from ..errors import AlreadyExists, InvalidArgument
from ..manifest import NAME_RE

TEMPLATE_FILES = ("task.toml", "main.py", "storage.json")


def new_task(name: str, parent: str | pathlib.Path = ".") -> pathlib.Path:
    """Write PARENT/NAME/ from the template; refuses an existing folder."""
    if not NAME_RE.match(name or ""):
        raise InvalidArgument(f"task name {name!r}: a lowercase letter followed by up to 63 of a-z 0-9 _ -")
    dest = pathlib.Path(parent) / name
    if dest.exists():
        raise AlreadyExists(f"{dest} already exists; choose another name or folder")
    namespace = re.sub(r"[-_]+", "_", name).strip("_")
    template = importlib.resources.files(__package__) / "template"
    dest.mkdir(parents=True)
    for fname in TEMPLATE_FILES:
        text = (template / fname).read_text()
        (dest / fname).write_text(text.replace("{{name}}", name).replace("{{namespace}}", namespace))
    return dest
