"""Safe file writing shared by every writer: an OS file lock, verified atomic writes, OS reasons.

* ``file_lock(path, timeout)``: an exclusive OS lock (``fcntl.flock`` on POSIX, ``msvcrt.locking``
  on Windows) on a small lock file, re-entrant within one process (threads wait for each other).
  The OS drops it when the holder dies (kill -9 included), so a stale lock file is harmless (it
  stays empty, so a store's bytes do not depend on who wrote it).  After ``timeout`` seconds
  (``$WLS_LOCK_TIMEOUT``, default 120) an InputError names the lock file.
* ``atomic_write_bytes(path, data)``: temp file beside ``path``, fsync, read back and compared,
  rename; a failure never replaces ``path`` and leaves no temp file.
* ``check_written(tmp, target, expected_size=None)``: the check every writer runs on its temp file
  before the rename (not empty, at least ``expected_size`` bytes); ``os_reason`` words an OSError,
  ``short_write_reason`` a write that failed without one (a full disk with a library that does not
  check its writes).
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError

LOCK_TIMEOUT_ENV = "WLS_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 120.0


class _Held:
    def __init__(self):
        self.rlock = threading.RLock()
        self.depth = 0
        self.fd = None


_HELD: dict = {}
_REGISTRY_LOCK = threading.Lock()


def lock_timeout(timeout=None) -> float:
    if timeout is not None:
        return float(timeout)
    raw = os.environ.get(LOCK_TIMEOUT_ENV)
    if raw:
        try:
            return max(0.0, float(raw))
        except ValueError:
            raise InputError(f"${LOCK_TIMEOUT_ENV}: expected a number of seconds, got {raw!r}") from None
    return DEFAULT_LOCK_TIMEOUT


def _try_lock(fd) -> bool:
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


def _unlock(fd) -> None:
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        except OSError:
            pass
        return
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_UN)


@contextmanager
def file_lock(path, timeout=None, what: str = "this dataset"):
    """Hold an exclusive lock on the file ``path`` (created if needed) for the ``with`` block."""
    path = Path(path)
    timeout = lock_timeout(timeout)
    key = os.path.normcase(os.path.abspath(path))
    with _REGISTRY_LOCK:
        held = _HELD.setdefault(key, _Held())
    busy = (f"{path}: another process is writing to {what} and did not finish within "
            f"{timeout:g} s; try again when it has finished (${LOCK_TIMEOUT_ENV} sets the wait)")
    if not held.rlock.acquire(timeout=timeout if timeout > 0 else 0.001):
        raise InputError(busy)
    try:
        if held.depth == 0:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise InputError(f"{path}: cannot create the lock file ({os_reason(exc)})") from None
            deadline = time.monotonic() + timeout
            delay = 0.005
            while not _try_lock(fd):
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise InputError(busy)
                time.sleep(delay)
                delay = min(0.1, delay * 1.5)
            held.fd = fd
        held.depth += 1
    except BaseException:
        held.rlock.release()
        raise
    try:
        yield path
    finally:
        held.depth -= 1
        if held.depth == 0:
            fd, held.fd = held.fd, None
            try:
                _unlock(fd)
            finally:
                os.close(fd)
        held.rlock.release()


# ----------------------------------------------------------------------------- verified writes


def os_reason(exc: BaseException) -> str:
    """The OS's own words for an error: ``No space left on device`` (ENOSPC), ``Not a directory``..."""
    if isinstance(exc, OSError) and exc.strerror:
        name = errno.errorcode.get(exc.errno, "")
        return f"{exc.strerror}{f' [{name}]' if name else ''}"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__).replace("sitk::ERROR: ", "")


def short_write_reason(folder, written: int, expected=None) -> str:
    """Why a written file came out short although no error was raised (a full disk, usually)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    size = f"{written} of {expected} bytes" if expected is not None else f"{written} bytes"
    disk = f"; {free} bytes free on the device: disk full?" if free is not None else ""
    return f"the written file is incomplete ({size}){disk}"


def check_written(tmp: Path, expected_size=None) -> None:
    """OSError when the temp file is missing, empty or shorter than ``expected_size`` bytes."""
    try:
        size = os.path.getsize(tmp)
    except OSError as exc:
        raise OSError(exc.errno, f"the written file vanished ({os_reason(exc)})") from None
    if size == 0 or (expected_size is not None and size < expected_size):
        raise OSError(errno.EIO, short_write_reason(Path(tmp).parent, size, expected_size))


def fsync_file(path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(folder) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform / file system
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: Path, suffix: str = "") -> Path:
    """Hidden temp name beside ``path`` (same folder, so the rename is atomic)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")


def make_parent(path: Path, what: str = "file") -> None:
    """Create ``path``'s folder; InputError naming it when that is impossible (a file in the way...)."""
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in [parent, *parent.parents] if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker is not None else os_reason(exc)
        raise InputError(f"{path}: cannot write the {what} ({why})") from None


def replace_verified(path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync, read back and compare, rename over
    ``path``; OSError (and no temp file left, ``path`` untouched) on any failure."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        check_written(tmp, len(data))
        with open(tmp, "rb") as fh:
            if fh.read() != data:
                raise OSError(errno.EIO, "the written file reads back different from what was written")
        os.replace(tmp, path)
    finally:
        try:
            tmp.unlink()
        except OSError:
            pass
    fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes, what: str = "file") -> None:
    """``replace_verified`` with an InputError naming the path and the OS reason: a crash or a full
    disk leaves either the old file or the new one, whole."""
    path = Path(path)
    make_parent(path, what)
    try:
        replace_verified(path, data)
    except OSError as exc:
        raise InputError(f"{path}: cannot write the {what} ({os_reason(exc)}); "
                         f"{'the previous one is unchanged' if path.exists() else 'nothing was written'}") from None
