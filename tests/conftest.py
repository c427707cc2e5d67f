"""Shared test fixtures: where the real data beside the project lives, and a clean accelerate state."""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (tiny Shakespeare, WikiText-2, GPT-2 tokenizer, Fashion-MNIST)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (the ../shared folder beside the repo)")
    return SHARED_DATA


def shakespeare_split(tmp_path_factory, shared_data: Path, name: str, train_chars: int, valid_chars: int) -> Path:
    """A new folder `name` with train.txt (the first `train_chars` characters of tiny Shakespeare)
    and valid.txt (its last `valid_chars`)."""
    text = (shared_data / "text" / "tinyshakespeare.txt").read_text()
    folder = tmp_path_factory.mktemp(name)
    (folder / "train.txt").write_text(text[:train_chars])
    (folder / "valid.txt").write_text(text[-valid_chars:])
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data):
    """A small real corpus for the training tests: slices of tiny Shakespeare (train) and of its
    end (validation)."""
    return shakespeare_split(tmp_path_factory, shared_data, "corpus", 40_000, 6_000)


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state, which outlives an Accelerator: the next run in this
    process starts as a fresh process would."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state(tmp_path_factory, monkeypatch):
    """For training tests: a clean accelerate state before and after, and hf_gemact's data cache
    (default corpora, trained tokenizers) in this session's temporary folder."""
    monkeypatch.setenv("HF_GEMACT_CACHE", str(tmp_path_factory.getbasetemp() / "hf_gemact_cache"))
    reset_accelerate_state()
    yield
    reset_accelerate_state()
