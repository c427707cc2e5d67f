"""The training scripts' output folder as shared on the Hub (issue 12 items 5 and 6): a model card
in every output folder, --push_to_hub after everything is saved, the token never written down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import shakespeare_split
from hf_gemact import hub
from hf_gemact.training import checkpoint, run

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config_overrides", "n_layer=1,n_embd=32,n_head=2,n_positions=32", "--block_size", "32", "--vocab_size", "300",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--max_eval_samples", "8",
        "--learning_rate", "3e-3", "--logging_steps", "1"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # conftest.py


@pytest.fixture(scope="module")
def text(tmp_path_factory, shared_data):
    d = shakespeare_split(tmp_path_factory, shared_data, "text", 30_000, 5_000)
    return ["--train_file", str(d / "train.txt"), "--validation_file", str(d / "valid.txt")]


def card_of(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def test_trained_and_patched_folders_carry_a_model_card(text, tmp_path):
    scratch = tmp_path / "scratch"
    run("clm", [*text, *TINY, "--activation", "velu", "--max_train_steps", "2", "--output_dir", str(scratch)])
    card = card_of(scratch)
    assert card.data.library_name == "transformers"
    assert {"hf_gemact", "velu"} <= set(card.data.tags)
    metrics = json.loads((scratch / "metrics.json").read_text())
    header = next(line for line in card.text.splitlines() if line.startswith("| | step |"))
    final = next(line for line in card.text.splitlines() if line.startswith("| final |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    shown = dict(zip(columns, (c.strip() for c in final.strip("|").split("|"))))
    for key in ("loss", "perplexity"):
        assert float(shown[key]) == pytest.approx(metrics["final"][key], rel=1e-5), key
    assert "pip install hf_gemact" in card.text and "import hf_gemact" in card.text
    assert "README.md" in json.loads((scratch / checkpoint.OUTPUTS_FILE).read_text())["outputs"]

    # surgery on that checkpoint: the base and every patched site are named
    patched = tmp_path / "patched"
    run("clm", [*TINY[4:], *text, "--model_name_or_path", str(scratch), "--activation", "gem_n1",
                "--max_train_steps", "1", "--output_dir", str(patched)])
    card = card_of(patched)
    assert "gem_n1" in card.data.tags and str(scratch) in card.text
    assert card.text.count("velu") >= 1 and card.text.count("gem_n1") >= 2  # old -> new per site


def test_push_to_unreachable_hub_fails_in_one_line_after_saving(text, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_OFFLINE": "0"}
    cmd = [sys.executable, str(REPO / "train_scripts" / "run_clm.py"), *text, *TINY, "--activation", "gem",
           "--max_train_steps", "2", "--checkpointing_steps", "1", "--output_dir", str(out), "--push_to_hub",
           "--hub_model_id", "someone/tiny-gem", "--hub_token", "hf_secret_do_not_store"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "someone/tiny-gem" in errors[0] and str(out.resolve()) in errors[0], res.stderr[-2000:]
    for name in ("metrics.json", "README.md", "config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    # what would have been uploaded: the final folder, without the step_* checkpoints
    staged = hub.staged_files(out)
    assert "model.safetensors" in staged and "README.md" in staged
    assert (out / "step_1").is_dir() and not any(f.startswith(("step_", ".")) for f in staged)
    # the token is on no disk
    for path in out.rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            assert b"hf_secret_do_not_store" not in path.read_bytes(), path


def test_hub_flags_are_checked_before_any_work(text, tmp_path):
    from hf_gemact.training import UsageError

    out = tmp_path / "never"
    for extra, problem in ((["--hub_model_id", "a/b"], "without --push_to_hub"),
                           (["--push_to_hub", "--hub_model_id", "bad id with spaces"], "not a valid repo id"),
                           (["--push_to_hub", "--no_save_model"], "--no_save_model")):
        with pytest.raises(UsageError, match=problem):
            run("clm", [*text, *TINY, "--max_train_steps", "1", "--output_dir", str(out), *extra])
        assert not out.exists()


@pytest.mark.parametrize("task", ["clm", "mlm", "image"])
def test_help_of_every_script_lists_the_hub_flags(task):
    from hf_gemact.training.args import build_parser

    text = build_parser(task).format_help()
    for flag in ("--push_to_hub", "--hub_model_id", "--hub_token"):
        assert flag in text, (task, flag)
