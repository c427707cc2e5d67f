"""Distillation recovery in the training scripts (issue 13 item 2): `--distill_weight W` adds
W x T^2 x KL(teacher || student), the teacher being the pretrained checkpoint before surgery.

The gradient tests recover the gradient the loop used from one AdamW step (with lr = eps = 1 the
first step moves a weight by g / (|g| + 1)) and compare it with the gradient of task loss +
W x T^2 x KL computed here, in float64, from freshly loaded teacher and student models.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hf_gemact
from hf_gemact.training import UsageError, main, run
from conftest import reset_accelerate_state as _reset_accelerate
from conftest import shakespeare_split
from test_training import read_log

REPO = Path(__file__).resolve().parents[1]
WEIGHT, TEMPERATURE = 3.0, 2.0
BLOCK = 32
# One AdamW step whose update gives back the gradient: lr = eps = 1, constant, no clipping, no decay.
ONE_INVERTIBLE_STEP = ["--max_train_steps", "1", "--learning_rate", "1", "--adam_epsilon", "1",
                       "--lr_scheduler_type", "constant", "--max_grad_norm", "0"]
DISTILL = ["--activation", "gem", "--distill_weight", str(WEIGHT), "--distill_temperature", str(TEMPERATURE)]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # conftest.py


# ----------------------------------------------------------------------------- the independent computation


def independent_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 x mean over rows of sum_v p_t(v) (log p_t(v) - log p_s(v)), p = softmax(logits / T), float64."""
    log_p_t = torch.log_softmax(teacher_logits.double() / temperature, dim=-1)
    log_p_s = torch.log_softmax(student_logits.double() / temperature, dim=-1)
    return temperature ** 2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()


def recovered_gradients(before: torch.nn.Module, after: torch.nn.Module) -> dict:
    """g from one AdamW step with lr = eps = 1: u = before - after = g / (|g| + 1)."""
    new = dict(after.named_parameters())
    grads = {}
    for name, p in before.named_parameters():
        u = (p.detach() - new[name].detach()).double()
        grads[name] = u / (1 - u.abs())
    return grads


def reference_gradients(auto_class, ckpt: Path, inputs: dict, task_loss, scored) -> tuple[dict, dict]:
    """Gradients of task + W x T^2 x KL and of the task loss alone, float64, for the student (the
    checkpoint patched to GEM, training mode) against the teacher (the checkpoint, eval mode)."""
    teacher = auto_class.from_pretrained(ckpt).double().eval()
    student = auto_class.from_pretrained(ckpt).double()
    hf_gemact.patch_activations(student, "gem")
    student.train()
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    student_logits = student(**inputs).logits
    task = task_loss(student_logits)
    kl = independent_kl(scored(student_logits), scored(teacher_logits), TEMPERATURE)
    names, params = zip(*student.named_parameters())
    with_kl = torch.autograd.grad(task + WEIGHT * kl, params, retain_graph=True)
    without = torch.autograd.grad(task, params)
    return dict(zip(names, with_kl)), dict(zip(names, without))


def assert_update_carries_the_distillation_gradient(got: dict, with_kl: dict, without: dict) -> None:
    assert got.keys() == with_kl.keys()
    # the distillation term changes the gradient by far more than the tolerance below
    assert max((with_kl[n] - without[n]).abs().max().item() for n in got) > 1e-3
    for name in got:
        torch.testing.assert_close(got[name], with_kl[name], rtol=1e-3, atol=2e-6, msg=name)


@pytest.fixture
def captured(monkeypatch):
    """What run() builds: every task Setup (model, data, teacher) and every AdamW optimizer."""
    from hf_gemact.training import tasks

    seen = {"setups": [], "optimizers": []}
    for name, cls in list(tasks.TASKS.items()):
        class Spy(cls):
            def setup(self, args, accelerator):
                setup = super().setup(args, accelerator)
                seen["setups"].append(setup)
                return setup

        monkeypatch.setitem(tasks.TASKS, name, Spy)

    class RecordedAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["optimizers"].append(self)

    monkeypatch.setattr(torch.optim, "AdamW", RecordedAdamW)
    return seen


# ----------------------------------------------------------------------------- pretrained checkpoints


@pytest.fixture(scope="module")
def text_files(tmp_path_factory, shared_data):
    d = shakespeare_split(tmp_path_factory, shared_data, "distill_text", 20_000, 3_000)
    return d, (d / "train.txt").read_text()


def small_tokenizer(text: str, **specials):
    """A byte-level BPE of 300 tokens trained on `text` (small: datasets hashes the tokenizer each
    run, and a 50k vocabulary makes that the slowest part of a tiny run)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text.splitlines(keepends=True), vocab_size=300, min_frequency=2,
                            special_tokens=list(dict.fromkeys(specials.values())), show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, **specials)


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory, text_files):
    """A tiny GPT-2 with its tokenizer, no dropout; weights wide enough (initializer_range) that its
    output distributions are far from uniform, so the activation change shows in them."""
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("gpt2_ckpt")
    end = "<|endoftext|>"
    tok = small_tokenizer(text_files[1], bos_token=end, eos_token=end, unk_token=end)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=16, n_head=2, n_positions=BLOCK, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3)
    GPT2LMHeadModel(config).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def clm_argv(text_files, ckpt, out, *extra):
    d, _ = text_files
    return ["--model_name_or_path", str(ckpt), "--train_file", str(d / "train.txt"), "--validation_file",
            str(d / "valid.txt"), "--block_size", str(BLOCK), "--max_eval_samples", "4", "--output_dir", str(out),
            *extra]


def first_blocks(text: str, tokenizer, n: int) -> torch.Tensor:
    """The first n blocks of the training file, tokenized line by line as datasets' text loader reads it."""
    ids = [t for line in text.splitlines(keepends=True) for t in tokenizer(line)["input_ids"]]
    return torch.tensor(ids[: n * BLOCK]).view(n, BLOCK)


# ----------------------------------------------------------------------------- gradients


def test_clm_update_carries_the_distillation_gradient_and_the_teacher_stays_frozen(
        gpt2_checkpoint, text_files, tmp_path, captured):
    """Accumulation 2 x batch 2: each micro-batch's distillation mean has the task loss's weight, so
    the step's gradient is that of the mean over the 4 blocks (equal token counts)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    run("clm", clm_argv(text_files, gpt2_checkpoint, out, *DISTILL, *ONE_INVERTIBLE_STEP,
                        "--max_train_samples", "4", "--per_device_train_batch_size", "2",
                        "--gradient_accumulation_steps", "2"))
    before = AutoModelForCausalLM.from_pretrained(gpt2_checkpoint)
    got = recovered_gradients(before, AutoModelForCausalLM.from_pretrained(out))

    inputs = first_blocks(text_files[1], AutoTokenizer.from_pretrained(gpt2_checkpoint), 4)
    with_kl, without = reference_gradients(
        AutoModelForCausalLM, gpt2_checkpoint, {"input_ids": inputs},
        task_loss=lambda logits: F.cross_entropy(logits[:, :-1].flatten(0, 1), inputs[:, 1:].flatten()),
        scored=lambda logits: logits[:, :-1].flatten(0, 1))  # every next-token prediction is scored here
    assert_update_carries_the_distillation_gradient(got, with_kl, without)

    # The teacher: the unpatched checkpoint, frozen, in eval mode, outside the optimizer, unchanged.
    (setup,) = captured["setups"]
    teacher = setup.teacher
    assert teacher is not None and not teacher.training
    assert not any(isinstance(m, hf_gemact.GEM) for m in teacher.modules())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for name, p in before.named_parameters():
        assert torch.equal(teacher.get_parameter(name), p), name
    (optimizer,) = captured["optimizers"]
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert optimized == {id(p) for p in setup.model.parameters()}

    # log.jsonl: the parts apart, the optimised loss their weighted sum; metrics.json: the settings.
    (train,) = [r for r in read_log(out) if r["split"] == "train"]
    assert train["aux_loss"] == 0.0 and train["distill_loss"] > 0
    assert math.isclose(train["loss"], train["task_loss"] + WEIGHT * train["distill_loss"], rel_tol=1e-12)
    on_disk = json.loads((out / "metrics.json").read_text())["distillation"]
    assert on_disk["weight"] == WEIGHT and on_disk["temperature"] == TEMPERATURE
    assert math.isclose(on_disk["mean_loss"], train["distill_loss"], rel_tol=1e-12)  # one step: one window


@pytest.fixture(scope="module")
def bert_checkpoint(tmp_path_factory, text_files):
    """A tiny BERT masked LM with a tokenizer that has the special tokens masked LM needs."""
    from transformers import BertConfig, BertForMaskedLM

    d = tmp_path_factory.mktemp("bert_ckpt")
    tok = small_tokenizer(text_files[1], cls_token="<cls>", sep_token="<sep>", mask_token="<mask>",
                          pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=BLOCK, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, initializer_range=0.3, pad_token_id=tok.pad_token_id)
    BertForMaskedLM(config).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_mlm_update_carries_the_distillation_gradient_of_the_masked_positions(
        bert_checkpoint, text_files, tmp_path, captured):
    from transformers import AutoModelForMaskedLM

    out = tmp_path / "out"
    d, _ = text_files
    run("mlm", ["--model_name_or_path", str(bert_checkpoint), "--train_file", str(d / "train.txt"),
                "--validation_file", str(d / "valid.txt"), "--max_seq_length", str(BLOCK), "--max_eval_samples", "4",
                "--max_train_samples", "4", "--per_device_train_batch_size", "4", "--output_dir", str(out),
                *DISTILL, *ONE_INVERTIBLE_STEP])
    got = recovered_gradients(AutoModelForMaskedLM.from_pretrained(bert_checkpoint),
                              AutoModelForMaskedLM.from_pretrained(out))

    # The step's one batch: the 4 training examples with their epoch-0 masks, from the data pipeline.
    (setup,) = captured["setups"]
    rows = [setup.train_dataset[i] for i in range(4)]
    inputs = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask")}
    masked = torch.stack([r["labels"] for r in rows])
    assert 0 < int((masked != -100).sum()) < masked.numel() // 2  # a real subset of the positions
    with_kl, without = reference_gradients(
        AutoModelForMaskedLM, bert_checkpoint, inputs,
        task_loss=lambda logits: F.cross_entropy(logits[masked != -100], masked[masked != -100]),
        scored=lambda logits: logits[masked != -100])
    assert_update_carries_the_distillation_gradient(got, with_kl, without)


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory):
    """28x28 grayscale images in two classes, and a tiny ViT checkpoint for them (no processor)."""
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification

    root = tmp_path_factory.mktemp("distill_images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1)):
        for label, level in (("dark", 70), ("light", 180)):
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(level, 40, (28, 28)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "L").save(root / split / label / f"{i}.png")
    torch.manual_seed(0)
    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=2, initializer_range=0.3)
    ViTForImageClassification(config).save_pretrained(root / "ckpt")
    return root


def test_image_update_carries_the_distillation_gradient_of_the_classes(image_folders, tmp_path):
    from PIL import Image
    from transformers import AutoModelForImageClassification

    out = tmp_path / "out"
    ckpt = image_folders / "ckpt"
    run("image", ["--model_name_or_path", str(ckpt), "--train_dir", str(image_folders / "train"),
                  "--validation_dir", str(image_folders / "val"), "--per_device_train_batch_size", "4",
                  "--output_dir", str(out), *DISTILL, *ONE_INVERTIBLE_STEP])
    got = recovered_gradients(AutoModelForImageClassification.from_pretrained(ckpt),
                              AutoModelForImageClassification.from_pretrained(out))

    # the 4 training images (one batch), scaled to [-1, 1] as a 0.5 mean / 0.5 std processor does
    files = sorted((image_folders / "train").glob("*/*.png"))
    pixels = torch.stack([torch.from_numpy((np.asarray(Image.open(f), dtype=np.float64) / 255 - 0.5) / 0.5)[None]
                          for f in files])
    labels = torch.tensor([["dark", "light"].index(f.parent.name) for f in files])
    with_kl, without = reference_gradients(
        AutoModelForImageClassification, ckpt, {"pixel_values": pixels},
        task_loss=lambda logits: F.cross_entropy(logits, labels), scored=lambda logits: logits)
    assert_update_carries_the_distillation_gradient(got, with_kl, without)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("task, pretrained, extra, message", [
    ("clm", False, ["--distill_weight", "1"], "--distill_weight needs --model_name_or_path and --activation"),
    ("mlm", False, ["--distill_weight", "1", "--activation", "gem"], "--distill_weight needs --model_name_or_path"),
    ("image", False, ["--distill_weight", "1", "--activation", "gem"], "--distill_weight needs --model_name_or_path"),
    ("clm", True, ["--distill_weight", "1"], "--distill_weight needs --model_name_or_path and --activation"),
    ("clm", False, ["--distill_temperature", "2"], "--distill_temperature 2.0 has no effect without --distill_weight"),
    ("clm", True, ["--activation", "gem", "--distill_weight", "-1"], "--distill_weight -1.0: must be a finite number >= 0"),
    ("clm", True, ["--activation", "gem", "--distill_weight", "nan"], "--distill_weight nan: must be a finite number >= 0"),
    ("clm", True, ["--activation", "gem", "--distill_weight", "1", "--distill_temperature", "0"],
     "--distill_temperature 0.0: must be a finite number > 0"),
    ("clm", True, ["--calibration_samples", "4"], "--calibration_samples needs --model_name_or_path and --activation"),
    ("clm", False, ["--calibration_samples", "4", "--activation", "gem"], "--calibration_samples needs --model_name_or_path"),
    ("clm", True, ["--activation", "gem", "--calibration_samples", "4", "--blend_steps", "1"],
     "--calibration_samples and --blend_steps do not go together"),
    ("clm", True, ["--activation", "gem", "--calibration_samples", "-1"], "--calibration_samples -1: must be >= 0"),
])
def test_distillation_without_a_teacher_or_with_bad_numbers_is_refused(task, pretrained, extra, message, gpt2_checkpoint,
                                                                      text_files, image_folders, tmp_path, capsys):
    """Refused before any work. (Each command names real, tiny data and one step, so that a run
    which is not refused ends quickly and fails the test.)"""
    from test_training import BERT_TINY, GPT2_TINY, VIT_TINY

    out = tmp_path / "out"
    if pretrained:
        data = clm_argv(text_files, gpt2_checkpoint, out)
    elif task == "image":
        data = ["--train_dir", str(image_folders / "train"), "--validation_dir", str(image_folders / "val"),
                *VIT_TINY, "--output_dir", str(out)]
    else:
        d, _ = text_files
        data = ["--train_file", str(d / "train.txt"), "--validation_file", str(d / "valid.txt"),
                *(GPT2_TINY if task == "clm" else BERT_TINY), "--output_dir", str(out)]
    assert main(task, [*data, "--max_train_steps", "1", "--per_device_train_batch_size", "2", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not out.exists()


def test_a_tokenizer_larger_than_the_teachers_vocabulary_is_refused(gpt2_checkpoint, text_files, tmp_path):
    from transformers import AutoTokenizer

    bigger = AutoTokenizer.from_pretrained(gpt2_checkpoint)
    rows = len(bigger)
    bigger.add_tokens(["<new>"])
    bigger.save_pretrained(tmp_path / "tok")
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=f"the tokenizer has {rows + 1} tokens, the checkpoint's vocabulary {rows}"):
        run("clm", clm_argv(text_files, gpt2_checkpoint, out, *DISTILL, "--tokenizer_name", str(tmp_path / "tok"),
                            "--max_train_steps", "1"))
    assert not (out / "log.jsonl").exists()


# ----------------------------------------------------------------------------- calibrated surgery


def test_calibration_samples_calibrate_the_patch_on_the_first_training_blocks(gpt2_checkpoint, text_files, tmp_path):
    """--calibration_samples K: the saved model is the checkpoint patched with calibrate= the first
    K training blocks in training batches (computed here through the library on blocks tokenized
    here), and metrics.json's surgery note shows the calibration."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    run("clm", clm_argv(text_files, gpt2_checkpoint, out, "--activation", "egem_n2", "--calibration_samples", "4",
                        "--per_device_train_batch_size", "2", "--max_train_steps", "0"))
    blocks = first_blocks(text_files[1], AutoTokenizer.from_pretrained(gpt2_checkpoint), 4)
    expected = AutoModelForCausalLM.from_pretrained(gpt2_checkpoint).eval()
    report = hf_gemact.patch_activations(expected, "egem_n2", calibrate=[
        {"input_ids": blocks[i:i + 2], "attention_mask": torch.ones_like(blocks[i:i + 2])} for i in (0, 2)])
    saved = AutoModelForCausalLM.from_pretrained(out)
    (change,) = report.changes
    assert change.new != "egem" and saved.config.activation_function == change.new
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[key], value, rtol=0, atol=0, msg=key)
    original = AutoModelForCausalLM.from_pretrained(gpt2_checkpoint)
    assert not torch.equal(saved.transformer.h[0].mlp.c_proj.bias, original.transformer.h[0].mlp.c_proj.bias)
    note = json.loads((out / "metrics.json").read_text())["surgery"]
    assert "calibration" in note and change.new in note and "c_proj" in note


# ----------------------------------------------------------------------------- resume, processes


RESUMABLE = [*DISTILL, "--max_train_samples", "8", "--per_device_train_batch_size", "2", "--max_train_steps", "4",
             "--checkpointing_steps", "2", "--eval_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-2"]


def test_distilled_run_resumes_exactly(gpt2_checkpoint, text_files, tmp_path):
    full = run("clm", clm_argv(text_files, gpt2_checkpoint, tmp_path / "full", *RESUMABLE))
    part = tmp_path / "part"
    assert run("clm", clm_argv(text_files, gpt2_checkpoint, part, *RESUMABLE, "--stop_after_steps", "3")) == {
        "stopped_at": 3}
    _reset_accelerate()
    # the weight defines the run: another one cannot continue it
    with pytest.raises(UsageError, match=r"--distill_weight 3.0 -> 1.0"):
        run("clm", clm_argv(text_files, gpt2_checkpoint, part, *RESUMABLE, "--distill_weight", "1",
                            "--resume_from_checkpoint", "latest"))
    _reset_accelerate()
    resumed = run("clm", clm_argv(text_files, gpt2_checkpoint, part, *RESUMABLE, "--resume_from_checkpoint", "latest"))
    assert resumed["resumed_from"].endswith("step_2")
    assert resumed["final"] == full["final"] and resumed["best"] == full["best"]
    assert math.isclose(resumed["distillation"]["mean_loss"], full["distillation"]["mean_loss"], rel_tol=1e-12)
    strip = lambda log: [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in log]  # noqa: E731
    log = strip(read_log(part))
    assert log == strip(read_log(tmp_path / "full"))
    train = [r for r in log if r["split"] == "train"]
    assert len(train) == 4 and all(r["distill_loss"] > 0 for r in train)
    # the mean over the run is the mean of the 4 one-step windows (1 micro-batch each)
    assert math.isclose(full["distillation"]["mean_loss"], sum(r["distill_loss"] for r in train) / 4, rel_tol=1e-12)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # starts 2 processes (~30-60 s on 2 cores)
def test_two_processes_distill_like_one_with_twice_the_batch(gpt2_checkpoint, text_files, tmp_path):
    """Each process averages its own scored positions, DDP averages the gradients: with equal token
    counts per process that is the 1-process mean over the doubled batch."""
    from safetensors.torch import load_file

    # The attention key bias has a gradient of exactly 0 (softmax ignores a shift shared by all
    # keys), so what it gets is float noise that differs with the summation order; Adam divides it
    # by its own size, into steps of up to the learning rate. A larger epsilon keeps that noise a
    # noise; every other weight's update is unaffected in kind.
    common = [*DISTILL, "--max_train_samples", "12", "--max_train_steps", "3", "--logging_steps", "1",
              "--learning_rate", "1e-2", "--adam_epsilon", "1e-5", "--seed", "3"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(REPO / "train_scripts" / "run_clm.py"),
           *clm_argv(text_files, gpt2_checkpoint, tmp_path / "two", *common, "--per_device_train_batch_size", "2")]
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    one = run("clm", clm_argv(text_files, gpt2_checkpoint, tmp_path / "one", *common,
                              "--per_device_train_batch_size", "4"))
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["num_processes"] == 2 and one["num_processes"] == 1 and two["steps"] == one["steps"] == 3

    def curves(out):
        train = [r for r in read_log(out) if r["split"] == "train"]
        return {k: torch.tensor([r[k] for r in train]) for k in ("loss", "task_loss", "distill_loss")}

    got, expected = curves(tmp_path / "two"), curves(tmp_path / "one")
    assert len(got["loss"]) == 3 and (got["distill_loss"] > 0).all()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=0, msg=key)
    assert math.isclose(two["distillation"]["mean_loss"], one["distillation"]["mean_loss"], rel_tol=1e-5)
    w1, w2 = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=2e-5, msg=key)
