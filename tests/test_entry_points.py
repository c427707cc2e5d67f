"""Entry points: `python -m hf_gemact` is `hf-gemact`; `python -m hf_gemact.train TASK` is the training
script of TASK; and from a regular (non-editable) install, `hf-gemact sweep` runs in any folder."""

from __future__ import annotations

import csv
import math
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"clm": "run_clm.py", "mlm": "run_mlm.py", "image": "run_image_classification.py"}


def test_python_m_hf_gemact_is_the_hf_gemact_command(tmp_path):
    console_script = Path(sys.executable).with_name("hf-gemact")
    if not console_script.is_file():
        pytest.skip(f"no console script beside {sys.executable}")
    module = subprocess.run([sys.executable, "-m", "hf_gemact", "--help"], capture_output=True, text=True,
                            cwd=tmp_path)
    command = subprocess.run([str(console_script), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert module.returncode == command.returncode == 0, module.stderr + command.stderr
    assert module.stdout == command.stdout and "sweep" in module.stdout


def _help_of(run, argv, capsys, monkeypatch) -> str:
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        run()
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("task", sorted(SCRIPTS))
def test_python_m_hf_gemact_train_takes_the_scripts_flags(task, capsys, monkeypatch):
    script = REPO / "train_scripts" / SCRIPTS[task]
    from_script = _help_of(lambda: runpy.run_path(str(script), run_name="__main__"), [str(script), "--help"],
                           capsys, monkeypatch)
    from_module = _help_of(lambda: runpy.run_module("hf_gemact.train", run_name="__main__"),
                           ["train.py", task, "--help"], capsys, monkeypatch)
    assert from_module == from_script and "--output_dir" in from_module


def test_python_m_hf_gemact_train_hands_the_flags_to_the_task(tmp_path, capsys):
    from hf_gemact.train import main

    assert main(["mlm", "--output_dir", str(tmp_path / "out"), "--activation", "gemm"]) == 2
    assert capsys.readouterr().err.startswith("error: --activation 'gemm' is not a known activation")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [([], "error: name a task"), (["gpt"], "error: unknown task 'gpt'")])
def test_python_m_hf_gemact_train_refuses_a_missing_or_unknown_task(argv, message, capsys):
    from hf_gemact.train import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and "usage: python -m hf_gemact.train {clm,mlm,image}" in err


def _throwaway_venv(tmp_path) -> Path:
    """A venv that sees this environment's packages (torch, transformers, pip, setuptools) through a
    .pth file, without its editable hf_gemact: .pth files inside a directory named by a .pth line are
    not processed, so the editable install's import hook stays out."""
    import site

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "_outer_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


@pytest.mark.slow
def test_a_regular_install_runs_a_sweep_from_any_folder(tmp_path, shared_data):
    """`pip install .` (not -e) into a fresh venv; then, in a folder that is not the repository,
    `python -m hf_gemact --help` and a one-run sweep of the clm task."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"building needs setuptools >= 77 in this environment (found {setuptools.__version__})")
    python = _throwaway_venv(tmp_path)
    source = tmp_path / "source"  # a copy: an in-tree build would leave build/ in the repository
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("hf_gemact", "patches"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--no-index", str(source)], capture_output=True, text=True)
    assert install.returncode == 0, install.stdout + install.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_GEMACT_CACHE"] = str(tmp_path / "cache")
    where = subprocess.run([str(python), "-c", "import hf_gemact; print(hf_gemact.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(tmp_path / "venv"), where

    cli_help = subprocess.run([str(python), "-m", "hf_gemact", "--help"], cwd=elsewhere, env=env,
                              capture_output=True, text=True)
    assert cli_help.returncode == 0 and "sweep" in cli_help.stdout, cli_help.stderr

    text = (shared_data / "text" / "tinyshakespeare.txt").read_text()
    (elsewhere / "train.txt").write_text(text[:20_000])
    (elsewhere / "valid.txt").write_text(text[-4_000:])
    sweep = subprocess.run(
        [str(python), "-m", "hf_gemact", "sweep", "--task", "clm", "--activations", "gelu", "--seeds", "0",
         "--output_dir", "sweep", "--", "--train_file", "train.txt", "--validation_file", "valid.txt",
         "--config_overrides", "n_layer=1,n_embd=32,n_head=2,n_positions=32", "--block_size", "32",
         "--vocab_size", "300", "--per_device_train_batch_size", "4", "--max_train_steps", "3", "--no_save_model"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    assert f"{python} -m hf_gemact.train clm" in sweep.stdout and str(REPO) not in sweep.stdout
    with open(elsewhere / "sweep" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["activation"], r["seed"], r["metric"]) for r in rows] == [("gelu", "0", "perplexity")]
    assert 1 < float(rows[0]["final"]) < math.inf
