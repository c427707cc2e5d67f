"""Multi-process training on CPU (gloo): sharding VeLU, FSDP2 training and resume, and the
documented 2-process launch (issue 17 items 12-15, issue 14 item 3).

Each group starts its processes once (module-scoped fixtures); the tests compare what the
processes produced with a 1-process computation done here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_gemact

REPO = Path(__file__).resolve().parents[1]
DIST = Path(__file__).resolve().parent / "dist_scripts"
CPU_2PROC = REPO / "train_scripts" / "configs" / "cpu_2proc.yaml"
NO_DROPOUT = "resid_pdrop=0,embd_pdrop=0,attn_pdrop=0"  # dropout masks depend on the process layout


def _load_fsdp_train():
    spec = importlib.util.spec_from_file_location("fsdp_train", DIST / "fsdp_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fsdp_train = _load_fsdp_train()


def _worker_env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- VeLU's lam


def _velu_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(activation_function="velu", **fsdp_train.CONFIG)).eval()


def test_velu_lam_is_shardable_and_scalar_checkpoints_still_load(tmp_path):
    """Checkpoints saved while lam was a 0-dim parameter load with their trained values, through
    module.load_state_dict and through from_pretrained, and give the same outputs as before."""
    from safetensors.torch import load_file, save_file
    from transformers import GPT2LMHeadModel

    model = _velu_gpt2()
    lams = [m.lam for m in model.modules() if isinstance(m, hf_gemact.VeLU)]
    assert len(lams) == 2 and all(lam.shape == (1,) for lam in lams)  # FSDP shards dim 0

    # An old-format checkpoint: lam stored 0-dim, with trained (non-initial) values.
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    trained = {}
    for i, key in enumerate(k for k in weights if k.endswith(".act.lam")):
        trained[key] = 0.625 + i
        weights[key] = torch.tensor(trained[key])
    assert len(trained) == 2
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})

    # Expected: the in-memory model with those values written into its (1,)-shaped lam.
    with torch.no_grad():
        for key, value in trained.items():
            model.get_parameter(key).fill_(value)
    ids = fsdp_train.global_batches()[0]
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    loaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    fresh = _velu_gpt2()
    result = fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == ["lm_head.weight"]  # tied to wte
    for candidate in (loaded, fresh):
        for key, value in trained.items():
            lam = candidate.get_parameter(key)
            assert lam.shape == (1,) and lam.item() == value, (key, lam)
        with torch.no_grad():
            assert torch.equal(candidate(input_ids=ids).logits, expected)


# ----------------------------------------------------------------------------- FSDP2


def _accelerate_has_fsdp2() -> bool:
    import inspect

    from accelerate import FullyShardedDataParallelPlugin

    return "fsdp_version" in inspect.signature(FullyShardedDataParallelPlugin).parameters


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    if not _accelerate_has_fsdp2():
        pytest.skip("FSDP2 (fsdp_version=2) needs accelerate >= 1.6; this accelerate has only FSDP1")
    """2 processes: fully_shard, AdamW steps, accelerate's FSDP2 checkpoint, resume (gem and velu)."""
    out = tmp_path_factory.mktemp("fsdp2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(DIST / "fsdp_train.py"), "--out", str(out), "--activations", "gem", "velu"]
    res = subprocess.run(cmd, env=_worker_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return {act: torch.load(out / f"{act}.pt") for act in ("gem", "velu")}


@pytest.fixture
def eager_only():
    """The FSDP processes run the activations eager (fsdp_train.main); so does their reference."""
    was = hf_gemact.fast_path_enabled()
    hf_gemact.set_fast_path(False)
    yield
    hf_gemact.set_fast_path(was)


def _one_process_reference(activation: str, micro_batches: int):
    """Plain model, one process, no checkpoint: each step's global batch in `micro_batches` equal
    parts, gradients accumulated (loss / parts). Returns per-step losses and final state dict."""
    model = fsdp_train.build_model(activation)
    optimizer = fsdp_train.make_optimizer(model)
    losses = []
    for batch in fsdp_train.global_batches():
        total = 0.0
        for part in batch.chunk(micro_batches):
            loss = fsdp_train.training_loss(model, part) / micro_batches
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
    return losses, model.state_dict()


@pytest.mark.slow  # the fixture starts 2 processes (~15-30 s)
@pytest.mark.parametrize("activation, micro_batches", [
    ("gem", 1),
    # VeLU's auxiliary term is a statistic of the batch one forward pass sees: each process
    # computes it on its own half, so the 1-process equivalent accumulates the two halves.
    ("velu", 2),
])
def test_fsdp2_two_processes_train_and_resume_like_one(fsdp_run, eager_only, activation, micro_batches):
    losses, params = _one_process_reference(activation, micro_batches)
    got = fsdp_run[activation]
    assert len(got["losses"]) == fsdp_train.STEPS
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses), rtol=1e-6, atol=0)
    assert got["state_dict"].keys() == params.keys()
    lam_keys = [k for k in params if k.endswith(".act.lam")]
    assert len(lam_keys) == (2 if activation == "velu" else 0)
    for key, value in params.items():
        torch.testing.assert_close(got["state_dict"][key], value, rtol=1e-4, atol=2e-5, msg=key)
    if lam_keys:  # lam really trained (not stuck at its initial 1 on either side)
        assert all(params[k].item() != 1.0 for k in lam_keys)


# ----------------------------------------------------------------------------- the documented 2-process launch


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data):
    """Tiny Shakespeare slices, as in test_training.py."""
    text = (shared_data / "text" / "tinyshakespeare.txt").read_text()
    d = tmp_path_factory.mktemp("corpus")
    (d / "train.txt").write_text(text[:40_000])
    (d / "valid.txt").write_text(text[-6_000:])
    return d


TRAIN_SAMPLES = 24  # one epoch = 6 steps of 2 processes x 2 blocks


def _clm_args(corpus, out, batch: int) -> list[str]:
    return ["--train_file", str(corpus / "train.txt"), "--validation_file", str(corpus / "valid.txt"),
            "--output_dir", str(out), "--activation", "gem", "--seed", "3",
            "--config_overrides", f"n_layer=1,n_embd=32,n_head=2,n_positions=32,{NO_DROPOUT}",
            "--block_size", "32", "--vocab_size", "300", "--max_train_samples", str(TRAIN_SAMPLES),
            "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", "4", "--max_eval_samples", "8",
            "--num_train_epochs", "1", "--learning_rate", "3e-3", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def two_process_clm(corpus, tmp_path_factory):
    """run_clm.py launched the way docs/TRAINING.md says (the cpu_2proc.yaml config), with every
    process's DataLoader fetches recorded from outside (tests/dist_scripts/sample_recorder)."""
    root = tmp_path_factory.mktemp("two_proc")
    out, fetched = root / "out", root / "fetched"
    fetched.mkdir()
    cache = tmp_path_factory.getbasetemp() / "hf_gemact_cache"
    env = _worker_env(ACCELERATE_USE_CPU="true", HF_GEMACT_CACHE=str(cache), HF_GEMACT_RECORD_SAMPLES=str(fetched),
                      PYTHONPATH=os.pathsep.join([str(DIST / "sample_recorder"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
           "--main_process_port", str(_free_port()),  # tests may run beside each other
           str(REPO / "train_scripts" / "run_clm.py"), *_clm_args(corpus, out, batch=2)]
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return out, fetched, cache


@pytest.mark.slow  # the fixture launches run_clm.py on 2 processes (~30-60 s)
def test_cpu_2proc_config_starts_two_processes(two_process_clm):
    out, fetched, _ = two_process_clm
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    assert sorted(p.name.split("_")[1] for p in fetched.glob("fetched_rank*.json")) == ["rank0", "rank1"]


@pytest.mark.slow  # the fixture launches run_clm.py on 2 processes (~30-60 s)
def test_ranks_train_on_disjoint_samples_covering_the_epoch(two_process_clm):
    _, fetched, _ = two_process_clm
    per_rank = {}
    for path in fetched.glob("fetched_rank*.json"):
        batches = [b for b in json.loads(path.read_text()) if b["dataset_len"] == TRAIN_SAMPLES]
        per_rank[path.name.split("_")[1]] = [i for b in batches for i in b["indices"]]
    assert sorted(per_rank) == ["rank0", "rank1"]
    rank0, rank1 = per_rank["rank0"], per_rank["rank1"]
    assert len(rank0) == len(set(rank0)) == len(rank1) == len(set(rank1)) == TRAIN_SAMPLES // 2
    assert not set(rank0) & set(rank1)
    assert set(rank0) | set(rank1) == set(range(TRAIN_SAMPLES))


@pytest.mark.slow  # the fixture launches run_clm.py on 2 processes (~30-60 s)
def test_two_processes_match_one_process_with_twice_the_batch(two_process_clm, corpus, tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState, GradientState
    from safetensors.torch import load_file

    from hf_gemact.training import run

    out2, _, cache = two_process_clm
    monkeypatch.setenv("HF_GEMACT_CACHE", str(cache))  # the same trained tokenizer
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        one = run("clm", _clm_args(corpus, tmp_path / "one", batch=4))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    two = json.loads((out2 / "metrics.json").read_text())
    assert one["num_processes"] == 1 and one["steps"] == two["steps"] == TRAIN_SAMPLES // 4

    def train_losses(out):
        return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
                if r["split"] == "train"]

    assert len(train_losses(out2)) == TRAIN_SAMPLES // 4
    torch.testing.assert_close(torch.tensor(train_losses(out2)), torch.tensor(train_losses(tmp_path / "one")),
                               rtol=1e-5, atol=0)
    w1, w2 = load_file(tmp_path / "one" / "model.safetensors"), load_file(out2 / "model.safetensors")
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=2e-5, msg=key)
