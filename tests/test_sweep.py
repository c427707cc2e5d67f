"""`hf-gemact sweep` end to end on tiny real GPT-2 runs: a 2-activation x 2-seed grid killed and
resumed, and a kill -9 of the sweep under `accelerate launch` that must leave no training behind.
(The sweep's process handling with a quick script of one's own: test_sweep_procs.py.)"""

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

from conftest import shakespeare_split
from hf_gemact.plotting import is_png

TINY_CLM = ["--config_overrides", "n_layer=1,n_embd=32,n_head=2,n_positions=32", "--block_size", "32",
            "--vocab_size", "300", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
            "--max_train_steps", "6", "--eval_steps", "3", "--learning_rate", "3e-3", "--no_save_model"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data):
    return shakespeare_split(tmp_path_factory, shared_data, "sweep_corpus", 20_000, 4_000)


def sweep_command(corpus: Path, out: Path, activations=("gelu", "gem_n2"), seeds=("0", "1"), options=(),
                  extra=()) -> list:
    return [sys.executable, "-m", "hf_gemact", "sweep", "--task", "clm", "--activations", *activations,
            "--seeds", *seeds, "--output_dir", str(out), *options, "--",
            "--train_file", str(corpus / "train.txt"), "--validation_file", str(corpus / "valid.txt"), *TINY_CLM,
            *extra]


def test_sweep_tables_plots_and_resume_after_a_kill(corpus, tmp_path):
    env = {**os.environ, "HF_GEMACT_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "sweep"
    first = out / "gelu" / "seed0" / "metrics.json"

    # start the sweep and kill it as soon as its first run has finished
    proc = subprocess.Popen(sweep_command(corpus, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first.exists(), proc.communicate()[0].decode()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_at = first.stat().st_mtime_ns
    assert not (out / "gem_n2" / "seed1" / "metrics.json").exists()

    result = subprocess.run(sweep_command(corpus, out), env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"skip finished {first.parent}" in result.stdout
    assert first.stat().st_mtime_ns == finished_at  # the finished run was not redone

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["activation"], r["seed"]) for r in rows) == [("gelu", "0"), ("gelu", "1"), ("gem_n2", "0"),
                                                                  ("gem_n2", "1")]
    for r in rows:  # each row holds its own run's numbers, read from that run's folder here
        metrics = json.loads((out / r["activation"] / f"seed{r['seed']}" / "metrics.json").read_text())
        assert (metrics["args"]["activation"], str(metrics["args"]["seed"])) == (r["activation"], r["seed"])
        assert r["metric"] == "perplexity"
        assert (float(r["final"]), float(r["best"])) == (metrics["final"]["perplexity"], metrics["best"]["perplexity"])
    table = (out / "results.md").read_text()
    assert "| gelu | 2 |" in table and "| gem_n2 | 2 |" in table
    assert is_png(out / "curves.png")


def test_kill_9_of_the_sweep_under_accelerate_launch_leaves_no_training_running(corpus, tmp_path):
    """The issue's failure: the orphaned training went on and raced the rerun in its folder."""
    env = {**os.environ, "HF_GEMACT_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "sweep"
    log = out / "gelu" / "seed0" / "log.jsonl"
    one_run = dict(activations=["gelu"], seeds=["0"], options=["--launcher", "accelerate"])
    proc = subprocess.Popen(sweep_command(corpus, out, **one_run, extra=["--max_train_steps", "100000",
                                                                          "--logging_steps", "1"]),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not (log.is_file() and log.read_text().strip()):  # its first train line: training runs
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0].decode()[-3000:]
        time.sleep(0.1)
    tree = psutil.Process(proc.pid).children(recursive=True)
    commands = [" ".join(p.cmdline()) for p in tree]
    assert any("accelerate.commands.launch" in c for c in commands), commands
    assert any("-m hf_gemact.train clm" in c and "accelerate" not in c for c in commands), commands

    proc.kill()  # kill -9 of the sweep alone
    proc.communicate()
    deadline = time.time() + 60
    while time.time() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree):
        time.sleep(0.2)
    survivors = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in survivors:
        p.kill()
    assert not survivors, [" ".join(p.cmdline()) for p in survivors]

    rerun = subprocess.run(sweep_command(corpus, out, **one_run), env=env, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    metrics = json.loads((out / "gelu" / "seed0" / "metrics.json").read_text())
    assert metrics["steps"] == 6 and [json.loads(line)["step"] for line in log.read_text().splitlines()
                                      if json.loads(line)["split"] == "train"] == [6]
