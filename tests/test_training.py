"""Training scripts (issue 4) at tiny size on CPU: end to end, resume, 2 processes, metrics."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_gemact.training import UsageError, checkpoint, run
from hf_gemact.training.args import build_parser, check_activation

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "train_scripts"
GPT2_TINY = ["--config_overrides", "n_layer=1,n_embd=32,n_head=2,n_positions=32", "--block_size", "32",
             "--vocab_size", "300"]
BERT_TINY = ["--config_overrides", "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,"
             "intermediate_size=64,max_position_embeddings=32", "--max_seq_length", "32", "--vocab_size", "300"]
VIT_TINY = ["--config_overrides", "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64"]


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
    """A small real corpus: slices of tiny Shakespeare (train) and of its end (validation)."""
    text = (shared_data / "text" / "tinyshakespeare.txt").read_text()
    d = tmp_path_factory.mktemp("corpus")
    (d / "train.txt").write_text(text[:40_000])
    (d / "valid.txt").write_text(text[-6_000:])
    return d


def text_args(corpus, out, *extra):
    return ["--train_file", str(corpus / "train.txt"), "--validation_file", str(corpus / "valid.txt"),
            "--output_dir", str(out), "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
            "--learning_rate", "3e-3", "--logging_steps", "2", *extra]


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def independent_clm_loss(model_dir: Path, text_file: Path, block: int) -> float:
    """Mean token loss of the saved model on a text file, computed without the training code:
    the file read line by line (as datasets' text loader does), tokenized, cut into blocks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = [t for line in text_file.read_text().splitlines(keepends=True) for t in tok(line)["input_ids"]]
    n = len(ids) // block
    blocks = torch.tensor(ids[: n * block]).view(n, block)
    total = 0.0
    with torch.no_grad():
        for chunk in blocks.split(5):
            total += model(input_ids=chunk, labels=chunk).loss.double().item() * len(chunk) * (block - 1)
    return total / (n * (block - 1))


def independent_mlm_loss(model_dir: Path, text_file: Path, seq: int, mask_seed: int = 1234) -> tuple[float, int]:
    """(mean loss over the masked positions, their number) of the saved model on a text file, without
    the training code: lines tokenized, concatenated, cut into seq - 2 tokens between CLS and SEP,
    masked as documented (mask_tokens with the generator of (eval mask seed, 0, example index))."""
    import numpy as np
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from hf_gemact.training.tasks import mask_tokens

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    ids = [t for line in text_file.read_text().splitlines(keepends=True)
           for t in tok(line, add_special_tokens=False)["input_ids"]]
    body = seq - 2
    total, count = 0.0, 0
    for i in range(len(ids) // body):
        example = [tok.cls_token_id, *ids[i * body: (i + 1) * body], tok.sep_token_id]
        masked, labels = mask_tokens(example, [1] + [0] * body + [1], np.random.default_rng([mask_seed, 0, i]), 0.15,
                                     tok.mask_token_id, len(tok))
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(masked)[None]).logits[0]
        scored = torch.from_numpy(labels) != -100
        total += torch.nn.functional.cross_entropy(logits[scored].double(), torch.from_numpy(labels)[scored],
                                                   reduction="sum").item()
        count += int(scored.sum())
    return total / count, count


def independent_image_scores(model_dir: Path, pixel_values: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the saved classifier on the given images, float64 loss."""
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits.double()
    return (torch.nn.functional.cross_entropy(logits, labels).item(),
            (logits.argmax(-1) == labels).double().mean().item())


# ----------------------------------------------------------------------------- causal LM


@pytest.fixture(scope="module")
def clm_velu_run(corpus, tmp_path_factory):
    """VeLU (it has an auxiliary loss) trained a few steps; reused by several tests."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    os.environ.setdefault("HF_GEMACT_CACHE", str(tmp_path_factory.getbasetemp() / "hf_gemact_cache"))
    out = tmp_path_factory.mktemp("clm_velu") / "out"
    summary = run("clm", text_args(corpus, out, *GPT2_TINY, "--activation", "velu", "--max_train_steps", "6",
                                   "--eval_steps", "3", "--checkpointing_steps", "3",
                                   "--with_tracking", "--report_to", "tensorboard"))
    return out, summary


def test_clm_end_to_end_outputs(clm_velu_run):
    out, summary = clm_velu_run
    on_disk = json.loads((out / "metrics.json").read_text())
    for key in ("task", "activation", "final", "best", "steps", "tokens_seen", "tokens_per_s", "wall_time_s",
                "args", "versions"):
        assert key in on_disk, key
    assert on_disk["task"] == "clm" and on_disk["activation"] == "velu" and on_disk["steps"] == 6
    assert on_disk["tokens_seen"] == 6 * 4 * 32
    # best: the evaluation with the lowest loss among those in log.jsonl, picked here
    lowest = min((r for r in read_log(out) if r["split"] == "eval"), key=lambda r: r["loss"])
    assert on_disk["best"] == {k: lowest[k] for k in ("step", "loss", "perplexity")}
    assert {"torch", "transformers", "accelerate", "hf_gemact"} <= set(on_disk["versions"])
    assert on_disk["args"]["activation"] == "velu"
    log = read_log(out)
    assert [r["step"] for r in log if r["split"] == "eval"] == [3, 6]
    assert [r["step"] for r in log if r["split"] == "train"] == [2, 4, 6]
    assert (out / "step_3" / checkpoint.STATE_FILE).is_file() and (out / "step_6").is_dir()
    assert checkpoint.STATE_FILE != "trainer_state.json" and not list(out.rglob("trainer_state.json"))
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert list(out.rglob("events.out.tfevents.*"))  # --with_tracking --report_to tensorboard


def test_velu_aux_loss_in_train_loss_not_in_val_loss(clm_velu_run, corpus):
    out, summary = clm_velu_run
    train = [r for r in read_log(out) if r["split"] == "train"]
    for r in train:
        assert r["aux_loss"] > 1e-3
        assert math.isclose(r["loss"], r["task_loss"] + r["aux_loss"], rel_tol=1e-9)
    # The reported validation loss is the task loss of the saved model alone: an independent
    # computation (no auxiliary term) gives the same number, in what run() returns and in what
    # metrics.json holds.
    ref = independent_clm_loss(out, corpus / "valid.txt", 32)
    for final in (summary["final"], json.loads((out / "metrics.json").read_text())["final"]):
        assert final["step"] == 6
        assert math.isclose(final["loss"], ref, rel_tol=1e-5)
        assert math.isclose(final["perplexity"], math.exp(ref), rel_tol=1e-5)


def test_resume_is_exact(corpus, tmp_path):
    # 12 samples, batch 2, accumulation 2: 3 steps per epoch (the last one a single batch), so the
    # stop (after step 5, checkpoint at 4) and the resume fall mid-epoch in the second epoch.
    # At this learning rate the model overfits its 12 blocks: the validation loss is lowest at the
    # checkpoint's step and higher at every evaluation after it, so the best evaluation of the
    # resumed run is one the resumed invocation never computed (it must come from the checkpoint).
    common = [*GPT2_TINY, "--max_train_samples", "12", "--per_device_train_batch_size", "2",
              "--gradient_accumulation_steps", "2", "--max_train_steps", "8", "--checkpointing_steps", "4",
              "--eval_steps", "2", "--num_warmup_steps", "2", "--lr_scheduler_type", "cosine", "--seed", "7",
              "--learning_rate", "3e-2"]
    full = run("clm", text_args(corpus, tmp_path / "full", *common))
    part = tmp_path / "part"
    assert run("clm", text_args(corpus, part, *common, "--stop_after_steps", "5")) == {"stopped_at": 5}
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    # Written before the state file had its own name: the old name still resumes, exactly.
    os.rename(part / "step_4" / checkpoint.STATE_FILE, part / "step_4" / "trainer_state.json")
    resumed = run("clm", text_args(corpus, part, *common, "--resume_from_checkpoint", "latest"))
    assert resumed["resumed_from"].endswith("step_4")
    assert resumed["final"] == full["final"]
    assert resumed["tokens_seen"] == full["tokens_seen"]
    strip = lambda log: [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in log]  # noqa: E731
    assert strip(read_log(part)) == strip(read_log(tmp_path / "full"))
    evals = [r for r in read_log(tmp_path / "full") if r["split"] == "eval"]
    lowest = min(evals, key=lambda r: r["loss"])
    assert [r["step"] for r in evals] == [2, 4, 6, 8]
    assert lowest["step"] <= 4 and all(r["loss"] > lowest["loss"] for r in evals if r["step"] > 4)  # the case
    expected = {k: lowest[k] for k in ("step", "loss", "perplexity")}
    assert resumed["best"] == full["best"] == expected
    assert json.loads((part / "metrics.json").read_text())["best"] == expected


def test_blend_surgery_from_pretrained(clm_velu_run, corpus, tmp_path):
    pretrained, _ = clm_velu_run
    out = tmp_path / "blend"
    summary = run("clm", text_args(corpus, out, "--model_name_or_path", str(pretrained), "--activation", "gem",
                                   "--blend_steps", "2", "--max_train_steps", "3", "--eval_steps", "3"))
    assert summary["activation"] == "gem" and summary["steps"] == 3
    from transformers import AutoModelForCausalLM

    import hf_gemact

    model = AutoModelForCausalLM.from_pretrained(out)
    assert any(isinstance(m, hf_gemact.GEM) for m in model.modules())
    assert not any(type(m).__name__ == "BlendedActivation" for m in model.modules())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_report_the_one_process_loss(corpus, tmp_path):
    # 6000 characters of validation text -> an odd number of blocks, so the 2-process eval pads
    # its last batch and gather_for_metrics must drop the duplicates.
    out2 = tmp_path / "two"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(SCRIPTS / "run_clm.py"), *text_args(corpus, out2, *GPT2_TINY, "--max_train_steps", "3",
                                                    "--per_device_eval_batch_size", "3")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    two = json.loads((out2 / "metrics.json").read_text())
    assert two["num_processes"] == 2 and two["steps"] == 3
    assert two["tokens_seen"] == 3 * 2 * 4 * 32
    # sparsity: 8 eval batches of 3 blocks per process, summed over both (1 block, 128 units)
    assert two["activation_sparsity"]["values"] == 2 * 8 * 3 * 32 * 128
    one = run("clm", text_args(corpus, tmp_path / "one", "--model_name_or_path", str(out2),
                               "--block_size", "32", "--max_train_steps", "0", "--no_save_model"))
    assert one["num_processes"] == 1 and one["steps"] == 0
    assert math.isclose(two["final"]["loss"], one["final"]["loss"], rel_tol=1e-6)
    assert math.isclose(two["final"]["loss"], independent_clm_loss(out2, corpus / "valid.txt", 32), rel_tol=1e-5)


# ----------------------------------------------------------------------------- masked LM, images


def test_mlm_end_to_end_and_fixed_validation_masks(corpus, tmp_path):
    a = run("mlm", text_args(corpus, tmp_path / "a", *BERT_TINY, "--activation", "gem", "--max_train_steps", "4",
                             "--seed", "1"))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    b = run("mlm", text_args(corpus, tmp_path / "b", *BERT_TINY, "--activation", "velu", "--max_train_steps", "2",
                             "--seed", "2"))
    assert a["task"] == "mlm" and a["activation"] == "gem" and a["eval_mask_seed"] == 1234
    # the saved model scored here, without the training code, on the documented validation masks
    ref, masked = independent_mlm_loss(tmp_path / "a", corpus / "valid.txt", 32)
    assert math.isclose(a["final"]["loss"], ref, rel_tol=1e-5)
    assert math.isclose(a["final"]["perplexity"], math.exp(ref), rel_tol=1e-5)
    eval_a = [r for r in read_log(tmp_path / "a") if r["split"] == "eval"][-1]
    eval_b = [r for r in read_log(tmp_path / "b") if r["split"] == "eval"][-1]
    assert eval_a["eval_tokens"] == eval_b["eval_tokens"] == masked  # same masked positions, any seed/activation
    # and the masks themselves are a function of (eval_mask_seed, example index) only
    from hf_gemact.training.tasks import mask_tokens
    import numpy as np

    ids, special = list(range(10, 42)), [1] + [0] * 30 + [1]
    x1 = mask_tokens(ids, special, np.random.default_rng([1234, 0, 5]), 0.15, 4, 300)
    x2 = mask_tokens(ids, special, np.random.default_rng([1234, 0, 5]), 0.15, 4, 300)
    assert all((u == v).all() for u, v in zip(x1, x2)) and (x1[1] != -100).sum() >= 1


def test_image_classification_fashion_mnist(shared_data, tmp_path):
    out = tmp_path / "vit"
    s = run("image", ["--output_dir", str(out), *VIT_TINY, "--activation", "segem", "--max_train_samples", "64",
                      "--max_eval_samples", "50", "--max_train_steps", "4", "--per_device_train_batch_size", "16",
                      "--per_device_eval_batch_size", "16", "--learning_rate", "1e-3"])
    assert s["task"] == "image" and s["activation"] == "segem" and s["samples_seen"] == 64
    # the saved model on the first 50 test images, read from the IDX files here, scaled to [-1, 1]
    import gzip

    import numpy as np

    raw = {}
    for kind, offset in (("images", 16), ("labels", 8)):
        with gzip.open(shared_data / "fashion-mnist" / f"t10k-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz") as f:
            raw[kind] = np.frombuffer(f.read(), dtype=np.uint8, offset=offset)
    pixels = torch.from_numpy((raw["images"][: 50 * 784].reshape(50, 1, 28, 28) / 255 - 0.5) / 0.5).float()
    loss, accuracy = independent_image_scores(out, pixels, torch.from_numpy(raw["labels"][:50].astype(np.int64)))
    assert s["final"]["accuracy"] == accuracy and math.isclose(s["final"]["loss"], loss, rel_tol=1e-5)
    assert s["labels"][0] == "T-shirt/top"
    assert (out / "preprocessor_config.json").is_file() and (out / "model.safetensors").is_file()


def test_image_classification_from_image_folders(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for label, level in (("dark", 40), ("light", 210)):
            d = tmp_path / split / label
            d.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(level, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    s = run("image", ["--train_file", str(tmp_path / "train"), "--validation_file", str(tmp_path / "val"),
                      "--output_dir", str(tmp_path / "out"), *VIT_TINY, "--max_train_steps", "3",
                      "--per_device_train_batch_size", "4", "--learning_rate", "1e-3"])
    assert s["labels"] == ["dark", "light"]
    assert [r for r in read_log(tmp_path / "out") if r["split"] == "eval"][-1]["eval_samples"] == 6
    # the saved model on the 6 validation images, prepared by its saved image processor
    from transformers import AutoImageProcessor

    files = sorted((tmp_path / "val").glob("*/*.png"))
    pixels = AutoImageProcessor.from_pretrained(tmp_path / "out")(
        [np.asarray(Image.open(f).convert("RGB")) for f in files], return_tensors="pt")["pixel_values"]
    labels = torch.tensor([["dark", "light"].index(f.parent.name) for f in files])
    loss, accuracy = independent_image_scores(tmp_path / "out", pixels, labels)
    assert s["final"]["accuracy"] == accuracy and math.isclose(s["final"]["loss"], loss, rel_tol=1e-5)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case", ["missing", "empty", "too_small", "activation", "output_dir", "resume"])
def test_bad_input_fails_before_training(case, corpus, tmp_path, shared_data):
    out = tmp_path / "out"
    tok = ["--tokenizer_name", str(shared_data / "gpt2-tokenizer")]
    args = text_args(corpus, out, *GPT2_TINY, *tok, "--max_train_steps", "1")
    expected = {
        "missing": "no such file", "empty": "the file is empty", "too_small": "too small for one block",
        "activation": "not a known activation", "output_dir": "exists and is not empty",
        "resume": "is not a checkpoint",
    }[case]
    if case == "missing":
        args[1] = str(tmp_path / "nope.txt")
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("\n  \n")
        args[1] = str(tmp_path / "empty.txt")
    elif case == "too_small":
        (tmp_path / "small.txt").write_text("To be, or not to be.\n")
        args[3] = str(tmp_path / "small.txt")
    elif case == "activation":
        args += ["--activation", "gemm_n2"]
    elif case == "output_dir":
        out.mkdir()
        (out / "something").write_text("x")
    elif case == "resume":
        (tmp_path / "notackpt").mkdir()
        args += ["--resume_from_checkpoint", str(tmp_path / "notackpt")]
    with pytest.raises(UsageError, match=expected):
        run("clm", args)
    assert not (out / "log.jsonl").exists()


def test_script_prints_the_message_and_exits_2(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPTS / "run_clm.py"), "--output_dir", str(tmp_path / "o"),
                          "--activation", "nope"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "error: --activation 'nope' is not a known activation" in res.stderr
    assert "gem_n3" in res.stderr  # the grammar is shown


def test_latest_never_picks_an_incomplete_checkpoint(tmp_path):
    # Training positions: epoch_0 ends at step 3, epoch_1 at step 6; by name alone step_5 or epoch_1
    # would come first or last depending on how names sort, by position the order is fixed.
    for name, step in (("step_2", 2), ("epoch_0", 3), ("step_4", 4), ("step_5", 5), ("epoch_1", 6)):
        (tmp_path / name).mkdir()
        (tmp_path / name / checkpoint.STATE_FILE).write_text(json.dumps({"step": step}))
    (tmp_path / "step_7").mkdir()  # killed before the state file was written
    (tmp_path / ".tmp-step_8").mkdir()  # killed during save_state
    (tmp_path / ".tmp-step_8" / "model.safetensors").write_bytes(b"partial")
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_2", "epoch_0", "step_4", "step_5",
                                                                       "epoch_1"]
    assert checkpoint.resolve("latest", tmp_path / "empty") is None
    with pytest.raises(UsageError, match="not a checkpoint"):
        checkpoint.resolve(str(tmp_path / "step_7"), tmp_path)
    with pytest.raises(UsageError, match="no such folder"):
        checkpoint.resolve(str(tmp_path / "step_99"), tmp_path)


# ----------------------------------------------------------------------------- recipes


def _documented_commands():
    text = (REPO / "docs" / "TRAINING.md").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if "train_scripts/run_" in line
            and line.strip().startswith(("accelerate launch", "python", "for ", "ACCELERATE"))]


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.stem: load_config_from_file(str(p)) for p in sorted((SCRIPTS / "configs").glob("*.yaml"))}
    assert set(configs) >= {"ddp_8gpu", "fsdp_8gpu", "ddp_1gpu", "cpu_2proc"}
    assert configs["ddp_8gpu"].distributed_type == "MULTI_GPU" and configs["ddp_8gpu"].num_processes == 8
    assert configs["ddp_8gpu"].mixed_precision == "bf16"
    fsdp = configs["fsdp_8gpu"]
    assert fsdp.distributed_type == "FSDP" and fsdp.num_processes == 8
    assert fsdp.fsdp_config["fsdp_version"] == 2 and fsdp.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert configs["cpu_2proc"].num_processes == 2 and configs["cpu_2proc"].use_cpu  # launched: test_distributed.py


def test_documented_commands_parse():
    import shlex

    commands = _documented_commands()
    assert len(commands) >= 4
    for cmd in commands:
        words = shlex.split(cmd)
        i = next(k for k, w in enumerate(words) if w.startswith("train_scripts/run_"))
        script = Path(words[i]).stem
        task = {"run_clm": "clm", "run_mlm": "mlm", "run_image_classification": "image"}[script]
        argv = [w.replace("$seed", "1").replace("$act", "gem") for w in words[i + 1:]]
        args = build_parser(task).parse_args(argv)
        if args.activation:
            check_activation(args.activation)
        if "--config_file" in words:
            assert (REPO / words[words.index("--config_file") + 1]).is_file()
