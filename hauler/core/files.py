"""Small files written whole: a reader (or a restart after a crash) sees the old file or the
new one, never a part."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def replace_json(path: Path, value: Any) -> None:
    """Write `value` as JSON to a temporary file beside `path`, then rename it over `path`.
    Not fsynced: what these files name is checked again when it is read."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value))
    os.replace(temporary, path)
