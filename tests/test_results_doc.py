"""docs/RESULTS.md shows exactly what `hf-gemact tables docs/results/<task>` makes of the committed
raw data (results.csv, each run's metrics.json and log.jsonl): no table there is typed by hand."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hf_gemact.tables import tables

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "RESULTS.md"
BLOCK = re.compile(r"<!-- hf-gemact tables (?P<folder>\S+) -->\n(?P<body>.*?)<!-- end of tables -->", re.S)


def doc_blocks() -> dict:
    """folder -> the text between its markers in RESULTS.md."""
    blocks = {}
    for match in BLOCK.finditer(DOC.read_text()):
        assert match["folder"] not in blocks, f"RESULTS.md has two tables blocks for {match['folder']}"
        blocks[match["folder"]] = match["body"]
    return blocks


def task_folders() -> list:
    return sorted(f"docs/results/{p.name}" for p in (ROOT / "docs" / "results").iterdir() if p.is_dir())


def test_every_committed_task_folder_has_its_tables_in_results_md():
    assert task_folders() == sorted(doc_blocks())
    assert {"docs/results/clm", "docs/results/mlm", "docs/results/image", "docs/results/surgery",
            "docs/results/calibration", "docs/results/lr"} >= set(doc_blocks())


@pytest.mark.parametrize("folder", task_folders())
def test_results_md_tables_are_the_tables_command_output(folder):
    assert doc_blocks()[folder] == tables(ROOT / folder, write=False)
