"""`hf-gemact inspect` / `hf-gemact patch` reliability (issue 17 items 1 and 9, issue 12 item 6).

`patch` never writes into its source and never leaves a half-written destination; every failure a
user can cause ends in one line naming the path or flag and the problem, with exit code 2; a push
to an unreachable Hub fails with one line after the folder is complete on disk.
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
from hf_gemact.cli import main

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, RwkvConfig, RwkvForCausalLM  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_CARD = "---\nlicense: mit\nlanguage: en\n---\n\n# the base model's own card\n"


def _tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=32, vocab_size=64,
                                      bos_token_id=0, eos_token_id=0))


@pytest.fixture(scope="module")
def source_template(tmp_path_factory):
    """A checkpoint folder as users have them: weights, a sub-folder, side files, the base model's
    card, and what a training run leaves (metrics.json, a step_5 checkpoint)."""
    folder = tmp_path_factory.mktemp("template") / "src"
    _tiny_gpt2().save_pretrained(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"pooling": "mean"}')
    (folder / "notes.txt").write_text("side file\n")
    (folder / "README.md").write_text(BASE_CARD)
    (folder / "metrics.json").write_text('{"final": {"loss": 1.0}}')
    (folder / "step_5").mkdir()
    (folder / "step_5" / "state.json").write_text("{}")
    return folder


@pytest.fixture
def src(source_template, tmp_path):
    import shutil

    return Path(shutil.copytree(source_template, tmp_path / "src"))


def _snapshot(folder: Path) -> dict:
    """Every file under `folder` (symlinks not followed) -> its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def _run(argv, capsys, stdout=None):
    """main(argv) -> (exit code, the error lines it printed); `stdout` (a list) gets its output."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    if stdout is not None:
        stdout.append(captured.out)
    return code, [line for line in captured.err.splitlines() if line.startswith("hf-gemact ")]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


# ---------------------------------------------------------------------- item 1: never into SRC


@pytest.mark.parametrize("kind", ["same", "inside", "symlink", "inside-symlink", "contains"])
def test_patch_refuses_dst_that_is_inside_or_around_src(src, tmp_path, capsys, kind):
    (tmp_path / "link").symlink_to(src, target_is_directory=True)
    dst, extra = {
        "same": (src, []),
        "inside": (src / "1_Pooling" / "patched", []),
        "symlink": (tmp_path / "link", []),
        "inside-symlink": (tmp_path / "link" / "patched", []),
        "contains": (tmp_path, ["--overwrite"]),  # --overwrite would delete SRC with it
    }[kind]
    before = _snapshot(src)
    out = []
    code, errors = _run(["patch", src, dst, "--act", "gem", *extra], capsys, out)
    assert code == 2 and out == [""]  # refused before the checkpoint was even loaded
    assert len(errors) == 1 and "source checkpoint" in errors[0] and str(dst) in errors[0]
    assert _snapshot(src) == before
    assert _leftovers(tmp_path) == [] and _leftovers(src) == []


def test_patch_replaces_nonempty_dst_only_with_overwrite(src, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    out = []
    code, errors = _run(["patch", src, dst, "--act", "gem"], capsys, out)
    assert code == 2 and len(errors) == 1 and "--overwrite" in errors[0]
    assert out == [""]  # refused before the checkpoint was even loaded
    assert _snapshot(dst) == {"precious.txt": b"keep me"}

    code, errors = _run(["patch", src, dst, "--act", "gem", "--layers=-1", "--overwrite"], capsys)
    assert code == 0 and errors == []
    files = set(_snapshot(dst))
    assert "precious.txt" not in files and _leftovers(tmp_path) == []
    # side files travel (sub-folders too), the base card is kept aside, the run's records stay behind
    assert {"config.json", "model.safetensors", "README.md", "BASE_README.md", "notes.txt",
            "1_Pooling/config.json"} <= files
    assert not any(f.startswith("step_5") or f == "metrics.json" for f in files)
    assert (dst / "BASE_README.md").read_text() == BASE_CARD
    # DST is the patched model: equal to patching the source model directly
    batch = {"input_ids": torch.arange(10).reshape(1, 10)}
    direct = GPT2LMHeadModel.from_pretrained(src).eval()
    hf_gemact.patch_activations(direct, "gem", layers=[-1])
    loaded = GPT2LMHeadModel.from_pretrained(dst).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, direct(**batch).logits)


def test_failed_write_leaves_dst_as_it_was(src, tmp_path, capsys, monkeypatch):
    from hf_gemact import hub

    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")

    def disk_full(folder, *args, **kwargs):
        assert (Path(folder) / "model.safetensors").is_file()  # the weights were already written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hub, "write_model_card", disk_full)
    code, errors = _run(["patch", src, dst, "--act", "gem", "--overwrite"], capsys)
    assert code == 2 and len(errors) == 1
    assert "No space left on device" in errors[0] and "DST is as it was" in errors[0]
    assert _snapshot(dst) == {"precious.txt": b"keep me"} and _leftovers(tmp_path) == []


def test_killed_mid_write_leaves_dst_as_it_was(src, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    code = textwrap.dedent(f"""
        import os, sys
        import hf_gemact.hub as hub
        hub.write_model_card = lambda *a, **k: os._exit(9)  # dies like kill -9, after the weights
        from hf_gemact.cli import main
        main(["patch", {str(src)!r}, {str(dst)!r}, "--act", "gem", "--overwrite"])
    """)
    env = {**os.environ, "HF_GEMACT_COMPILE": "0"}  # no kernel compilation: this is about files
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert _snapshot(dst) == {"precious.txt": b"keep me"}
    leftover = _leftovers(tmp_path)  # what the killed process was writing, beside DST, never DST
    assert len(leftover) == 1 and (tmp_path / leftover[0] / "dst" / "model.safetensors").is_file()


# ----------------------------------------------------------------- item 9: one line, exit code 2


def _broken(kind: str, src: Path, tmp_path: Path) -> tuple[Path, str]:
    """A path of the given broken kind, and text the one-line error must contain."""
    import shutil

    if kind == "missing":
        return tmp_path / "no_such_checkpoint", "no such folder"
    if kind == "file":
        return src / "config.json", "a file, not a checkpoint folder"
    if kind == "empty folder":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty", "an empty folder"
    if kind == "no config.json":
        (src / "config.json").unlink()
        return src, "a folder without config.json"
    if kind == "corrupt json":
        text = (src / "config.json").read_text()
        (src / "config.json").write_text(text[: len(text) // 2])
        return src / "config.json", "not valid JSON"
    if kind == "no model_type":
        (src / "config.json").write_text('{"n_layer": 2}')
        return src / "config.json", "no model_type"
    if kind == "truncated safetensors":
        weights = src / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return src, "cannot load the checkpoint"
    if kind == "malformed record":
        config = json.loads((src / "config.json").read_text())
        config["hf_gemact_activations"] = {"h.0.mlp.actt": "gem"}
        (src / "config.json").write_text(json.dumps(config))
        return src / "config.json", "hf_gemact_activations['h.0.mlp.actt'] names no module"
    raise AssertionError(kind)


BROKEN = ["missing", "file", "empty folder", "no config.json", "corrupt json", "no model_type",
          "truncated safetensors", "malformed record"]


@pytest.mark.parametrize("kind", BROKEN)
@pytest.mark.parametrize("command", ["inspect", "patch"])
def test_unreadable_checkpoint_gives_one_line_and_exit_2(src, tmp_path, capsys, kind, command):
    path, problem = _broken(kind, src, tmp_path)
    if command == "inspect":
        argv = ["inspect", _given(kind, src, path)]
    else:
        argv = ["patch", _given(kind, src, path), tmp_path / "dst", "--act", "gem"]
    code, errors = _run(argv, capsys)
    assert code == 2
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"hf-gemact {command}: error: {path}")
    assert problem in errors[0]
    assert not (tmp_path / "dst").exists() and _leftovers(tmp_path) == []


def _given(kind, src, path):
    """What the user typed: the folder, except for the kinds whose argument is the path itself."""
    return path if kind in ("missing", "file", "empty folder") else src


@pytest.fixture(scope="module")
def rwkv_dir(tmp_path_factory):
    """A model whose feed-forward calls torch.relu directly: nothing surgery can patch."""
    folder = tmp_path_factory.mktemp("rwkv")
    RwkvForCausalLM(RwkvConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, attention_hidden_size=16,
                               intermediate_size=32, context_length=16, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("flags, problem", [
    (["--act", "gemm"], "unknown family 'gemm'"),
    (["--act", "gem_n0"], "gem_n0"),
    (["--act", "gem", "--layers", "5"], "layer index 5 is out of range"),
    (["--act", "gem", "--layers", "last"], "bad layer index 'last'"),
    (["--act", "gem", "--hub_model_id", "me/x"], "--hub_model_id has no effect without --push_to_hub"),
    (["--act", "gem", "--push_to_hub", "--hub_model_id", "bad id"], "'bad id' is not a valid repo id"),
])
def test_bad_flags_give_one_line_and_exit_2(src, tmp_path, capsys, flags, problem):
    before = _snapshot(src)
    code, errors = _run(["patch", src, tmp_path / "dst", *flags], capsys)
    assert code == 2 and len(errors) == 1 and problem in errors[0], errors
    assert _snapshot(src) == before and not (tmp_path / "dst").exists()


def test_bad_blend_is_an_argparse_error(src, tmp_path, capsys):
    for value in ("1.5", "nan", "half"):
        with pytest.raises(SystemExit) as info:
            main(["patch", str(src), str(tmp_path / "dst"), "--act", "gem", "--blend", value])
        assert info.value.code == 2
        assert "argument --blend" in capsys.readouterr().err


def test_unpatchable_model_gives_one_line_and_exit_2(rwkv_dir, tmp_path, capsys):
    code, errors = _run(["patch", rwkv_dir, tmp_path / "dst", "--act", "gem"], capsys)
    assert code == 2 and len(errors) == 1 and "has no recognisable activation" in errors[0]
    assert not (tmp_path / "dst").exists()


def _cli(*argv, env, timeout=300):
    env = {**env, "HF_GEMACT_COMPILE": "0"}  # no kernel compilation: these are about files and errors
    return subprocess.run([sys.executable, "-m", "hf_gemact.cli", *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO_ROOT)


def test_cli_error_in_a_real_process():
    # a name that is no local path is taken for a Hub id; offline, that fails at once
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = _cli("inspect", "no-such-org/no-such-model", env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("hf-gemact")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("hf-gemact inspect: error: no-such-org/no-such-model (no such folder, so it "
                               "was taken for a Hub id): cannot load the checkpoint")


# -------------------------------------------------------------- issue 12 item 6: --push_to_hub


def test_push_to_unreachable_hub_fails_in_one_line_after_saving(src, tmp_path):
    from hf_gemact.hub import staged_files

    dst = tmp_path / "gpt2-gem"
    # huggingface_hub reads HF_ENDPOINT once, at import, so the endpoint is set for a new process;
    # port 9 (discard) refuses connections at once
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_DISABLE_TELEMETRY="1")
    proc = _cli("patch", src, dst, "--act", "gem", "--push_to_hub", "--hub_token", "hf_not_a_token", env=env)
    assert proc.returncode not in (0, 2) and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("hf-gemact")]
    assert len(lines) == 1
    # the repo id defaults to DST's folder name (HF no_trainer), and the folder is complete
    assert "'gpt2-gem'" in lines[0] and f"complete at {dst}" in lines[0]
    assert "saved to" in proc.stdout
    assert staged_files(dst) == ["1_Pooling/config.json", "BASE_README.md", "README.md", "config.json",
                                 "generation_config.json", "model.safetensors", "notes.txt"]
    loaded = GPT2LMHeadModel.from_pretrained(dst)
    assert all(isinstance(block.mlp.act, hf_gemact.GEM) for block in loaded.transformer.h)
