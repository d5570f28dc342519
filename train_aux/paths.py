"""Where the shared benchmark data lives ($SOFTTHOUGHT_SHARED_DATA, else ../shared/data beside the repo), and where a
Ray worker reads relative paths from."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    path = Path(os.environ.get("SOFTTHOUGHT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        raise FileNotFoundError(f"benchmark data not found at {path}; set SOFTTHOUGHT_SHARED_DATA")
    return path


def enter_driver_cwd(cwd: str) -> None:
    """On a Ray worker: relative paths (data, out, checkpoints) mean what they meant to the driver, when the worker
    shares its file system (on another node the directory may not exist, and paths must then be absolute)."""
    if Path(cwd).is_dir():
        os.chdir(cwd)
