"""normlab's cache folder: decoded image arrays, the memory-format probe's choices, the compiled CPU kernel."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$NORMLAB_CACHE``, else ``~/.cache/normlab``."""
    return Path(os.path.expanduser(os.environ.get("NORMLAB_CACHE", "~/.cache/normlab")))
