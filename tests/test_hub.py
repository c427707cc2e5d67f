"""Model cards and Hub uploads (issue 12 items 5 and 6): `hf_gemact.hub`.

No network here: the card is read back with huggingface_hub's own parser, its loading claim is
checked in a process without hf_gemact, the staged file set is compared with a hand-written list
and with what huggingface_hub's upload_folder itself would send, and an unreachable endpoint must
give one HubError line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import hf_gemact
from hf_gemact import hub
from hf_gemact.hub import HubError, push_folder, staged_files, write_model_card

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import ModelCard  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

METRICS = {
    "task": "clm", "activation": "gem", "steps": 300, "tokens_per_s": 12345.6,
    "final": {"step": 300, "loss": 4.0625, "perplexity": 58.1},
    "best": {"step": 200, "loss": 4.03125, "perplexity": 56.4},
    "validation_loss_note": "task loss only (no auxiliary loss)",
}


def _tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, n_positions=32, vocab_size=64,
                                      bos_token_id=0, eos_token_id=0))


@pytest.fixture
def patched(tmp_path):
    """A surgery result: block 0 GEM, block 1 a blend gelu_new -> velu at t = 0.25, block 2 as it
    was; saved to a folder with its card."""
    model = _tiny_gpt2()
    hf_gemact.patch_activations(model, "gem", layers=[0])
    hf_gemact.patch_activations(model, "velu", layers=[1], blend=True)
    hf_gemact.set_blend(model, 0.25)
    folder = tmp_path / "gpt2-surgery"
    model.save_pretrained(folder)
    return model, folder


def _table_rows(text: str) -> dict:
    """The card's activation table: site path -> [block, role, activation, patched from, blend t]."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if line.startswith("| `transformer."):
            rows[cells[0]] = cells[1:]
    return rows


def test_model_card_fields(patched):
    model, folder = patched
    path = write_model_card(folder, model, base_model="openai-community/gpt2", metrics=METRICS)
    assert path == folder / "README.md"
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["base_model"] == "openai-community/gpt2"
    assert data["pipeline_tag"] == "text-generation"
    assert set(data["tags"]) == {"hf_gemact", "gem", "velu", "gelu_new"}
    # every site, with what the patch did, as the test itself set it up
    assert _table_rows(card.text) == {
        "transformer.h.0.mlp.act": ["0", "mlp", "gem", "gelu_new", "-"],
        "transformer.h.1.mlp.act": ["1", "mlp", "velu", "gelu_new", "0.25"],
        "transformer.h.2.mlp.act": ["2", "mlp", "gelu_new", "-", "-"],
    }
    # final and best validation metrics of metrics.json
    assert "| final | 300 | 4.0625 | 58.1 |" in card.text and "| best | 200 | 4.03125 | 56.4 |" in card.text
    assert "pip install hf_gemact" in card.text
    assert "import hf_gemact" in card.text and "GPT2LMHeadModel.from_pretrained" in card.text


def test_model_card_loading_claim_holds_in_a_process_without_hf_gemact(tmp_path):
    model = _tiny_gpt2()
    hf_gemact.patch_activations(model, "segem", layers=[0, 1])
    hf_gemact.patch_activations(model, "gem", layers=[2])
    folder = tmp_path / "mixed"
    model.save_pretrained(folder)
    text = ModelCard.load(write_model_card(folder, model)).text
    claimed = text.split("fails with `KeyError: '", 1)[1].split("'", 1)[0]
    # load the folder the way the card's snippet says, once without and once with the import
    code = textwrap.dedent(f"""
        import sys, transformers
        try:
            transformers.GPT2LMHeadModel.from_pretrained({str(folder)!r})
        except KeyError as err:
            print("KEYERROR", err.args[0])
        import hf_gemact
        transformers.GPT2LMHeadModel.from_pretrained({str(folder)!r})
        print("LOADED")
    """)
    env = {**os.environ, "HF_GEMACT_COMPILE": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"KEYERROR {claimed}" in proc.stdout and "LOADED" in proc.stdout


def test_model_card_base_model_metadata_only_for_hub_ids(patched, tmp_path):
    model, folder = patched
    local = tmp_path / "local-ckpt"
    local.mkdir()
    (local / "README.md").write_text("---\nlicense: mit\nlanguage: fr\n---\nbase card\n")
    cached = tmp_path / "hub" / "models--some-org--some-model" / "snapshots" / "0123abc"
    cached.mkdir(parents=True)
    for base, expected in [(str(local), None), (str(cached), "some-org/some-model"), ("gpt2", "gpt2"),
                           ("not a repo id!", None)]:
        data = ModelCard.load(write_model_card(folder, model, base_model=base)).data.to_dict()
        assert data.get("base_model") == expected, base
    # a local base checkpoint's license and language carry over to the patched copy
    data = ModelCard.load(write_model_card(folder, model, base_model=str(local))).data.to_dict()
    assert data["license"] == "mit" and data["language"] == "fr"


def test_model_card_of_a_model_with_only_builtin_activations(tmp_path):
    model = _tiny_gpt2()
    text = ModelCard.load(write_model_card(tmp_path, model, metrics={"task": "mlm"})).text
    assert "also loads without hf_gemact" in text and "KeyError" not in text
    assert ModelCard.load(tmp_path / "README.md").data.to_dict()["pipeline_tag"] == "fill-mask"


# ---------------------------------------------------------------------------------- staging


def _populate(folder: Path) -> None:
    files = ["README.md", "config.json", "model.safetensors", "metrics.json", "log.jsonl", "tokenizer.json",
             "1_Pooling/config.json", "step_2/model.safetensors", "step_2/sub/state.json",
             "epoch_1/optimizer.bin", ".tmp-step_4/model.safetensors", ".lock", "runs/seed0/step_3/x.bin",
             "runs/seed0/metrics.json", ".git/config", "stepping_notes.txt"]
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(name)
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\ncard\n")


EXPECTED_STAGED = ["1_Pooling/config.json", "README.md", "config.json", "log.jsonl", "metrics.json",
                   "model.safetensors", "runs/seed0/metrics.json", "stepping_notes.txt", "tokenizer.json"]


def test_staged_files_leave_out_checkpoints_temporaries_and_locks(tmp_path):
    _populate(tmp_path)
    assert staged_files(tmp_path) == EXPECTED_STAGED


class _StopBeforeNetwork(Exception):
    pass


def test_push_folder_uploads_exactly_the_staged_files(tmp_path, monkeypatch):
    # run the real push_folder -> HfApi.upload_folder up to the point where huggingface_hub has
    # listed the files to add, and stop there
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoUrl

    _populate(tmp_path)
    seen = {}
    prepare = HfApi._prepare_upload_folder_additions

    def record(self, *args, **kwargs):
        monkeypatch.setattr(HfApi, "_validate_yaml", lambda *a, **k: None, raising=False)  # a network call
        seen["paths"] = sorted(op.path_in_repo for op in prepare(self, *args, **kwargs))
        raise _StopBeforeNetwork("stopped by the test")

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(HfApi, "_prepare_folder_deletions", lambda self, **kw: [], raising=False)
    monkeypatch.setattr(HfApi, "_prepare_upload_folder_additions", record)
    with pytest.raises(HubError, match="stopped by the test"):
        push_folder(tmp_path, "me/model")
    assert seen["paths"] == staged_files(tmp_path) == EXPECTED_STAGED


def test_push_folder_to_unreachable_hub_raises_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    _populate(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    # HfApi takes the endpoint from huggingface_hub.constants when it is created (HF_ENDPOINT is
    # read into it at import), so the in-process test sets the constant; port 9 refuses at once
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(HubError) as info:
        push_folder(tmp_path, "me/model", token="hf_not_a_token")
    message = str(info.value)
    assert "\n" not in message
    assert "'me/model'" in message and "Connection refused" in message
    assert message.endswith(f"the local folder is complete at {tmp_path.resolve()}")
    assert isinstance(info.value, RuntimeError)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_push_folder_of_a_missing_folder(tmp_path):
    with pytest.raises(HubError, match="is not a folder"):
        push_folder(tmp_path / "missing", "me/model")


def test_patch_writes_a_model_card_with_the_source_as_base(tmp_path, capsys):
    from hf_gemact.cli import main

    src = tmp_path / "src"
    _tiny_gpt2().save_pretrained(src)
    assert main(["patch", str(src), str(tmp_path / "dst"), "--act", "gem", "--layers=-1"]) == 0
    card = ModelCard.load(tmp_path / "dst" / "README.md")
    # written before DST took its name, yet titled and loaded by that name
    assert card.text.startswith("\n# dst\n") and 'from_pretrained("dst")' in card.text
    assert f"activation surgery (`hf_gemact.patch_activations`) on `{src}`" in card.text
    assert _table_rows(card.text)["transformer.h.2.mlp.act"] == ["2", "mlp", "gem", "gelu_new", "-"]
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["activation_function"] == "gem"
