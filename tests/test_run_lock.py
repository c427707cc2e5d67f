"""One writer per output directory: the training scripts lock OUTPUT_DIR/.lock for the whole run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_gemact.training import UsageError, lock, run

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config_overrides", "n_layer=1,n_embd=32,n_head=2,n_positions=32", "--block_size", "32", "--vocab_size",
        "300", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--no_save_model"]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(tmp_path_factory, monkeypatch):
    from accelerate.state import AcceleratorState, GradientState

    monkeypatch.setenv("HF_GEMACT_CACHE", str(tmp_path_factory.getbasetemp() / "hf_gemact_cache"))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data):
    text = (shared_data / "text" / "tinyshakespeare.txt").read_text()
    d = tmp_path_factory.mktemp("lock_corpus")
    (d / "train.txt").write_text(text[:20_000])
    (d / "valid.txt").write_text(text[-4_000:])
    return d


def data_args(corpus):
    return ["--train_file", str(corpus / "train.txt"), "--validation_file", str(corpus / "valid.txt"), *TINY]


def test_a_second_writer_stops_with_the_holders_pid_and_changes_nothing(corpus, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "hf_gemact.train", "clm", *data_args(corpus), "--output_dir",
                              str(out), "--max_train_steps", "100000", "--logging_steps", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        log = out / "log.jsonl"
        while not (log.is_file() and log.read_text().count("\n") >= 2):  # training, and logging
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.1)

        # the documented script, told to overwrite the folder: it must neither train nor delete
        second = subprocess.run([sys.executable, str(REPO / "train_scripts" / "run_clm.py"), *data_args(corpus),
                                 "--output_dir", str(out), "--max_train_steps", "3", "--overwrite_output_dir"],
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert errors == [f"error: --output_dir {out} is being written by another run (pid {first.pid} on "
                          f"{socket.gethostname()}); wait for it to end or stop it"]
        steps = [r["step"] for r in map(json.loads, log.read_text().splitlines()) if r["split"] == "train"]
        assert steps == list(range(1, len(steps) + 1))  # the first writer's log, from its step 1, intact
        assert first.poll() is None  # the first writer goes on
        assert (out / ".lock").read_text().startswith(f"pid {first.pid} on ")
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    # the kernel dropped the dead writer's lock: the folder can be written again
    assert lock.holder(out) is None
    lock.acquire(out).release()


def test_the_lock_is_released_when_a_run_returns_or_raises(corpus, tmp_path):
    out = tmp_path / "run"
    args = [*data_args(corpus), "--output_dir", str(out)]
    with pytest.raises(UsageError, match="block_size") as failed:  # raised after the lock was taken
        run("clm", [*args, "--max_train_steps", "2", "--block_size", "4096"])
    # The lock goes with the run, even while a kept traceback (as a notebook's sys.last_traceback)
    # still holds the failed run's frame.
    assert failed.value is not None and lock.holder(out) is None
    summary = run("clm", [*args, "--max_train_steps", "2", "--overwrite_output_dir"])
    assert summary["steps"] == 2 and failed.value is not None
    assert lock.holder(out) is None and not (out / ".lock").exists()
    probe = subprocess.run([sys.executable, "-c", "import sys; from hf_gemact.training import lock; "
                            "lock.acquire(sys.argv[1]).release()", str(out)], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr


def test_a_run_stopped_by_bad_input_leaves_no_folder_behind(corpus, tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(UsageError, match="block_size"):  # found after the lock (and its folder) was made
        run("clm", [*data_args(corpus), "--output_dir", str(out), "--max_train_steps", "2", "--block_size", "4096"])
    assert not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(UsageError, match="block_size"):
        run("clm", [*data_args(corpus), "--output_dir", str(kept), "--max_train_steps", "2", "--block_size", "4096"])
    assert kept.is_dir() and not any(kept.iterdir())  # the user's own folder stays


def test_lock_holders_are_named_and_a_killed_holder_leaves_no_lock(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from hf_gemact.training import lock; "
                               "held = lock.acquire(sys.argv[1], 'my command'); print('held', flush=True); "
                               "time.sleep(600)", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert lock.holder(out) == f"pid {holder.pid} on {socket.gethostname()}"
        with pytest.raises(lock.RunLockedError, match=f"--output_dir {out} is being written by another run "
                                                      rf"\(pid {holder.pid} on "):
            lock.acquire(out)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (out / ".lock").read_text().splitlines()[1] == "my command"  # left behind by kill -9, but unlocked
    assert lock.holder(out) is None
    with lock.acquire(out) as mine:
        assert mine.held and (out / ".lock").read_text().startswith(f"pid {os.getpid()} ")
    assert not (out / ".lock").exists()


@pytest.mark.slow
def test_every_process_of_a_two_process_run_stops_on_a_locked_folder(corpus, tmp_path):
    """The main process takes the lock and tells the others, so that no rank trains on alone."""
    out = tmp_path / "run"
    with lock.acquire(out):
        result = subprocess.run(
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
             str(REPO / "train_scripts" / "run_clm.py"), *data_args(corpus), "--output_dir", str(out),
             "--max_train_steps", "3", "--overwrite_output_dir"],
            env={**os.environ, "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=600)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0
    assert errors == [f"error: --output_dir {out} is being written by another run (pid {os.getpid()} on "
                      f"{socket.gethostname()}); wait for it to end or stop it"] * 2, result.stderr[-3000:]
    assert not out.exists()  # nothing was written: the folder the lock made went with it
