"""Training runs that must refuse, stop or clean up instead of going silently wrong (issue 17), and
the HF no_trainer flags the scripts share (issue 12 item 7). Tiny models on CPU, seconds each."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_gemact.training import UsageError, checkpoint, main, run
from hf_gemact.training.args import build_parser, validate
from test_training import BERT_TINY, GPT2_TINY, VIT_TINY, read_log, text_args

REPO = Path(__file__).resolve().parents[1]
# the run the resume / overwrite / corruption tests start from (see finished_run)
CLM_RUN = [*GPT2_TINY, "--max_train_steps", "4", "--checkpointing_steps", "2", "--eval_steps", "2"]


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_GEMACT_CACHE", str(tmp_path_factory.getbasetemp() / "hf_gemact_cache"))
    _reset_accelerate()
    yield
    _reset_accelerate()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data):
    text = (shared_data / "text" / "tinyshakespeare.txt").read_text()
    d = tmp_path_factory.mktemp("corpus")
    (d / "train.txt").write_text(text[:40_000])
    (d / "valid.txt").write_text(text[-6_000:])
    return d


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory):
    """A complete tiny GEM run: checkpoints step_2 and step_4, model, tokenizer, tensorboard logs."""
    _reset_accelerate()
    os.environ.setdefault("HF_GEMACT_CACHE", str(tmp_path_factory.getbasetemp() / "hf_gemact_cache"))
    out = tmp_path_factory.mktemp("finished") / "out"
    start = time.perf_counter()
    summary = run("clm", text_args(corpus, out, *CLM_RUN, "--activation", "gem", "--with_tracking",
                                   "--report_to", "tensorboard"))
    return out, summary, time.perf_counter() - start


def copy_run(src: Path, dst: Path, drop=()) -> Path:
    shutil.copytree(src, dst)
    for name in drop:
        path = dst / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return dst


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def resume_argv(corpus, out, *extra):
    return text_args(corpus, out, *CLM_RUN, "--activation", "gem", "--resume_from_checkpoint", "latest", *extra)


# ----------------------------------------------------------------------------- flags (issue 12.7)


NEW_FLAGS = {
    "clm": ["--text_column_name", "--validation_split_percentage", "--use_slow_tokenizer", "--trust_remote_code",
            "--ignore_mismatched_sizes", "--checkpointing_steps", "--save_total_limit", "--report_to"],
    "mlm": ["--text_column_name", "--validation_split_percentage", "--line_by_line", "--pad_to_max_length",
            "--use_slow_tokenizer", "--trust_remote_code", "--ignore_mismatched_sizes", "--save_total_limit",
            "--report_to"],
    "image": ["--train_dir", "--validation_dir", "--validation_split_percentage", "--trust_remote_code",
              "--ignore_mismatched_sizes", "--save_total_limit", "--report_to"],
}


@pytest.mark.parametrize("task", ["clm", "mlm", "image"])
def test_help_lists_every_new_flag(task, capsys):
    with pytest.raises(SystemExit) as done:
        main(task, ["--help"])  # what `python train_scripts/run_*.py --help` runs
    assert done.value.code == 0
    shown = capsys.readouterr().out
    for flag in NEW_FLAGS[task]:
        assert flag in shown, flag


def _text_args(**kw):
    args = build_parser("clm").parse_args(["--output_dir", "unused"])
    vars(args).update(kw)
    return args


def test_validation_split_is_the_first_percent_of_train(tmp_path):
    import datasets

    from hf_gemact.training import data

    lines = [f"line number {i}\n" for i in range(203)]  # 7% of 203 = 14.21 rows -> 14
    (tmp_path / "all.txt").write_text("".join(lines))
    args = _text_args(train_file=str(tmp_path / "all.txt"), validation_split_percentage=7)
    raw, column = data.load_raw_text(args)
    # HF's examples slice the split with datasets' own percent syntax: that is the reference.
    files = {"train": str(tmp_path / "all.txt")}
    ref_val = datasets.load_dataset("text", data_files=files, split="train[:7%]", keep_linebreaks=True)
    ref_train = datasets.load_dataset("text", data_files=files, split="train[7%:]", keep_linebreaks=True)
    assert list(raw["validation"][column]) == list(ref_val["text"]) == lines[:14]
    assert list(raw["train"][column]) == list(ref_train["text"]) == lines[14:]


def test_text_column_is_never_an_id_column(tmp_path):
    from hf_gemact.training import data

    bodies = ["the first body of text", "another body, with a comma", "a third"]
    (tmp_path / "id_body.csv").write_text("id,body\n" + "".join(f'{i},"{b}"\n' for i, b in enumerate(bodies)))
    (tmp_path / "two.csv").write_text("title,body\n" + "".join(f'title {i},"{b}"\n' for i, b in enumerate(bodies)))
    split = {"validation_split_percentage": 34}

    raw, column = data.load_raw_text(_text_args(train_file=str(tmp_path / "id_body.csv"), **split))
    assert column == "body" and list(raw["validation"]["body"]) + list(raw["train"]["body"]) == bodies
    with pytest.raises(UsageError, match=r"column 'id' holds .*int64.*not text"):
        data.load_raw_text(_text_args(train_file=str(tmp_path / "id_body.csv"), text_column_name="id", **split))
    with pytest.raises(UsageError, match=r"2 text-typed columns \(columns: title \(\w*string\), body \(\w*string\)\); "
                                         r"pass --text_column_name"):
        data.load_raw_text(_text_args(train_file=str(tmp_path / "two.csv"), **split))
    raw, column = data.load_raw_text(_text_args(train_file=str(tmp_path / "two.csv"), text_column_name="title",
                                                **split))
    assert column == "title" and list(raw["train"]["title"]) == ["title 1", "title 2"]
    with pytest.raises(UsageError, match="--text_column_name 'text': the training data has no such column"):
        data.load_raw_text(_text_args(train_file=str(tmp_path / "two.csv"), text_column_name="text", **split))


def test_mlm_line_by_line_examples_are_the_lines(corpus, tmp_path, shared_data):
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from hf_gemact.training.tasks import MaskedLM

    text = "First line of the file.\n\n   \nA second, much longer line " + "that goes on " * 8 + "\nthird\n"
    (tmp_path / "v.txt").write_text(text)
    seq = 12
    argv = ["--output_dir", str(tmp_path / "o"), "--train_file", str(corpus / "train.txt"), "--validation_file",
            str(tmp_path / "v.txt"), *BERT_TINY, "--max_seq_length", str(seq), "--line_by_line"]
    tok = None
    for pad in (False, True):
        args = validate(build_parser("mlm").parse_args(argv + (["--pad_to_max_length"] if pad else [])), "mlm")
        setup = MaskedLM().setup(args, Accelerator(cpu=True))
        tok = tok or AutoTokenizer.from_pretrained(setup.processor.name_or_path)
        # expected, from the tokenizer alone: every non-blank line, CLS + first seq-2 tokens + SEP
        expected = [[tok.cls_token_id] + tok(line, add_special_tokens=False)["input_ids"][: seq - 2]
                    + [tok.sep_token_id] for line in text.splitlines() if line.strip()]
        rows = [setup.eval_dataset[i] for i in range(len(setup.eval_dataset))]
        assert len(rows) == len(expected) == 3
        for row, ids in zip(rows, expected):
            n = int(row["attention_mask"].sum())
            original = torch.where(row["labels"] != -100, row["labels"], row["input_ids"])[:n]
            assert original.tolist() == ids
            assert len(row["input_ids"]) == (seq if pad else len(ids))
            assert (row["labels"][n:] == -100).all() and (row["input_ids"][n:] == tok.pad_token_id).all()
        batch = setup.collate_fn(rows)  # dynamic padding up to the longest line (seq: it was truncated)
        assert batch["input_ids"].shape == (3, seq) and batch["attention_mask"].sum(1).tolist() == [
            len(ids) for ids in expected]
        _reset_accelerate()
    s = run("mlm", text_args(corpus, tmp_path / "run", *BERT_TINY, "--line_by_line", "--max_train_steps", "2"))
    assert s["line_by_line"] is True and s["steps"] == 2 and math.isfinite(s["final"]["loss"])


def test_use_slow_tokenizer_and_trust_remote_code_reach_the_tokenizer(monkeypatch, shared_data):
    from transformers import AutoTokenizer

    from hf_gemact.training.tasks import load_tokenizer

    seen = {}
    real = AutoTokenizer.from_pretrained

    def spy(source, **kwargs):
        seen.update(kwargs)
        return real(source, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    args = build_parser("clm").parse_args(["--output_dir", "x", "--tokenizer_name", str(shared_data / "gpt2-tokenizer"),
                                           "--use_slow_tokenizer", "--trust_remote_code"])
    tokenizer = load_tokenizer(args, None, None, "clm")
    assert seen == {"use_fast": False, "trust_remote_code": True}
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]  # GPT-2's own ids


_REMOTE_CONFIG = """from transformers import GPT2Config


class RemoteGPT2Config(GPT2Config):
    model_type = "remote_gpt2"
"""
_REMOTE_MODEL = """from transformers import GPT2LMHeadModel

from .configuration_remote_gpt2 import RemoteGPT2Config


class RemoteGPT2LMHeadModel(GPT2LMHeadModel):
    config_class = RemoteGPT2Config
"""


def test_trust_remote_code_loads_a_custom_code_checkpoint(finished_run, corpus, tmp_path):
    src, _, _ = finished_run
    model_dir = tmp_path / "remote_model"
    model_dir.mkdir()
    for path in [src / "model.safetensors", *src.glob("tokenizer*"), *src.glob("special_tokens*")]:
        shutil.copy(path, model_dir / path.name)
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="remote_gpt2", architectures=["RemoteGPT2LMHeadModel"],
                  auto_map={"AutoConfig": "configuration_remote_gpt2.RemoteGPT2Config",
                            "AutoModelForCausalLM": "modeling_remote_gpt2.RemoteGPT2LMHeadModel"})
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "configuration_remote_gpt2.py").write_text(_REMOTE_CONFIG)
    (model_dir / "modeling_remote_gpt2.py").write_text(_REMOTE_MODEL)
    argv = text_args(corpus, tmp_path / "out", "--model_name_or_path", str(model_dir), "--block_size", "32",
                     "--max_train_steps", "1")
    with pytest.raises(UsageError, match="holds custom code .*pass --trust_remote_code"):
        run("clm", argv)
    _reset_accelerate()
    s = run("clm", argv + ["--trust_remote_code"])
    assert s["model_type"] == "remote_gpt2" and s["steps"] == 1


# ----------------------------------------------------------------------------- image folders


@pytest.fixture(scope="module")
def rgb_folders(tmp_path_factory):
    """Red and green images of equal luminance: in grayscale the two classes look the same."""
    from PIL import Image

    root = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    colours = {"red": (200, 60, 60), "green": (60, 148, 60)}  # 0.299 R + 0.587 G + 0.114 B: 101.6 vs 111.0
    for split, n in (("train", 6), ("val", 3)):
        for label, rgb in colours.items():
            d = root / split / label
            d.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 10, (28, 28, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "RGB").save(d / f"{i}.png")
    return root


def test_rgb_image_folders_keep_three_channels(rgb_folders, tmp_path):
    import datasets
    from accelerate import Accelerator

    from hf_gemact.training.tasks import ImageClassification

    argv = ["--output_dir", str(tmp_path / "o"), "--train_dir", str(rgb_folders / "train"), "--validation_dir",
            str(rgb_folders / "val"), *VIT_TINY]
    setup = ImageClassification().setup(validate(build_parser("image").parse_args(argv), "image"), Accelerator(cpu=True))
    assert setup.model.config.num_channels == 3
    raw = datasets.load_dataset("imagefolder", data_files={"train": f"{rgb_folders / 'train'}/**"})["train"]
    for i in (0, 7):
        rgb = np.asarray(raw[i]["image"].convert("RGB"), dtype=np.float64)
        expected = torch.from_numpy((rgb / 255 - 0.5) / 0.5).permute(2, 0, 1)  # 28x28 already: no resize
        got = setup.train_dataset[i]["pixel_values"]
        assert got.shape == (3, 28, 28) and torch.allclose(got.double(), expected, atol=1e-6)
    _reset_accelerate()
    s = run("image", argv[:2] + ["--output_dir", str(tmp_path / "run"), "--max_train_steps", "2",
                                 "--per_device_train_batch_size", "4"] + argv[2:])
    assert s["image_channels"] == 3 and s["labels"] == ["green", "red"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["num_channels"] == 3


def test_ignore_mismatched_sizes_is_a_flag(rgb_folders, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    pretrained = tmp_path / "vit10"
    config = ViTConfig(image_size=28, patch_size=7, num_channels=3, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64, num_labels=10)
    ViTForImageClassification(config).save_pretrained(pretrained)
    argv = ["--model_name_or_path", str(pretrained), "--train_dir", str(rgb_folders / "train"), "--validation_dir",
            str(rgb_folders / "val"), "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1"]
    with pytest.raises(UsageError, match="differ in shape .*pass --ignore_mismatched_sizes"):
        run("image", argv)
    assert not (tmp_path / "out" / "log.jsonl").exists()
    _reset_accelerate()
    s = run("image", argv + ["--ignore_mismatched_sizes"])
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert s["steps"] == 1 and len(saved["id2label"]) == 2


# ----------------------------------------------------------------------------- checkpoints


def test_epoch_checkpoints_and_latest_by_training_position(corpus, tmp_path):
    # 12 blocks, batch 4: 3 optimizer steps per epoch, 2 epochs
    common = [*GPT2_TINY, "--max_train_samples", "12", "--num_train_epochs", "2", "--seed", "3"]
    full = run("clm", text_args(corpus, tmp_path / "full", *common, "--checkpointing_steps", "epoch"))
    states = {p.name: checkpoint.read_state(p)["step"] for p in checkpoint.list_checkpoints(tmp_path / "full")}
    assert states == {"epoch_0": 3, "epoch_1": 6}  # HF's naming: epoch_N after epoch N, from 0
    part = tmp_path / "part"
    for extra in (["--checkpointing_steps", "2", "--stop_after_steps", "2"],  # step_2
                  ["--checkpointing_steps", "epoch", "--stop_after_steps", "4", "--resume_from_checkpoint", "latest"]):
        _reset_accelerate()
        run("clm", text_args(corpus, part, *common, *extra))
    assert {p.name for p in checkpoint.list_checkpoints(part)} == {"step_2", "epoch_0"}
    _reset_accelerate()
    # epoch_0 (step 3) is further than step_2, although 0 < 2 and "epoch" < "step"
    resumed = run("clm", text_args(corpus, part, *common, "--resume_from_checkpoint", "latest"))
    assert resumed["resumed_from"].endswith("epoch_0")
    assert resumed["final"] == full["final"] and resumed["tokens_seen"] == full["tokens_seen"]


def test_save_total_limit_keeps_the_newest(corpus, tmp_path):
    limited = tmp_path / "limited"
    run("clm", text_args(corpus, limited, *GPT2_TINY, "--max_train_steps", "5", "--checkpointing_steps", "1",
                         "--save_total_limit", "2"))
    assert sorted(p.name for p in limited.iterdir() if p.name.startswith(("step_", "epoch_", ".tmp"))) == [
        "step_4", "step_5"]


def test_report_to_takes_accelerate_trackers_and_lists(tmp_path):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    from hf_gemact.training.args import check_report_to, trackers

    def args(report_to, tracking=True):
        return build_parser("clm").parse_args(["--output_dir", str(tmp_path), "--report_to", report_to]
                                              + (["--with_tracking"] if tracking else []))

    for name in LOGGER_TYPE_TO_CLASS:  # every tracker accelerate knows is a valid name
        check_report_to(args(name, tracking=False))
    assert trackers(args("tensorboard, wandb ,mlflow")) == ["tensorboard", "wandb", "mlflow"]
    assert trackers(args("tensorboard,all")) == "all" and trackers(args("tensorboard", tracking=False)) is None
    with pytest.raises(UsageError, match="unknown tracker tensorbored"):
        check_report_to(args("tensorboard,tensorbored"))
    if "wandb" not in {str(t) for t in __import__("accelerate.tracking").tracking.get_available_trackers()}:
        with pytest.raises(UsageError, match="--report_to wandb: not installed"):
            check_report_to(args("tensorboard,wandb"))


def test_summary_and_eval_lines_leave_the_progress_bar_intact(corpus, tmp_path):
    from transformers import AutoTokenizer

    screen = io.StringIO()  # one stream for both, as on a terminal
    out = tmp_path / "o"
    with contextlib.redirect_stdout(screen), contextlib.redirect_stderr(screen):
        run("clm", text_args(corpus, out, *GPT2_TINY, "--max_train_samples", "10",
                             "--gradient_accumulation_steps", "2", "--num_train_epochs", "2", "--eval_steps", "2"))
    lines = [line.split("\r")[-1] for line in screen.getvalue().split("\n")]
    # every message starts its own line: nothing of the bar in front of it
    for step in (2, 4):
        assert any(line.startswith(f"step {step}: loss ") for line in lines), (step, screen.getvalue())
    tok = AutoTokenizer.from_pretrained(out)
    n_val = sum(len(tok(line)["input_ids"]) for line in (corpus / "valid.txt").read_text().splitlines(True)) // 32
    summary = lines[lines.index("***** Running training *****") + 1:][:7]
    # 10 examples / batch 4 -> 3 batches per epoch -> 2 optimizer steps per epoch (the last one 1 batch)
    assert summary == [f"  examples: 10 train, {n_val} validation", "  epochs: 2 (2 optimizer steps each)",
                       "  batch size per device: 4",
                       "  total batch size: 8 (4 per device x 1 processes x 2 accumulation steps)",
                       "  gradient accumulation steps: 2", "  optimizer steps: 4", "  processes: 1"]


# ----------------------------------------------------------------------------- resume (17.2, 17.7)


def test_resume_with_other_flags_is_refused(finished_run, corpus, tmp_path):
    src, _, _ = finished_run
    out = copy_run(src, tmp_path / "out", drop=["step_4"])
    before = snapshot(out)
    changed = ["--activation", "gelu_new", "--learning_rate", "1e-3", "--seed", "7", "--logging_steps", "1"]
    with pytest.raises(UsageError) as refused:
        run("clm", resume_argv(corpus, out, *changed))
    message = str(refused.value)
    for diff in ("--activation gem -> gelu_new", "--learning_rate 0.003 -> 0.001", "--seed 42 -> 7"):
        assert diff in message
    assert "--logging_steps 2" not in message and "\n" not in message  # may change; one line
    assert snapshot(out) == before

    state_file = out / "step_2" / checkpoint.STATE_FILE
    state = json.loads(state_file.read_text())
    state["num_processes"] = 2
    state_file.write_text(json.dumps(state))
    _reset_accelerate()
    with pytest.raises(UsageError, match="number of processes 2 -> 1"):
        run("clm", resume_argv(corpus, out))
    # a checkpoint from before flags were recorded: its args still decide
    legacy = {k: v for k, v in state.items() if k not in ("flags", "num_processes")}
    state_file.write_text(json.dumps(legacy))
    _reset_accelerate()
    with pytest.raises(UsageError, match="--activation gem -> gelu_new"):
        run("clm", resume_argv(corpus, out, "--activation", "gelu_new"))


def test_resume_may_change_reporting_and_the_time_adds_up(finished_run, corpus, tmp_path):
    src, finished, finished_wall = finished_run
    out = copy_run(src, tmp_path / "out", drop=["step_4"])
    first = checkpoint.read_state(out / "step_2")["train_time_s"]
    assert 0 < first < finished_wall
    start = time.perf_counter()
    resumed = run("clm", resume_argv(corpus, out, "--logging_steps", "1", "--eval_steps", "1",
                                     "--per_device_eval_batch_size", "3", "--save_total_limit", "1"))
    wall = time.perf_counter() - start
    assert resumed["resumed_from"].endswith("step_2") and resumed["steps"] == 4
    assert resumed["final"]["step"] == 4  # the same run, reported more often
    assert math.isclose(resumed["final"]["loss"], finished["final"]["loss"], rel_tol=1e-6)
    assert first < resumed["train_time_s"] <= first + wall
    assert resumed["tokens_seen"] == 4 * 4 * 32
    assert math.isclose(resumed["tokens_per_s"], resumed["tokens_seen"] / resumed["train_time_s"], rel_tol=1e-9)
    assert [r["step"] for r in read_log(out) if r["split"] == "train"] == [2, 3, 4]


def test_resuming_into_another_folder_needs_it_empty_or_overwritten(finished_run, tmp_path):
    src, _, _ = finished_run
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    fork = ["--resume_from_checkpoint", str(src / "step_2")]
    with pytest.raises(UsageError, match="exists and is not empty"):  # it would mix two runs' files
        validate(build_parser("clm").parse_args(["--output_dir", str(used), *fork]), "clm")
    args = validate(build_parser("clm").parse_args(["--output_dir", str(tmp_path / "new"), *fork]), "clm")
    assert args.resume_path == src / "step_2"


# ----------------------------------------------------------------------------- refusals (17.5, 17.6, 17.10)


def test_blend_longer_than_the_run_is_refused(finished_run, corpus, tmp_path):
    src, _, _ = finished_run
    out = tmp_path / "out"
    base = text_args(corpus, out, "--model_name_or_path", str(src), "--activation", "gelu_new", "--block_size", "32")
    with pytest.raises(UsageError, match="--blend_steps 5 exceeds the run's 4 optimizer steps"):
        run("clm", base + ["--blend_steps", "5", "--max_train_steps", "4"])
    # without --max_train_steps: 8 blocks / batch 4 = 2 steps in the one epoch
    with pytest.raises(UsageError, match="--blend_steps 3 exceeds the run's 2 optimizer steps"):
        run("clm", base + ["--blend_steps", "3", "--num_train_epochs", "1", "--max_train_samples", "8"])
    assert not (out / "log.jsonl").exists()


@pytest.mark.parametrize("flag,value", [
    ("--learning_rate", "inf"), ("--weight_decay", "nan"), ("--max_eval_samples", "0"), ("--adam_beta2", "1.0"),
    ("--adam_epsilon", "-0.5"), ("--max_grad_norm", "-1.5"), ("--num_warmup_steps", "-1"), ("--seed", "-1"),
    ("--max_train_samples", "-5"), ("--validation_split_percentage", "100"), ("--block_size", "1"),
    ("--save_total_limit", "0"), ("--stop_after_steps", "0"), ("--vocab_size", "0"),
])
def test_bad_numbers_are_refused_before_any_work(flag, value, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert main("clm", text_args(corpus, out, *GPT2_TINY, "--max_train_steps", "1", flag, value)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} {value}") and err.count("\n") == 1
    assert not out.exists()


def test_non_finite_loss_stops_the_run_naming_the_step(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    # AdamW moves every weight by about the learning rate in its first step: 1e30 is finite, but
    # the second forward pass overflows.
    argv = text_args(corpus, out, *GPT2_TINY, "--learning_rate", "1e30", "--max_train_steps", "4",
                     "--checkpointing_steps", "1", "--logging_steps", "1")
    assert main("clm", argv) == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]  # below the progress bar
    assert last.startswith("error: step 2: the training loss became non-finite") and err.count("error:") == 1
    assert f"the last checkpoint, {out / 'step_1'}, is intact" in last
    assert [r["step"] for r in read_log(out)] == [1] and math.isfinite(read_log(out)[0]["loss"])
    assert sorted(p.name for p in out.iterdir()) == ["hf_gemact_outputs.json", "log.jsonl", "metrics.json", "step_1"]
    # a result for sweeps, not a crash: shown as diverged, never ranked, not re-run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["steps"] == 1 and math.isnan(metrics["final"]["perplexity"])
    from hf_gemact.sweep import Run, read_result, run_row

    assert run_row(Run("gem", 0, out), read_result(Run("gem", 0, out)))["status"] == "diverged"
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(out / "step_1" / "model.safetensors").values())


def test_fp16_on_cpu_is_refused(corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = text_args(corpus, out, *GPT2_TINY, "--max_train_steps", "1")
    assert main("clm", argv + ["--mixed_precision", "fp16"]) == 2
    assert "--mixed_precision fp16 needs a GPU" in capsys.readouterr().err
    _reset_accelerate()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what `accelerate config` would set
    assert main("clm", argv) == 2
    assert "from accelerate's config" in capsys.readouterr().err
    assert not (out / "log.jsonl").exists()
    _reset_accelerate()
    s = run("clm", argv + ["--mixed_precision", "bf16", "--no_save_model"])  # bf16 does run on CPU
    assert s["mixed_precision"] == "bf16"


# ----------------------------------------------------------------------------- damaged checkpoints (17.9, 17.13)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_state(ckpt: Path, change) -> None:
    state = json.loads((ckpt / checkpoint.STATE_FILE).read_text())
    change(state)
    (ckpt / checkpoint.STATE_FILE).write_text(json.dumps(state))


DAMAGE = {
    "state_not_json": (lambda c: (c / checkpoint.STATE_FILE).write_text('{"step": 2, "epo'),
                       checkpoint.STATE_FILE, "not valid JSON"),
    "state_without_step": (lambda c: _edit_state(c, lambda s: s.pop("step")), checkpoint.STATE_FILE,
                           "'step' is None, expected a non-negative integer"),
    "weights_truncated": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors", "truncated"),
    "optimizer_truncated": (lambda c: _truncate(c / "optimizer.bin"), "optimizer.bin", "truncated or corrupt"),
    "optimizer_missing": (lambda c: (c / "optimizer.bin").unlink(), "", "no optimizer state in it"),
    "rng_missing": (lambda c: (c / "random_states_0.pkl").unlink(), "", "no RNG states in it"),
    "scheduler_empty": (lambda c: (c / "custom_checkpoint_0.pkl").write_bytes(b""), "custom_checkpoint_0.pkl",
                        "empty file"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_refused_in_one_line(damage, finished_run, corpus, tmp_path, capsys):
    src, _, _ = finished_run
    out = copy_run(src, tmp_path / "out", drop=["step_4"])
    spoil, culprit, problem = DAMAGE[damage]
    spoil(out / "step_2")
    before = snapshot(out)
    assert main("clm", resume_argv(corpus, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out / 'step_2' / culprit}".rstrip("/")) and problem in err
    assert err.count("\n") == 1
    assert snapshot(out) == before


def test_optimizer_state_lost_by_load_state_is_refused(finished_run, corpus, tmp_path, capsys):
    src, _, _ = finished_run
    out = copy_run(src, tmp_path / "out", drop=["step_4"])
    # what FSDP1 + SHARDED_STATE_DICT does on resume (issue 17.13): a loadable optimizer without state
    saved = torch.load(out / "step_2" / "optimizer.bin", weights_only=False)
    n_params = len(saved["state"])
    assert n_params > 0
    saved["state"] = {}
    torch.save(saved, out / "step_2" / "optimizer.bin")
    before = snapshot(out)
    assert main("clm", resume_argv(corpus, out)) == 2
    assert snapshot(out) == before  # nothing trained after the checkpoint, nothing rewritten
    err = capsys.readouterr().err
    assert f"the optimizer state of {n_params} of " in err and "was not restored" in err
    assert err.count("\n") == 1


# ----------------------------------------------------------------------------- overwrite (17.8)


@pytest.mark.parametrize("legacy", [False, True], ids=["outputs_list", "older_folder_without_list"])
def test_overwrite_removes_only_what_earlier_runs_wrote(legacy, finished_run, corpus, tmp_path):
    src, _, _ = finished_run
    out = copy_run(src, tmp_path / "out")
    earlier = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "tokenizer.json", "step_2", "step_4", "hf_gemact_clm"} <= earlier
    if legacy:
        (out / checkpoint.OUTPUTS_FILE).unlink()
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    (out / "data" / "config.json").write_text("mine too")
    s = run("clm", text_args(corpus, out, *GPT2_TINY, "--max_train_steps", "1", "--overwrite_output_dir",
                             "--no_save_model"))
    assert sorted(os.listdir(out)) == sorted(["notes.txt", "data", "log.jsonl", "metrics.json", "README.md",
                                              checkpoint.OUTPUTS_FILE])
    assert (out / "notes.txt").read_text() == "mine" and (out / "data" / "config.json").read_text() == "mine too"
    assert json.loads((out / "metrics.json").read_text())["steps"] == s["steps"] == 1


def test_overwrite_never_deletes_what_the_run_reads(finished_run, corpus, tmp_path):
    src, _, _ = finished_run
    out = copy_run(src, tmp_path / "out")
    before = snapshot(out)
    with pytest.raises(UsageError, match="--model_name_or_path .* is read from what --overwrite_output_dir would "
                                         "delete"):
        run("clm", text_args(corpus, out, "--model_name_or_path", str(out), "--block_size", "32",
                             "--max_train_steps", "1", "--overwrite_output_dir"))
    assert snapshot(out) == before


def test_reliability_doc_names_existing_tests():
    import re

    doc = (REPO / "docs" / "RELIABILITY.md").read_text()
    section = doc.split("## Training runs", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)", section)
    assert len(named) >= 10
    for file, test in named:
        assert re.search(rf"^def {test}\(", (REPO / file).read_text(), re.M), (file, test)
