"""Checkpoints: accelerate's save_state into OUTPUT_DIR/step_N, made atomic.

A checkpoint is written into a hidden temporary folder (`.tmp-step_N`), completed with
`trainer_state.json` (the loop's position: step, epoch, batches consumed, counters, best metrics),
and only then renamed to `step_N`. A rename is atomic on one filesystem, so a run killed while
saving leaves at most a `.tmp-*` folder, which `latest` never picks (and the next save removes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"step_(\d+)\Z")


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / STATE_FILE).is_file()


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in output_dir, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and is_checkpoint(child):
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def resolve(spec: str, output_dir: Path) -> Path | None:
    """`--resume_from_checkpoint` -> a checkpoint folder; None for 'latest' when there is none yet
    (a re-queued job then starts from scratch). Raises UsageError for anything else."""
    from .args import UsageError

    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"--resume_from_checkpoint {spec}: no such folder")
    if not is_checkpoint(path):
        raise UsageError(f"--resume_from_checkpoint {spec} is not a checkpoint (no {STATE_FILE}); "
                         "checkpoints are the OUTPUT_DIR/step_N folders written by --checkpointing_steps")
    return path


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def save(accelerator, output_dir: Path, step: int, state: dict) -> Path:
    """Every process calls this (accelerate saves per-process RNG states)."""
    final = output_dir / f"step_{step}"
    tmp = output_dir / f".tmp-step_{step}"
    if accelerator.is_main_process:
        for stale in output_dir.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a re-run over the same steps
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final
