"""Files autofit writes when its work is done (a plan, a picture, an accelerate config): checked before the
work starts, so that a search or a training run does not end in a missing folder."""

from __future__ import annotations

import os
from pathlib import Path


def unwritable_reason(path: Path) -> str | None:
    """Why a file cannot be written at `path` (a folder there, no parent folder, no permission), or None."""
    if path.is_dir():
        return "it is a folder"
    if not path.parent.is_dir():
        return f"the folder {path.parent} does not exist"
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return "permission denied"
    return None
