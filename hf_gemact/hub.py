"""Model cards and Hub uploads for folders that hf_gemact writes.

    write_model_card(folder, model, base_model="gpt2", metrics=summary, task="clm")  # folder/README.md
    staged_files(folder)                      # what push_folder would upload, sorted
    push_folder(folder, "me/gpt2-gem")        # create the repo (exist_ok) and upload; returns its URL

The card (huggingface_hub's ModelCard) says what a reader of the folder needs and cannot see in
config.json: that loading needs `pip install hf_gemact` and `import hf_gemact`, which activation
every site runs (and what it was patched from), and the run's validation metrics.
Uploads leave out training state (step_*/epoch_* checkpoints), unfinished `.tmp-*` folders and
lock files; any failure raises HubError, whose one-line message says the local folder is complete.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# What push_folder never uploads (fnmatch on the path relative to the folder; `*` crosses `/`),
# on top of huggingface_hub's own DEFAULT_IGNORE_PATTERNS (.git, .cache/huggingface).
IGNORE_PATTERNS = [
    "step_*/*", "*/step_*/*",  # accelerate save_state checkpoints of the training scripts
    "epoch_*/*", "*/epoch_*/*",
    ".tmp-*", "*/.tmp-*",  # folders being written (atomic saves, hf-gemact patch)
    "*.lock", ".lock",  # the training run's writer lock
]

# The scripts' task names and the Hub pipeline tag of the model they train.
_PIPELINE_TAGS = {"clm": "text-generation", "mlm": "fill-mask", "image": "image-classification"}


class HubError(RuntimeError):
    """An upload that failed; the message is one line naming the repo, the cause and the folder."""


# --------------------------------------------------------------------------------------- staging


def staged_files(folder) -> list[str]:
    """The sorted paths (relative to `folder`, with `/`) that push_folder would upload: every file
    that upload_folder lists, minus IGNORE_PATTERNS and huggingface_hub's default ignores."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    root = Path(folder).expanduser().resolve()
    # the same listing as HfApi.upload_folder, so that the two cannot disagree
    files = [p.relative_to(root).as_posix() for p in sorted(root.glob("**/*")) if p.is_file()]
    return sorted(filter_repo_objects(files, ignore_patterns=IGNORE_PATTERNS + DEFAULT_IGNORE_PATTERNS))


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class HubFlagError(ValueError):
    """--push_to_hub / --hub_model_id / --hub_token that cannot work (said before any work)."""


def hub_repo(push_to_hub: bool, hub_model_id, hub_token, folder) -> str | None:
    """The repo id that --push_to_hub uses, with HF no_trainer semantics (--hub_model_id, else the
    output folder's name), checked before any work; None without --push_to_hub."""
    if not push_to_hub:
        for flag, value in (("hub_model_id", hub_model_id), ("hub_token", hub_token)):
            if value:
                raise HubFlagError(f"--{flag} has no effect without --push_to_hub")
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo = hub_model_id or Path(folder).expanduser().resolve().name
    try:
        validate_repo_id(repo)
    except HFValidationError as err:
        source = "--hub_model_id" if hub_model_id else "the Hub repo name taken from the output folder's name"
        raise HubFlagError(f"{source} {repo!r} is not a valid repo id ({_one_line(str(err))}); pass "
                           f"--hub_model_id NAME or ORG/NAME") from None
    return repo


def push_folder(folder, repo_id: str, *, token=None, commit_message: str = "Upload with hf_gemact") -> str:
    """Create the model repo `repo_id` (kept if it exists) and upload `folder` to it with
    huggingface_hub's HfApi, leaving out what `staged_files` leaves out. Returns the repo URL.
    Any failure raises HubError; the local folder is never changed."""
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise HubError(f"cannot push to the Hub repo {repo_id!r}: {root} is not a folder")
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        url = api.create_repo(repo_id, exist_ok=True, token=token)
        api.upload_folder(repo_id=url.repo_id, folder_path=root, ignore_patterns=list(IGNORE_PATTERNS),
                          commit_message=commit_message, token=token)
    except Exception as err:
        cause = _one_line(f"{type(err).__name__}: {err}")
        raise HubError(f"pushing to the Hub repo {repo_id!r} failed ({cause}); the local folder is "
                       f"complete at {root}") from err
    return str(url)


# ------------------------------------------------------------------------------------ model card


def _hub_id(base_model) -> str | None:
    """`base_model` as a Hub repo id for the card's metadata, or None. A folder from the Hub cache
    (.../models--org--name/snapshots/REV) gives its repo id; another local path gives None (the
    Hub's metadata check accepts only repo ids there)."""
    if not base_model:
        return None
    text = str(base_model)
    if os.path.exists(text):
        match = re.search(r"models--([^/]+?)(?:--([^/]+))?/snapshots/", Path(text).resolve().as_posix() + "/")
        if not match:
            return None
        return "/".join(part for part in match.groups() if part)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


def _site_rows(model) -> list[dict]:
    """Every activation site: path, block, role, current activation name, what it was patched from
    (in this process, or the old branch of a blend) and the blend t."""
    from .surgery import _STATE, BlendedActivation, find_sites, guess_name
    from .surgery_cli import describe_sites

    rows = describe_sites(model)
    modules = {s.path: s.module for s in find_sites(model)}
    state = model.__dict__.get(_STATE)
    for row in rows:
        module = modules[row["path"]]
        row["from"], row["t"] = None, None
        if isinstance(module, BlendedActivation):
            row["from"], row["t"] = module.old_name, module.t
        elif state is not None and state.originals.get(row["path"], module) is not module:
            prefer = [state.orig_attr_value] if state.attr else []
            row["from"] = guess_name(state.originals[row["path"]], prefer)
    return rows


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _sites_section(rows) -> list[str]:
    lines = ["## Activations", ""]
    if not rows:
        return lines + ["No activation module was found in this model.", ""]
    patched = sum(1 for r in rows if r["from"] is not None)
    lines += [f"{len(rows)} activation sites" + (f", {patched} patched" if patched else "") + ":", "",
              "| site | block | role | activation | patched from | blend t |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['path']}` | {_fmt(r['block'])} | {r['role']} | `{r['name']}` | "
                     f"{'`%s`' % r['from'] if r['from'] else '-'} | {_fmt(r['t'])} |")
    return lines + [""]


_FACTS = ("task", "activation", "steps", "epochs", "train_time_s", "tokens_per_s", "samples_per_s",
          "num_processes", "mixed_precision")


def _metrics_section(metrics) -> list[str]:
    if not isinstance(metrics, dict):
        return []
    lines = ["## Results", ""]
    evals = {label: metrics.get(label) for label in ("final", "best") if isinstance(metrics.get(label), dict)}
    names = []
    for record in evals.values():
        names += [k for k in record if k != "step" and k not in names]
    if evals:
        note = _one_line(metrics.get("validation_loss_note") or "")
        lines += ["Validation metrics of the training run (from its metrics.json" + (f"; {note}" if note else "")
                  + "):", "",
                  "| | step | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
        for label, record in evals.items():
            lines.append(f"| {label} | {_fmt(record.get('step'))} | "
                         + " | ".join(_fmt(record.get(n)) for n in names) + " |")
        lines.append("")
    facts = [f"{k}: {_fmt(metrics[k])}" for k in _FACTS if metrics.get(k) is not None]
    if facts:
        lines += ["Run: " + ", ".join(facts) + ".", ""]
    return lines if len(lines) > 2 else []


def _family_value(model):
    """(config attribute, value) that transformers reads to build the feed-forward activations."""
    from .patches import recipe_for

    for attr in recipe_for(model).config_attrs:
        value = getattr(model.config, attr, None)
        if isinstance(value, str):
            return attr, value
    return None, None


def _loading_section(folder: Path, model, names) -> list[str]:
    import transformers

    from .registry import is_activation_name

    cls = type(model).__name__ if hasattr(transformers, type(model).__name__) else "AutoModel"
    attr, value = _family_value(model)
    ours = sorted(n for n in names if is_activation_name(n))
    lines = ["## How to load", "",
             "The activations come from [hf_gemact](https://pypi.org/project/hf_gemact/); config.json stores "
             "only their names, so install the package and import it before loading:", "",
             "```bash", "pip install hf_gemact", "```", "",
             "```python", "import hf_gemact  # makes the activation names known to transformers",
             f"from transformers import {cls}", "",
             f'model = {cls}.from_pretrained("{folder.name}")  # this folder, or the Hub repo it was pushed to',
             "```", ""]
    if value is not None and is_activation_name(value):
        lines.append(f"Loading without `import hf_gemact` fails with `KeyError: '{value}'`: transformers does not "
                     f"know the activation name that `{attr}` in config.json holds.")
    elif ours:
        lines.append(f"Loading without `import hf_gemact` does not fail but builds the wrong model: transformers "
                     f"ignores `hf_gemact_activations`, so the sites that run {', '.join(ours)} get "
                     f"`{value}` instead.")
    else:
        lines.append("This model runs only transformers' built-in activations, so it also loads without "
                     "hf_gemact.")
    return lines + [""]


def _inherited_metadata(base_model) -> dict:
    """License and language of a local base checkpoint's own card: they still apply after surgery."""
    card = Path(str(base_model)) / "README.md" if base_model else None
    if card is None or not card.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(card).data
    except Exception:  # a README without (valid) card metadata: nothing to inherit
        return {}
    return {k: getattr(data, k) for k in ("license", "language") if getattr(data, k, None)}


def write_model_card(folder, model, *, base_model=None, metrics=None, task=None) -> Path:
    """Write folder/README.md, a huggingface_hub ModelCard for `model` (wrappers are looked
    through): metadata library_name transformers, tags hf_gemact + every activation name used,
    base_model (a Hub id; see `_hub_id`) and the pipeline tag of `task` (or of metrics["task"]);
    text with how to load it, the activation of every site, and the final/best validation metrics
    of `metrics` (the content of metrics.json). Returns the card's path."""
    from huggingface_hub import ModelCard, ModelCardData

    from .surgery import _unwrap

    folder = Path(folder)
    model, _ = _unwrap(model, "write_model_card")
    rows = _site_rows(model)
    names = []
    for r in rows:
        names += [n for n in (r["name"], r["from"]) if isinstance(n, str) and n not in names]
    task = task or (metrics.get("task") if isinstance(metrics, dict) else None)
    pipeline_tag = _PIPELINE_TAGS.get(task, task if isinstance(task, str) and "-" in task else None)
    data = ModelCardData(library_name="transformers", tags=["hf_gemact", *names], base_model=_hub_id(base_model),
                         pipeline_tag=pipeline_tag, **_inherited_metadata(base_model))
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    intro = [f"# {folder.resolve().name}", "",
             f"A `{type(model).__name__}` (model_type `{config.model_type}`, {n_params:,} parameters) whose "
             f"activations are {', '.join(f'`{n}`' for n in names) or 'not recognised'}."]
    if base_model:
        intro.append(f"It was made by activation surgery (`hf_gemact.patch_activations`) on `{base_model}`.")
    body = [*intro, "", *_loading_section(folder.resolve(), model, names), *_sites_section(rows),
            *_metrics_section(metrics)]
    card = ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(body))
    path = folder / "README.md"
    card.save(path)
    return path


__all__ = ["HubError", "IGNORE_PATTERNS", "push_folder", "staged_files", "write_model_card"]
