"""`hf-gemact sweep` as a process manager, with a training script of one's own (`--task PATH`) that
is quick and controllable: its runs die with the sweep (kill -9, SIGTERM, Ctrl-C), grandchildren
in other sessions included; a locked run folder is reported, not raced; an unreadable
metrics.json is named and its run done again; diverged runs are not ranked. The same with the real
training scripts: test_sweep.py."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from hf_gemact.training import lock

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kill -9 handling needs Linux")

# A training script of one's own. FAKE_MODE=hang: start a grandchild in a session of its own (as
# torchrun starts its workers), record both pids, wait forever. FAKE_MODE=finish: record that it ran
# (after FAKE_SECONDS, noting its CUDA_VISIBLE_DEVICES and times) and write a metrics.json whose
# perplexity comes from FAKE_RESULTS ("act/seed" -> value).
FAKE_SCRIPT = r'''
import argparse, json, os, subprocess, sys, time
p = argparse.ArgumentParser()
for flag in ("--output_dir", "--activation", "--seed", "--resume_from_checkpoint"):
    p.add_argument(flag)
p.add_argument("--overwrite_output_dir", action="store_true")
a, _ = p.parse_known_args()
os.makedirs(a.output_dir, exist_ok=True)
with open(os.path.join(os.path.dirname(os.path.dirname(a.output_dir)), "ran.txt"), "a") as f:
    f.write(f"{a.activation}/{a.seed}\n")
if os.environ["FAKE_MODE"] == "hang":
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    with open(os.path.join(a.output_dir, "pids.tmp"), "w") as f:
        f.write(f"{os.getpid()} {grandchild.pid}\n")
    os.replace(os.path.join(a.output_dir, "pids.tmp"), os.path.join(a.output_dir, "pids"))
    time.sleep(600)
start = time.time()
time.sleep(float(os.environ.get("FAKE_SECONDS", "0")))
with open(os.path.join(os.path.dirname(os.path.dirname(a.output_dir)), "devices.txt"), "a") as f:
    f.write(f"{os.environ.get('CUDA_VISIBLE_DEVICES')} {start} {time.time()}\n")
value = json.loads(os.environ.get("FAKE_RESULTS", "{}")).get(f"{a.activation}/{a.seed}", 10.0 + int(a.seed))
metrics = {"task": "clm", "final": {"step": 1, "perplexity": value}, "best": {"step": 1, "perplexity": value},
           "steps": 1, "tokens_per_s": 100.0}
with open(os.path.join(a.output_dir, "metrics.json"), "w") as f:
    f.write(json.dumps(metrics))
'''


@pytest.fixture
def fake_script(tmp_path) -> Path:
    path = tmp_path / "my_train.py"
    path.write_text(FAKE_SCRIPT)
    return path


def sweep_cmd(script: Path, out: Path, activations=("gelu",), seeds=("0",)) -> list:
    return [sys.executable, "-m", "hf_gemact", "sweep", "--task", str(script), "--activations", *activations,
            "--seeds", *seeds, "--output_dir", str(out)]


def run_sweep(capsys, monkeypatch, script: Path, out: Path, activations=("gelu",), seeds=("0",), **env) -> tuple:
    """The sweep in this process (its runs are still processes): (exit code, what it printed)."""
    from hf_gemact.cli import main

    for name, value in {"FAKE_MODE": "finish", **env}.items():
        monkeypatch.setenv(name, value)
    code = main(sweep_cmd(script, out, activations, seeds)[3:])
    return code, capsys.readouterr().out


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"{path} never appeared:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.05)


def alive(pids) -> list:
    """The pids among `pids` that still run (a zombie has finished)."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def assert_all_die(pids, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while alive(pids) and time.time() < deadline:
        time.sleep(0.1)
    survivors = alive(pids)
    for pid in survivors:  # don't leave them behind for the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"processes outlived the sweep: {survivors}"


def start_hanging_sweep(fake_script, tmp_path):
    out = tmp_path / "sweep"
    env = {**os.environ, "FAKE_MODE": "hang"}
    proc = subprocess.Popen(sweep_cmd(fake_script, out, activations=("gelu", "relu")), env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pids_file = out / "gelu" / "seed0" / "pids"
    wait_for(pids_file, proc)
    script_pid, grandchild_pid = map(int, pids_file.read_text().split())
    tree = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    # the grandchild runs in a session of its own but is still a descendant when this is read
    assert script_pid in tree and grandchild_pid in tree, tree
    return proc, out, tree


def test_kill_9_of_the_sweep_takes_its_whole_run_down_and_a_rerun_finishes(fake_script, tmp_path, capsys,
                                                                             monkeypatch):
    proc, out, tree = start_hanging_sweep(fake_script, tmp_path)
    proc.kill()  # SIGKILL: the sweep can do nothing about it
    proc.communicate()
    assert_all_die(tree)

    code, printed = run_sweep(capsys, monkeypatch, fake_script, out, activations=("gelu", "relu"))
    assert code == 0, printed
    with open(out / "results.csv") as f:
        assert sorted(r["activation"] for r in csv.DictReader(f)) == ["gelu", "relu"]


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_or_ctrl_c_stops_the_runs_and_reports_it(fake_script, tmp_path, signum, code):
    proc, out, tree = start_hanging_sweep(fake_script, tmp_path)
    proc.send_signal(signum)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == code, output
    assert "stopped gelu seed 0; the next sweep resumes it" in output
    assert_all_die(tree, timeout=5)  # stopped before the sweep exited, not after
    assert not (out / "relu").exists()  # nothing else was started after the signal


def test_a_locked_run_is_reported_and_not_started(fake_script, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    held = lock.acquire(out / "gelu" / "seed0")  # another writer, as far as the sweep can tell
    try:
        code, printed = run_sweep(capsys, monkeypatch, fake_script, out, activations=("gelu", "relu"))
    finally:
        held.release()
    assert code == 1, printed
    assert f"LOCKED gelu seed 0: {out / 'gelu' / 'seed0'} is being written by another run (pid {os.getpid()} " \
        in printed
    assert (out / "ran.txt").read_text().split() == ["relu/0"]  # gelu's folder was left alone
    assert not (out / "gelu" / "seed0" / "metrics.json").exists()


UNREADABLE = {"empty": "", "truncated": '{"task": "clm", "final": {"perplexity": 12.', "no-final": '{"task": "clm"}',
              "not-an-object": "[]", "not-a-number": '{"task": "clm", "final": {"perplexity": "12"}, "best": {}}'}


def test_an_unreadable_metrics_json_is_named_kept_and_its_run_done_again(fake_script, tmp_path, capsys,
                                                                         monkeypatch):
    out = tmp_path / "sweep"
    seeds = [str(seed) for seed in range(len(UNREADABLE) + 1)]  # the last one has no metrics.json yet
    for seed, content in zip(seeds, UNREADABLE.values()):
        (out / "gelu" / f"seed{seed}").mkdir(parents=True)
        (out / "gelu" / f"seed{seed}" / "metrics.json").write_text(content)
    code, printed = run_sweep(capsys, monkeypatch, fake_script, out, seeds=seeds)
    assert code == 0, printed
    for seed, content in zip(seeds, UNREADABLE.values()):
        broken = out / "gelu" / f"seed{seed}" / "metrics.json"
        assert f"{broken} is unreadable" in printed
        assert broken.with_name("metrics.json.unreadable").read_text() == content
    assert sorted((out / "ran.txt").read_text().split()) == [f"gelu/{seed}" for seed in seeds]
    with open(out / "results.csv") as f:
        assert {r["seed"]: float(r["final"]) for r in csv.DictReader(f)} == {s: 10.0 + int(s) for s in seeds}


def test_a_diverged_run_is_shown_as_diverged_and_not_ranked(fake_script, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    results = {"gelu/0": 20.0, "gelu/1": 22.0, "gem/0": float("nan"), "gem/1": 5.0, "velu/0": 30.0, "velu/1": 31.0}
    code, printed = run_sweep(capsys, monkeypatch, fake_script, out, activations=("gelu", "gem", "velu"),
                              seeds=("0", "1"), FAKE_RESULTS=json.dumps(results))
    assert code == 0, printed
    rows = [line.split("|")[1:4] for line in (out / "results.md").read_text().splitlines()
            if line.startswith("| ") and "---" not in line][1:]
    assert [[cell.strip() for cell in row] for row in rows] == [
        ["1", "gelu", "2"], ["2", "velu", "2"], ["diverged", "gem", "2 (1 diverged)"]]
    with open(out / "results.csv") as f:
        status = {(r["activation"], r["seed"]): r["status"] for r in csv.DictReader(f)}
    assert status[("gem", "0")] == "diverged" and status[("gem", "1")] == "finished"
    # a diverged run is a result: the next sweep does not run it again
    code, printed = run_sweep(capsys, monkeypatch, fake_script, out, activations=("gem",), seeds=("0",))
    assert f"skip diverged {out / 'gem' / 'seed0'}" in printed


def test_with_devices_each_device_runs_one_run_at_a_time(fake_script, tmp_path, capsys, monkeypatch):
    from hf_gemact.cli import main

    out = tmp_path / "sweep"
    monkeypatch.setenv("FAKE_MODE", "finish")
    monkeypatch.setenv("FAKE_SECONDS", "0.5")
    argv = sweep_cmd(fake_script, out, activations=("gelu", "relu"), seeds=("0", "1", "2"))[3:]
    assert main([*argv, "--devices", "3", "5"]) == 0, capsys.readouterr().out
    spans = {}
    for line in (out / "devices.txt").read_text().splitlines():
        device, start, end = line.split()
        spans.setdefault(device, []).append((float(start), float(end)))
    assert sorted(spans) == ["3", "5"] and sum(map(len, spans.values())) == 6
    for runs in spans.values():  # one at a time on a device
        runs.sort()
        assert all(end <= next_start for (_, end), (next_start, _) in zip(runs, runs[1:])), runs


@pytest.mark.parametrize("args, message", [
    (["--activations", "gelu", "gelu"], "--activations lists gelu twice"),
    (["--activations", "gem", "gem_n2"], "--activations lists gem twice (gem and gem_n2 are the same activation)"),
    (["--activations", "gelu", "--seeds", "0", "1", "0"], "--seeds lists 0 more than once"),
    (["--activations", "gelux"], "--activations: 'gelux' is not a known activation"),
    (["--activations", "gelu", "--task", "no_such_script.py"], "--task no_such_script.py: not one of clm, mlm, image"),
])
def test_bad_grids_are_refused_before_anything_runs(fake_script, tmp_path, capsys, monkeypatch, args, message):
    from hf_gemact.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FAKE_MODE", "finish")
    out = tmp_path / "sweep"
    argv = ["sweep", "--output_dir", str(out), *args] + ([] if "--task" in args else ["--task", str(fake_script)])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-gemact sweep: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()
