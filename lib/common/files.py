"""Every output file of the toolkit is written here: atomically and with the umask's mode.

An output is written under a unique temporary name beside its target (same folder, so the
rename cannot cross file systems), flushed and fsync'ed, given the mode a plain ``open()``
would give (``0o666 & ~umask``: ``tempfile.mkstemp`` alone leaves 0600), then renamed over
the target. A reader never sees a half-written file; a killed writer leaves at most a hidden
``.NAME.*.partial`` file, never a truncated output.

The output guard (:func:`check_not_inside`) keeps outputs out of the folders that hold inputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import OutputError

_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process umask, read anew on every call (a job may change it).

    Linux shows it in /proc/self/status without changing it; elsewhere it is read by setting and
    restoring it under a lock (threads of this module never see the temporary value).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        current = os.umask(0o022)
        os.umask(current)
        return current


def file_mode() -> int:
    """Mode of a new regular file under the umask: ``0o666 & ~umask`` (0644 with umask 022)."""
    return 0o666 & ~umask()


def folder_mode() -> int:
    """Mode of a new folder under the umask: ``0o777 & ~umask`` (0755 with umask 022)."""
    return 0o777 & ~umask()


def temporary_beside(path: Path, suffix: str = "") -> Path:
    """A new, empty, uniquely named hidden file beside ``path`` (closed; the caller fills it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{suffix}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not sync folders; the rename is still atomic
    finally:
        os.close(fd)


def commit(tmp: Path, path: Path) -> Path:
    """Move a finished temporary file onto ``path``: fsync, mode from the umask, rename."""
    _fsync_file(tmp)
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)
    _fsync_folder(path.parent)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write into; on success it becomes ``path``.

    ``suffix`` (default: ``path``'s own, e.g. ``.tif``) ends the temporary name, for writers
    that choose the format by extension. On an exception the temporary file is removed and
    ``path`` is left as it was.
    """
    path = Path(path)
    tmp = temporary_beside(path, path.suffix if suffix is None else suffix)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_with(path: str | os.PathLike, writer: Callable[[Path], Any], suffix: str | None = None) -> Path:
    """Write ``path`` atomically by calling ``writer(temporary_path)``; return ``path``."""
    path = Path(path)
    with atomic_path(path, suffix) as tmp:
        writer(tmp)
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return write_with(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=2) + "\n")


def make_folder(path: str | os.PathLike) -> Path:
    """Create ``path`` and its parents (modes from the umask); return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (symbolic links resolved)."""
    path, folder = _resolved(path), _resolved(folder)
    return path == folder or folder in path.parents


def check_not_inside(output: str | os.PathLike, inputs: dict[str, str | os.PathLike | None],
                     output_name: str = "output_folder") -> None:
    """Raise :class:`OutputError` when ``output`` is, holds or lies inside an input folder.

    ``inputs`` maps flag names (``"mask_folder"``) to folders; ``None`` entries are skipped.
    Writing there could replace the user's inputs (a predicted ``KEY.tif`` over the mask
    ``KEY.tif``).
    """
    problems = []
    for name, folder in inputs.items():
        if folder is None:
            continue
        if is_inside(output, folder) or is_inside(folder, output):
            problems.append(f"{output_name} must not be, contain or lie inside --{name}; got {str(output)!r} and "
                            f"{str(folder)!r}")
    if problems:
        raise OutputError("\n".join(problems) + ". Outputs could replace your inputs there: choose a new folder")
