"""Runs one training command of `hf-gemact sweep` and takes its whole process tree down with the sweep.

    python -I .../hf_gemact/_child_guard.py SWEEP_PID -- COMMAND [ARGS...]

The sweep starts every run through this small process, which
* asks the kernel for SIGTERM when the sweep dies, however it dies, `kill -9` included
  (Linux PR_SET_PDEATHSIG), and gives up at once if the sweep is already gone;
* becomes a child subreaper (Linux PR_SET_CHILD_SUBREAPER): what the command leaves behind when an
  intermediate parent dies (`accelerate launch` -> torchrun workers, which run in sessions of
  their own) is re-parented here rather than to init, so it stays a findable descendant;
* on SIGTERM, SIGINT or SIGHUP, and also when the command exits, sends SIGTERM to every
  descendant and to the command's process group, and SIGKILL to whatever is left after a grace
  period; it exits with the command's status (128 + N for signal N).

Standard library only, and started by path with `python -I`, so that it needs milliseconds and
no import of hf_gemact (which imports torch). Without /proc and prctl (macOS) it still stops the
command's process group when it is signalled, but cannot notice a `kill -9` of the sweep.
"""

import ctypes
import os
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
GRACE_S = 10.0  # between SIGTERM and SIGKILL: time for a training process to die on its own
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _Stop(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum, frame):
    raise _Stop(signum)


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def _spawn(command: list) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            for signum in STOP_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            os.setpgid(0, 0)  # its own group, so that killpg reaches it where /proc does not exist
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # should this guard itself be killed -9
            os.execvp(command[0], command)
        except BaseException as err:  # noqa: BLE001 - whatever happened, the forked copy must not go on
            os.write(2, f"hf-gemact sweep: cannot start {command[0]}: {err}\n".encode())
        os._exit(127)
    try:
        os.setpgid(pid, pid)  # also here: killpg must work even before the child ran setpgid itself
    except OSError:
        pass  # it already exec'd (and set its group)
    return pid


def _wait_for(pid: int) -> int:
    while True:
        reaped, status = os.waitpid(-1, 0)  # a subreaper reaps the orphans it inherits too
        if reaped == pid:
            return status


def _reap_exited() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _descendants(root: int) -> list:
    """Live (non-zombie) descendants of `root`, read from /proc; empty without /proc."""
    children = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        # fields after the command name, which may itself hold spaces and parentheses
        state, ppid = stat[stat.rindex(b")") + 2:].split()[:2]
        children.setdefault(int(ppid), []).append((int(name), state))
    found, todo = [], [root]
    while todo:
        for pid, state in children.get(todo.pop(), ()):
            todo.append(pid)
            if state != b"Z":
                found.append(pid)
    return found


def _group_alive(pgid) -> bool:
    if pgid is None:
        return False
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _signal(pids, pgid, signum) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    if pgid is not None:
        try:
            os.killpg(pgid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def stop_tree(pgid, grace_s: float = GRACE_S) -> None:
    """SIGTERM every descendant (each once, as it is found), SIGKILL those left after grace_s."""
    terminated, group_terminated = set(), False
    deadline = time.monotonic() + grace_s
    while True:
        _reap_exited()
        alive = _descendants(os.getpid())
        if not alive and not _group_alive(pgid):
            return
        if time.monotonic() > deadline:
            _signal(alive, pgid, signal.SIGKILL)
        else:
            fresh = [pid for pid in alive if pid not in terminated]
            _signal(fresh, None if group_terminated else pgid, signal.SIGTERM)
            terminated.update(fresh)
            group_terminated = True
        time.sleep(0.05)


def main(argv: list) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: _child_guard.py SWEEP_PID -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    sweep_pid, command = int(argv[1]), argv[3:]
    pgid, code = None, 0
    try:
        for signum in STOP_SIGNALS:
            signal.signal(signum, _raise_stop)
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != sweep_pid:  # the sweep died before the kernel was told to watch it
            return 128 + signal.SIGTERM
        pgid = _spawn(command)
        status = _wait_for(pgid)
        code = os.waitstatus_to_exitcode(status)
        code = 128 - code if code < 0 else code
    except _Stop as stop:
        code = 128 + stop.signum
        print(f"hf-gemact sweep: run stopped ({signal.Signals(stop.signum).name}: the sweep was stopped)",
              file=sys.stderr, flush=True)
    for signum in STOP_SIGNALS:  # nothing may interrupt the clean-up below
        signal.signal(signum, signal.SIG_IGN)
    stop_tree(pgid)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
