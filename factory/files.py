"""The project's one atomic writer: a file is complete or absent, never half-written.

`atomic_write(path, write)` calls write(binary file) on a temp file beside `path`
(`.<name>.<random>.tmp`, same directory so the rename stays on one file system), fsyncs
it, renames it over `path` and fsyncs the directory. Any failure (disk full, I/O error, a
writer library's own error) removes the temp file and becomes one WriteError line.
`write_temp` + `os.replace` are exposed for callers that commit several files in an order
(factory/export.py: manifest, then data).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


class WriteError(ValueError):
    pass


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it: set and restore
    os.umask(mask)
    return mask


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def write_temp(path: Path, write, error: type[WriteError] = WriteError) -> Path:
    """write(binary file) into a new fsynced temp file beside `path`; returns the temp file."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode open() would give it
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        return tmp
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise error(f"cannot write {path}: {e.strerror or _first_line(e)}") from None
        if type(e).__module__.split(".")[0] in ("polars", "pyarrow", "safetensors") or isinstance(e, RuntimeError):
            # polars reports a full disk as its own ComputeError / a RuntimeError, not OSError
            raise error(f"cannot write {path}: {_first_line(e)}") from None
        raise


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace(tmp: Path, path: Path, error: type[WriteError] = WriteError) -> None:
    try:
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise error(f"cannot write {path}: {e.strerror or _first_line(e)}") from None


def atomic_write(path: str | Path, write, error: type[WriteError] = WriteError) -> Path:
    path = Path(path)
    tmp = write_temp(path, write, error)
    replace(tmp, path, error)
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, error: type[WriteError] = WriteError) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()), error)


def stale_temps(path: str | Path) -> list[Path]:
    """Temp files that a killed atomic write of `path` left behind."""
    path = Path(path)
    return list(path.parent.glob(f".{path.name}.*.tmp"))
