"""Checkpoints and the output folder's bookkeeping.

Checkpoints: accelerate's save_state into OUTPUT_DIR/step_N (every N steps) or OUTPUT_DIR/epoch_N
(after epoch N, counted from 0 as in transformers' no_trainer examples), made atomic. A checkpoint
is written into a hidden temporary folder (`.tmp-step_N`), completed with `hf_gemact_state.json`
(the loop's position: step, epoch, batches consumed, counters, best metrics, the run's flags), and
only then renamed into place. A rename is atomic on one filesystem, so a run killed while saving
leaves at most a `.tmp-*` folder, which `latest` never picks (and the next save removes).
Checkpoints written before the state file got its own name hold `trainer_state.json`; they resume.

Output folder: `hf_gemact_outputs.json` lists what the scripts wrote at the top of OUTPUT_DIR
(logs, metrics, model files, tracker folders), so that `--overwrite_output_dir` removes exactly an
earlier run's artefacts and nothing else.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import zipfile
from pathlib import Path

from .args import UsageError

STATE_FILE = "hf_gemact_state.json"
LEGACY_STATE_FILES = ("trainer_state.json",)  # the name used before; Trainer's own checkpoints use it too
OUTPUTS_FILE = "hf_gemact_outputs.json"
_CHECKPOINT_DIR = re.compile(r"(step|epoch)_(\d+)\Z")
_TMP_DIR = re.compile(r"\.tmp-(step|epoch)_\d+\Z")


class CheckpointError(UsageError):
    """A checkpoint that cannot be resumed: the message names the path and the problem."""


def state_path(path: Path) -> Path | None:
    for name in (STATE_FILE, *LEGACY_STATE_FILES):
        if (path / name).is_file():
            return path / name
    return None


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and _CHECKPOINT_DIR.match(path.name) is not None and state_path(path) is not None


def inside(path: Path, folder: Path) -> bool:
    """Whether `path` lies in `folder` (symlinks resolved)."""
    return Path(os.path.realpath(folder)) in Path(os.path.realpath(path)).parents


def _position(path: Path) -> tuple:
    """Training position of a checkpoint: its step (from the state file), then its name. An
    unreadable state sorts last, so that 'latest' picks it and reports what is wrong with it."""
    m = _CHECKPOINT_DIR.match(path.name)
    try:
        step = int(json.loads(state_path(path).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return (math.inf, m.group(1), int(m.group(2)))
    return (step, m.group(1), int(m.group(2)))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (step_N and epoch_N) in output_dir, oldest training position first."""
    if not output_dir.is_dir():
        return []
    return sorted((c for c in output_dir.iterdir() if is_checkpoint(c)), key=_position)


def resolve(spec: str, output_dir: Path) -> Path | None:
    """`--resume_from_checkpoint` -> a verified checkpoint folder; None for 'latest' when there is
    none yet (a re-queued job then starts from scratch). Raises UsageError for anything else."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            return None
        verify(found[-1])
        return found[-1]
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"--resume_from_checkpoint {spec}: no such folder")
    if not path.is_dir() or state_path(path) is None or not _CHECKPOINT_DIR.match(path.name):
        raise UsageError(f"--resume_from_checkpoint {spec} is not a checkpoint (no {STATE_FILE}); "
                         "checkpoints are the OUTPUT_DIR/step_N and epoch_N folders written by "
                         "--checkpointing_steps")
    verify(path)
    return path


# ----------------------------------------------------------------------------- integrity


_STATE_COUNTERS = ("step", "epoch", "batches_in_epoch", "units")


def read_state(path: Path) -> dict:
    """The checkpoint's state file, checked: raises CheckpointError naming the file and the fault."""
    file = state_path(path)
    if file is None:
        raise CheckpointError(f"{path}: no {STATE_FILE} in it")
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: unreadable ({err})") from None
    except ValueError as err:
        raise CheckpointError(f"{file}: not valid JSON ({err}); the checkpoint is damaged, resume from "
                              "another one") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(state).__name__}")
    for key in _STATE_COUNTERS:
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{file}: {key!r} is {value!r}, expected a non-negative integer")
    m = _CHECKPOINT_DIR.match(path.name)
    if m and m.group(1) == "step" and state["step"] != int(m.group(2)):
        raise CheckpointError(f"{file}: records step {state['step']} but the folder is {path.name}")
    return state


def _check_safetensors(file: Path) -> None:
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated ({size} bytes, no safetensors header)")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise CheckpointError(f"{file}: truncated (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise CheckpointError(f"{file}: corrupt safetensors header ({err})") from None
    if 8 + n + end != size:
        raise CheckpointError(f"{file}: {size} bytes but its header describes {8 + n + end} "
                              f"({'truncated' if size < 8 + n + end else 'trailing bytes'})")


def _check_torch_file(file: Path) -> None:
    """torch.save writes a zip archive whose directory sits at the end: a cut file has none."""
    with open(file, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        if magic[:1] == b"\x80":  # torch's older pickle format: checked when it is loaded
            return
        raise CheckpointError(f"{file}: not a torch file ({'empty' if not magic else 'unknown format'})")
    try:
        with zipfile.ZipFile(file) as z:
            z.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{file}: truncated or corrupt ({err})") from None


def verify(path: Path) -> dict:
    """Everything checkable before loading: the state file, the presence of model, optimizer and
    RNG states, and the integrity of every weights/state file. Returns the state."""
    state = read_state(path)
    names = [p.name for p in path.iterdir()]
    for what, prefixes in (("model weights", ("model", "pytorch_model")), ("optimizer state", ("optimizer",)),
                           ("RNG states", ("random_states_",))):
        if not any(n.startswith(prefixes) for n in names):
            raise CheckpointError(f"{path}: no {what} in it ({', '.join(p + '*' for p in prefixes)}); "
                                  "the checkpoint is incomplete, resume from another one")
    for file in sorted(path.iterdir()):
        if not file.is_file():
            continue
        if file.stat().st_size == 0:
            raise CheckpointError(f"{file}: empty file")
        if file.suffix == ".safetensors":
            _check_safetensors(file)
        elif file.suffix in (".bin", ".pt", ".pkl", ".pth"):
            _check_torch_file(file)
    return state


def saved_processes(path: Path) -> int:
    """How many processes wrote the checkpoint (accelerate saves one RNG state file per process)."""
    return sum(1 for p in path.glob("random_states_*.pkl"))


def optimizer_state_holders(optimizer) -> list[int]:
    """Positions (in param_groups order) of the parameters that hold optimizer state."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return [i for i, p in enumerate(params) if optimizer.state.get(p)]


def optimizer_state_problem(optimizer, state: dict, path: Path) -> str | None:
    """After load_state: every parameter that held AdamW state when the checkpoint was written must
    hold it again (accelerate can leave it empty without an error, e.g. FSDP1 with sharded state
    dicts). Returns what is wrong, or None."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    holders = set(optimizer_state_holders(optimizer))
    expected = state.get("optimizer_state_params")
    if expected is None:  # an older checkpoint: at least some state after a step
        missing = [] if holders or state["step"] == 0 else list(range(len(params)))
    else:
        missing = [i for i in expected if i not in holders]
    if not missing:
        return None
    return (f"{path}: the optimizer state of {len(missing)} of {len(params)} parameters was not restored by "
            "accelerate's load_state (resuming would restart AdamW's moments); check the accelerate/FSDP "
            "state-dict settings")


# ----------------------------------------------------------------------------- saving


def save(accelerator, output_dir: Path, name: str, state: dict) -> Path:
    """Every process calls this (accelerate saves per-process RNG states). `name`: step_N or epoch_N."""
    final = output_dir / name
    tmp = output_dir / f".tmp-{name}"
    if accelerator.is_main_process:
        for stale in output_dir.iterdir():
            if _TMP_DIR.match(stale.name):
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


def prune(output_dir: Path, limit: int, keep: Path) -> list[Path]:
    """--save_total_limit: delete the oldest complete checkpoints (by training position) beyond
    `limit`, never `keep` (the one just written) nor one whose state cannot be read."""
    ordered = [c for c in list_checkpoints(output_dir) if _position(c)[0] != math.inf]
    removed = []
    for old in ordered:
        if len(ordered) - len(removed) <= limit:
            break
        if old != keep:
            shutil.rmtree(old)
            removed.append(old)
    return removed


# ----------------------------------------------------------------------------- output folder


# What older versions wrote at the top of OUTPUT_DIR before the outputs list existed: removed from a
# folder without a list only when its metrics.json shows that these scripts wrote it.
_LEGACY_OUTPUTS = ("log.jsonl", "metrics.json", "config.json", "generation_config.json", "model.safetensors",
                   "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                   "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "vocab.txt", "added_tokens.json", "preprocessor_config.json",
                   "chat_template.jinja", "hf_gemact_clm", "hf_gemact_mlm", "hf_gemact_image")
_LEGACY_SHARDS = re.compile(r"model-\d+-of-\d+\.safetensors\Z")


def _listed_outputs(output_dir: Path) -> list[str] | None:
    try:
        names = json.loads((output_dir / OUTPUTS_FILE).read_text())["outputs"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{output_dir / OUTPUTS_FILE}: unreadable ({err}); it lists what earlier runs "
                         "wrote there; delete the folder's old outputs by hand") from None
    # Only plain names at the top of OUTPUT_DIR: a damaged list must not reach anything else.
    return [n for n in names if isinstance(n, str) and n and "/" not in n and "\\" not in n
            and n not in (".", "..")]


def record_outputs(output_dir: Path, names) -> None:
    """Add top-level names of OUTPUT_DIR that this run wrote to the outputs list (main process)."""
    listed = _listed_outputs(output_dir) or []
    merged = sorted(set(listed) | {str(n) for n in names})
    if merged == sorted(listed) and (output_dir / OUTPUTS_FILE).exists():
        return
    tmp = output_dir / f".{OUTPUTS_FILE}.tmp"
    tmp.write_text(json.dumps({"outputs": merged}, indent=1) + "\n")
    os.replace(tmp, output_dir / OUTPUTS_FILE)


def _written_by_these_scripts(metrics: Path) -> bool:
    try:
        return "hf_gemact" in json.loads(metrics.read_text()).get("versions", {})
    except (OSError, ValueError, AttributeError):
        return False


def previous_outputs(output_dir: Path) -> list[Path]:
    """What `--overwrite_output_dir` removes: the names in the outputs list (or, for a folder from
    before the list, the names older versions wrote, when its metrics.json is theirs), every
    checkpoint folder (recognised by its state file), unfinished `.tmp-*` checkpoints and the list
    itself. Anything else in the folder was not written by these scripts and stays."""
    if not output_dir.is_dir():
        return []
    listed = _listed_outputs(output_dir)
    if listed is None:
        ours = _written_by_these_scripts(output_dir / "metrics.json")
        listed = [n for n in os.listdir(output_dir) if ours and (n in _LEGACY_OUTPUTS or _LEGACY_SHARDS.match(n))]
        if not ours and any(is_checkpoint(c) for c in output_dir.iterdir()):
            listed += ["log.jsonl"]  # an interrupted run's log beside its checkpoints
    doomed = {output_dir / n for n in listed if (output_dir / n).exists() or (output_dir / n).is_symlink()}
    doomed |= {c for c in output_dir.iterdir() if is_checkpoint(c) or _TMP_DIR.match(c.name)}
    if (output_dir / OUTPUTS_FILE).exists():
        doomed.add(output_dir / OUTPUTS_FILE)
    return sorted(doomed)


def remove_previous_outputs(output_dir: Path) -> list[Path]:
    doomed = previous_outputs(output_dir)
    for path in doomed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return doomed
