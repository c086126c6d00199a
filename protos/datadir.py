"""Data folders (the platform's, a device's) hold private keys, tokens and databases: each gets a
`.gitignore` that ignores everything in it, so creating one inside a git checkout cannot leak them."""
from __future__ import annotations

import os
import pathlib

GITIGNORE = "# A walle data folder: private keys, credentials and databases. Never commit it.\n*\n"


def keep_out_of_git(folder: str | os.PathLike) -> pathlib.Path:
    """Write `<folder>/.gitignore` ignoring the whole folder (kept if it is already there)."""
    path = pathlib.Path(folder) / ".gitignore"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(GITIGNORE)
    return path
