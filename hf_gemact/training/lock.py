"""One writer per output directory: an exclusive `flock` on OUTPUT_DIR/.lock held for the whole run.

Two runs writing into one folder interleave checkpoints and logs (one deletes the other's
`.tmp-step_N` mid-save), so a training run takes this lock before it touches the folder and the
second writer stops at once with the holder's pid. The kernel drops a flock when its holder dies,
however it dies, so a killed run never leaves a stale lock behind; the file itself is removed on
release and only names the holder (its content is informative, never trusted for exclusion).

POSIX only (fcntl); where fcntl is missing (Windows) runs are not locked.
"""

from __future__ import annotations

import os
import socket
import time
import weakref
from pathlib import Path

from .args import UsageError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".lock"

# The locks this process holds, by lock-file path. A process runs one training at a time (accelerate's
# state is a per-process singleton), so a lock still held here belongs to an earlier caller in this
# process that never released it (training.run releases in a finally): taking it over is safe.
_held: "weakref.WeakValueDictionary[str, RunLock]" = weakref.WeakValueDictionary()


class RunLockedError(UsageError):
    """Another process is writing into the output directory."""


class RunLock:
    """A held lock; released (and its file removed) by `release()`, `with`, or garbage collection.
    A folder that `acquire` created and that is still empty goes with it: a run that stops on bad
    input leaves nothing behind."""

    def __init__(self, path: Path, fd: int, remove_empty_dir: bool = False):
        self.path, self._fd, self._remove_empty_dir = path, fd, remove_empty_dir
        self._key = _key(path)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # Remove the file while still holding the lock, and only if it is still ours: a
            # waiter that opened it meanwhile sees the unlinked inode when it re-checks (acquire).
            if _same_file(fd, self.path):
                self.path.unlink()
                if self._remove_empty_dir:
                    self.path.parent.rmdir()  # fails, as it should, once the run has written anything
        except OSError:
            pass
        finally:
            _held.pop(self._key, None)
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:  # interpreter shutdown: the kernel drops the lock with the process anyway
            pass


def _key(path: Path) -> str:
    return os.path.realpath(path)  # one entry per folder, however its path is spelled


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _describe_holder(path: Path) -> str:
    try:
        first_line = path.read_text().partition("\n")[0].strip()
    except OSError:
        first_line = ""
    return first_line or "a process that has not written its pid yet"


def _try_lock(fd: int, attempts: int = 5) -> bool:
    # A few tries: `holder()` takes a shared lock for an instant, which must not fail a writer.
    for attempt in range(attempts):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < attempts:
                time.sleep(0.1)
    return False


def acquire(output_dir, command: str | None = None) -> RunLock | None:
    """Lock `output_dir` (created if missing) for this process, or raise RunLockedError naming the
    directory and the holder. Returns None where file locking is unavailable."""
    if fcntl is None:  # pragma: no cover
        return None
    out = Path(output_dir)
    path = out / LOCK_NAME
    stale = _held.get(_key(path))
    if stale is not None:
        stale.release()
    created = not out.exists()
    while True:
        out.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # an empty folder was removed by its previous holder meanwhile
            continue
        if not _try_lock(fd):
            os.close(fd)
            raise RunLockedError(f"--output_dir {out} is being written by another run "
                                 f"({_describe_holder(path)}); wait for it to end or stop it")
        if _same_file(fd, path):
            break
        os.close(fd)  # the previous holder removed the file between our open and our lock: retry
    # first line: who (shown in errors); second: the command, for whoever reads the file
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n{command or ''}\n".encode())
    lock = RunLock(path, fd, remove_empty_dir=created)
    _held[_key(path)] = lock
    return lock


def holder(output_dir) -> str | None:
    """Who holds `output_dir`'s lock ('pid N on HOST'), or None when nobody does."""
    if fcntl is None:  # pragma: no cover
        return None
    path = Path(output_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        # A shared lock conflicts with a writer's exclusive one and not with other lookers.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe_holder(path)
    finally:
        os.close(fd)
    return None


def acquire_for_run(accelerator, output_dir, command: str) -> RunLock | None:
    """The training loop's lock: taken by the main process; every process raises the same
    RunLockedError when it is taken, so no rank is left waiting at a barrier."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = acquire(output_dir, command)
        except RunLockedError as err:
            error = str(err)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error is not None:
        raise RunLockedError(error)
    return lock
