"""Where the shared benchmark data lives: $SOFTTHOUGHT_SHARED_DATA, else ../shared/data beside the repo."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    path = Path(os.environ.get("SOFTTHOUGHT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        raise FileNotFoundError(f"benchmark data not found at {path}; set SOFTTHOUGHT_SHARED_DATA")
    return path
