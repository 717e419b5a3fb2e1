"""Small file helpers: writes that never leave a half-written file behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from hwprune.errors import HwpruneError


def atomic_write(path: str | Path, writer: Callable[[BinaryIO], object]) -> Path:
    """Call ``writer(f)`` on a temporary file beside ``path``, then rename it over ``path``.

    For writers that need a binary file object (``torch.save``, ``np.savez``): the file is
    flushed and synced before the rename; on any error the temporary file is removed and
    ``path`` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    except OSError as e:
        raise HwpruneError(f"cannot write '{path}': {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def check_writable(path: str | Path) -> Path:
    """Fail early, with one line, when ``path`` cannot be created."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HwpruneError(f"cannot create directory '{parent}' for '{path}': {e.strerror}") from None
    if path.is_dir():
        raise HwpruneError(f"output path '{path}' is a directory")
    if not os.access(parent, os.W_OK):
        raise HwpruneError(f"output directory '{parent}' is not writable")
    return path


def read_json(path: str | Path, what: str = "JSON"):
    """Parse a JSON file, or raise a one-line :class:`HwpruneError` naming it."""
    import json

    p = Path(path)
    if not p.is_file():
        raise HwpruneError(f"{what} file '{p}' does not exist")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HwpruneError(f"{what} file '{p}' is not valid JSON: {getattr(e, 'msg', e)}") from None
