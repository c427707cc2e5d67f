"""The runs of a sweep: each one's result (its metrics.json read into a table row) and its process
(started through `_child_guard.py`, resumed from its last checkpoint, stopped with the sweep).
`sweep.py` plans the grid, runs it with `execute` and writes the tables."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from .training import lock
from .training.task_table import TASKS as _TASK_TABLE

# the metric each paper reports: GPT-2 perplexity, BERT validation loss, ViT accuracy
PRIMARY_METRIC = {name: info.primary_metric for name, info in _TASK_TABLE.items()}
GUARD = Path(__file__).with_name("_child_guard.py")
POLL_S = 0.2


class UnreadableResult(ValueError):
    """A metrics.json that exists but cannot be used; the message names the file."""


class SweepInterrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@dataclass
class Run:
    activation: str
    seed: int
    output_dir: Path

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.json"

    @property
    def label(self) -> str:
        return f"{self.activation} seed {self.seed}"


def say(message: str) -> None:
    print(message, flush=True)  # at once: a killed sweep's last lines are the ones that matter


# ----------------------------------------------------------------------------- results of one run


def read_result(run: Run) -> dict | None:
    """The run's metrics.json, checked for what the tables use; None when there is none yet.
    Raises UnreadableResult naming the file when it cannot be used."""
    path = run.metrics_path
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        problem = "the file is empty" if not path.stat().st_size else f"not valid JSON ({err})"
        raise UnreadableResult(f"{path} is unreadable: {problem}") from None
    if not isinstance(metrics, dict):
        raise UnreadableResult(f"{path} is unreadable: not a JSON object")
    metric = PRIMARY_METRIC.get(metrics.get("task"), "loss")
    for part in ("final", "best"):
        value = metrics.get(part, {}).get(metric) if isinstance(metrics.get(part), dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UnreadableResult(f"{path} is unreadable: no number at {part}.{metric}")
    return metrics


def is_diverged(final, best) -> bool:
    return not (math.isfinite(final) and math.isfinite(best))


def run_row(run: Run, metrics: dict | None = None) -> dict:
    m = read_result(run) if metrics is None else metrics
    if m is None:
        raise UnreadableResult(f"{run.metrics_path} does not exist")
    metric = PRIMARY_METRIC.get(m.get("task"), "loss")
    speed_key = next((k for k in m if k.endswith("_per_s")), None)
    final, best = float(m["final"][metric]), float(m["best"][metric])
    sparsity = m.get("activation_sparsity") if isinstance(m.get("activation_sparsity"), dict) else {}
    return {
        "activation": run.activation,
        "seed": run.seed,
        "metric": metric,
        "status": "diverged" if is_diverged(final, best) else "finished",
        "final": final,
        "best": best,
        "throughput": m.get(speed_key),
        "throughput_unit": speed_key.replace("_per_s", "/s") if speed_key else "",
        "steps": m.get("steps"),
        "wall_time_s": m.get("wall_time_s"),
        "zero_fraction": _number_or_none(sparsity.get("zero_fraction")),
        "near_zero_fraction": _number_or_none(sparsity.get("near_zero_fraction")),
        "near_zero_threshold": _number_or_none(sparsity.get("near_zero_threshold")),
        "output_dir": str(run.output_dir),
    }


def _number_or_none(value):
    """Runs written before the sparsity column (or of models without MLP sites) have none."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _has_checkpoint(run_dir: Path) -> bool:
    from .training.checkpoint import list_checkpoints

    return bool(list_checkpoints(run_dir))


def command_for(run: Run, command: list, script_args: list) -> list:
    cmd = [*command, *script_args, "--activation", run.activation, "--seed", str(run.seed),
           "--output_dir", str(run.output_dir)]
    if _has_checkpoint(run.output_dir):
        cmd += ["--resume_from_checkpoint", "latest"]
    elif run.output_dir.is_dir() and any(run.output_dir.iterdir()):
        cmd += ["--overwrite_output_dir"]  # a run that died before its first checkpoint starts afresh
    return cmd


# ----------------------------------------------------------------------------- running the grid


@dataclass
class _Active:
    run: Run
    proc: subprocess.Popen
    log_file: object


def _needs_run(run: Run, log) -> bool:
    """False for a run that is done; sets an unreadable metrics.json aside (the run is needed)."""
    try:
        metrics = read_result(run)
    except UnreadableResult as err:
        kept = run.metrics_path.with_name("metrics.json.unreadable")
        os.replace(run.metrics_path, kept)
        log(f"[sweep] {err}; kept as {kept}, running {run.label} again")
        return True
    if metrics is None:
        return True
    status = run_row(run, metrics)["status"]
    log(f"[sweep] skip {status} {run.output_dir}")
    return False


def _start(run: Run, command: list, script_args: list, device, log) -> _Active:
    env = dict(os.environ)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(device)
    cmd = command_for(run, command, script_args)
    run.output_dir.mkdir(parents=True, exist_ok=True)
    log(f"[sweep] run {run.label}: {' '.join(cmd)}")
    log_file = open(run.output_dir.parent / f"seed{run.seed}.log", "a")
    guarded = [sys.executable, "-I", str(GUARD), str(os.getpid()), "--", *cmd] if os.name == "posix" else cmd
    # Its own session: a terminal's Ctrl-C reaches the sweep, which then stops each run in order.
    proc = subprocess.Popen(guarded, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                            stderr=subprocess.STDOUT, start_new_session=os.name == "posix")
    return _Active(run, proc, log_file)


def _outcome(active: _Active) -> str | None:
    """None when the run finished with a readable metrics.json, else what went wrong."""
    run, code = active.run, active.proc.returncode
    holder = lock.holder(run.output_dir)
    if holder is not None:
        return f"{run.output_dir} is being written by another run ({holder})"
    try:
        metrics = read_result(run)
    except UnreadableResult as err:
        return f"exit {code}; {err}"
    if code == 0 and metrics is not None:
        return None
    return f"exit {code}; see {active.log_file.name}"


def _stop_all(active: dict, log) -> None:
    for a in active.values():
        a.proc.send_signal(signal.SIGTERM)  # the guard stops the run's whole process tree
    for a in active.values():
        try:
            a.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            a.proc.kill()
            a.proc.wait()
        a.log_file.close()
        log(f"[sweep] stopped {a.run.label}; the next sweep resumes it")


class _StopSignals:
    """SIGTERM/SIGINT/SIGHUP set a flag the scheduling loop acts on (a second one interrupts at
    once); installed only in the main thread, where Python delivers signals."""

    def __init__(self):
        self.signum, self._previous = None, {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def execute(runs, command: list, script_args: list, devices=None, log=say) -> list:
    """Run what is not done, one run per device at a time (one at a time without devices).
    Returns (run, problem) for every run that did not end with a readable metrics.json. Raises
    SweepInterrupted after stopping every run when the sweep gets SIGTERM, SIGINT or SIGHUP."""
    slots = list(devices) if devices else [None]
    free, active, failures = deque(range(len(slots))), {}, []
    pending = deque(runs)
    with _StopSignals() as stop:
        try:
            while pending or active:
                if stop.signum is not None:
                    raise SweepInterrupted(stop.signum)
                while pending and free:
                    run = pending.popleft()
                    holder = lock.holder(run.output_dir)
                    if holder is not None:
                        problem = f"{run.output_dir} is being written by another run ({holder}); not started"
                        failures.append((run, problem))
                        log(f"[sweep] LOCKED {run.label}: {problem}")
                    elif _needs_run(run, log):
                        slot = free.popleft()
                        active[slot] = _start(run, command, script_args, slots[slot], log)
                for slot, a in list(active.items()):
                    if a.proc.poll() is None:
                        continue
                    a.log_file.close()
                    del active[slot]
                    free.append(slot)
                    problem = _outcome(a)
                    if problem is not None:
                        failures.append((a.run, problem))
                        log(f"[sweep] FAILED {a.run.label}: {problem}")
                    elif (row := run_row(a.run))["status"] == "diverged":
                        log(f"[sweep] {a.run.label} diverged: final {row['metric']} {row['final']}, "
                            f"best {row['best']}; it is not ranked")
                if active:
                    time.sleep(POLL_S)
        except BaseException:
            _stop_all(active, log)
            raise
    return failures
