"""Shared test fixtures: where the real data beside the project lives."""

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
