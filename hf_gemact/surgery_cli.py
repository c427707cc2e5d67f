"""`hf-gemact inspect SRC` and `hf-gemact patch SRC DST --act NAME [--layers ...]`.

`patch` never writes into SRC: DST may not be SRC, inside it or around it (symlinks resolved), and a
non-empty DST is replaced only with --overwrite. Everything is written into a temporary folder
beside DST (`.tmp-DST-*/DST`) that is renamed to DST when complete, so an interrupted patch leaves
DST as it was. Unreadable checkpoints and bad flags end in one line naming the path or flag (exit 2).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import itertools
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .cli import CommandError
from .stats import NEAR_ZERO

# Files that save_pretrained writes itself (never copied from SRC).
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
_MODEL_PATTERNS = ("model-*.safetensors", "pytorch_model-*.bin", "*.ckpt")
# What a training run leaves beside its model: results and logs of that run, its checkpoints.
# They describe SRC's training, not DST (a metrics.json would make DST look like a finished run).
_RUN_FILES = ("metrics.json", "log.jsonl")
_CHECKPOINT_DIR = re.compile(r"(step|epoch)_\d+\Z")
# SRC's own model card is kept under this name; DST's README.md is the card hf_gemact writes.
BASE_CARD = "BASE_README.md"

DEFAULT_STATS_SAMPLES = 256

SAMPLE_TEXT = [
    "The quick brown fox jumps over the lazy dog while the river runs quietly to the sea.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
    "Transformers replace recurrence with attention, and every block ends in a feed-forward layer.",
    "On a cold winter morning the small town woke up under a thick blanket of fresh snow.",
]


def load_model(src: str, **kwargs):
    """The checkpoint's own architecture (config.architectures[0]), else AutoModel."""
    import transformers
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(src)
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls.from_pretrained(src, **kwargs)
    return AutoModel.from_pretrained(src, **kwargs)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?\Z")


def _one_line(err) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def checkpoint_location(src: str) -> str:
    """SRC as from_pretrained takes it: a checkpoint folder (checked: config.json present, valid JSON
    with a model_type) or a Hub id. Anything else raises CommandError naming SRC and the problem."""
    path = Path(src).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            what = "an empty folder" if not any(path.iterdir()) else "a folder without config.json"
            raise CommandError(f"{src}: {what}, not a checkpoint (pass the folder that save_pretrained "
                               f"wrote, with config.json)")
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise CommandError(f"{config}: not valid JSON ({_one_line(err)})") from None
        except OSError as err:
            raise CommandError(f"{config}: cannot read it ({_one_line(err)})") from None
        if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
            raise CommandError(f"{config}: no model_type in it, so transformers cannot tell which model "
                               f"it describes (is it a transformers checkpoint?)")
        return str(path)
    if path.exists():
        hint = f" (pass its folder, {path.parent})" if (path.parent / "config.json").is_file() else ""
        raise CommandError(f"{src}: a file, not a checkpoint folder{hint}")
    if _HUB_ID.match(src):
        return src  # not a local path: from_pretrained looks for a Hub repo of that id
    raise CommandError(f"{src}: no such folder")


def load_checkpoint(src: str):
    """`load_model` with every failure to read SRC turned into a one-line CommandError."""
    from safetensors import SafetensorError

    from .surgery import SurgeryError

    location = checkpoint_location(src)
    import hf_gemact  # noqa: F401  (grammar names and the load hook)

    try:
        return load_model(location)
    except SurgeryError:
        raise  # a malformed hf_gemact record: its message names the entry and the file
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        where = "" if Path(location).is_dir() else " (no such folder, so it was taken for a Hub id)"
        raise CommandError(f"{src}{where}: cannot load the checkpoint: {_one_line(err)}") from err


def describe_sites(model) -> list[dict]:
    """path, role, block, type and activation name of every activation site of `model`."""
    from .patches import recipe_for
    from .surgery import _config_attr, find_sites, guess_name

    recipe = recipe_for(model)
    sites = find_sites(model, recipe)
    attr = _config_attr(model, recipe, sites)
    value = getattr(model.config, attr) if attr else None
    record = getattr(model.config, "hf_gemact_activations", None) or {}
    rows = []
    for s in sites:
        if s.key in record:
            name = record[s.key]
        elif s.role == "mlp" and attr and getattr(s.module, "_hf_gemact_name", None) is None:
            name = value
        else:
            name = guess_name(s.module, [value] if value else [])
        rows.append({"path": s.path, "role": s.role, "block": s.block, "type": type(s.module).__name__,
                     "name": name, "recipe": recipe.family})
    return rows


def format_sites(rows) -> str:
    if not rows:
        return "no activation sites"
    width = max(len(r["path"]) for r in rows)
    lines = [f"{'path':<{width}}  {'role':<11} {'block':>5}  {'type':<24} name"]
    for r in rows:
        block = "-" if r["block"] is None else r["block"]
        lines.append(f"{r['path']:<{width}}  {r['role']:<11} {block:>5}  {r['type']:<24} {r['name']}")
    return "\n".join(lines)


def sample_batch(model, src: str) -> dict:
    """A small built-in batch: SAMPLE_TEXT through SRC's tokenizer for text models (fixed token ids
    when SRC has none), a fixed synthetic image batch for vision models."""
    config = model.config
    if getattr(config, "image_size", None) and getattr(config, "num_channels", None):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        g = torch.Generator().manual_seed(0)
        ramp = torch.linspace(-1, 1, size)
        base = ramp[None, :, None] * ramp[None, None, :]
        noise = torch.rand(4, config.num_channels, size, size, generator=g) * 0.5
        return {"pixel_values": (base + noise - 0.25).clamp(-1, 1)}
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(src)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        batch = tokenizer(SAMPLE_TEXT, return_tensors="pt", padding=True, truncation=True, max_length=32)
        vocab = getattr(config, "vocab_size", None)
        if vocab is None or int(batch["input_ids"].max()) < vocab:
            return dict(batch)
    except Exception:
        pass
    vocab = getattr(config, "vocab_size", 1000)
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, vocab, (4, 24), generator=g)}


def _is_side_file(item: Path) -> bool:
    """A file or folder of SRC that DST should carry (tokenizer, processor, sentence-transformers
    modules, ...): not a weight/config file save_pretrained writes, not hidden (.tmp-*, .lock), not
    a training run's results or checkpoints."""
    name = item.name
    if name in _MODEL_FILES or any(item.match(p) for p in _MODEL_PATTERNS) or name.startswith("."):
        return False
    if name in _RUN_FILES or (item.is_dir() and _CHECKPOINT_DIR.match(name)):
        return False
    return True


def copy_side_files(src: str, dst: str) -> list[str]:
    """Copy tokenizer / processor / other non-model files of a local SRC folder (or save the hub
    tokenizer and image processor) into DST. SRC's README.md becomes BASE_CARD."""
    copied = []
    src_path = Path(src)
    if src_path.is_dir():
        for item in sorted(src_path.iterdir()):
            if not _is_side_file(item):
                continue
            target = Path(dst) / (BASE_CARD if item.name == "README.md" else item.name)
            if item.is_dir():
                shutil.copytree(item, target, dirs_exist_ok=True)
            else:
                shutil.copy2(item, target)
            copied.append(item.name if target.name == item.name else f"{item.name} (as {target.name})")
        return copied
    for loader in ("AutoTokenizer", "AutoImageProcessor"):
        try:
            import transformers

            getattr(transformers, loader).from_pretrained(src).save_pretrained(dst)
            copied.append(loader)
        except Exception:
            pass
    return copied


# --------------------------------------------------------------------------- a safe destination


def destination(src: str, dst: str, overwrite: bool) -> Path:
    """DST resolved (symlinks followed), after refusing every DST that would lose work: SRC itself,
    a folder inside SRC or one that contains SRC, a file, or a non-empty folder without
    `overwrite`. Nothing is touched here."""
    given = Path(dst).expanduser()
    target = given.resolve()
    shown = f"DST {dst}" + (f" (which resolves to {target})" if given.absolute() != target else "")
    source = Path(src).expanduser()
    if source.exists():
        source = source.resolve()
        if target == source:
            raise CommandError(f"{shown} is the source checkpoint {src}: write the patched copy to another folder")
        if source in target.parents:
            raise CommandError(f"{shown} is inside the source checkpoint {src}: write the patched copy "
                               f"outside it")
        if target in source.parents:
            raise CommandError(f"{shown} contains the source checkpoint {src}: write the patched copy to "
                               f"a folder outside it")
    if target.exists() and not target.is_dir():
        raise CommandError(f"{shown} is a file: give a folder for the patched checkpoint")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise CommandError(f"{shown} exists and is not empty: pass --overwrite to replace it, or choose a "
                           f"new folder")
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staging_folder(target: Path, overwrite: bool):
    """A fresh folder to write into, named like `target` (the model card takes its title from it)
    inside a `.tmp-*` folder beside `target`. When the block ends without error it becomes `target`
    by rename (replacing an existing one only with `overwrite`); otherwise it is removed and
    `target` is as it was. A crash while writing leaves only the `.tmp-*` folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        stage = holder / target.name
        stage.mkdir(mode=0o777 & ~_umask())  # mkdtemp's folder is private; DST gets the usual mode
        yield stage
        _move_into_place(stage, target, overwrite, holder / "replaced")
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def _move_into_place(new: Path, target: Path, overwrite: bool, aside: Path) -> None:
    try:
        os.rename(new, target)  # target absent or an empty folder: one atomic step
        return
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not target.is_dir():
            raise
        if not overwrite:
            raise CommandError(f"DST {target} was filled by something else while patching: it is left as "
                               f"it is; pass --overwrite to replace it") from None
    # two renames: a crash between them leaves no DST, but both complete folders in the .tmp-* one
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise


def _hub_repo(args, target: Path) -> str | None:
    from .hub import HubFlagError, hub_repo

    try:
        return hub_repo(args.push_to_hub, args.hub_model_id, args.hub_token, target)
    except HubFlagError as err:
        raise CommandError(str(err).replace("the output folder's name", "DST's folder name")) from None


def cmd_inspect(args) -> int:
    _check_stats_flags(args)
    model = load_checkpoint(args.src)
    rows = describe_sites(model)
    config = model.config
    print(f"{args.src}: {type(model).__name__} (model_type={config.model_type!r}, recipe "
          f"{rows[0]['recipe'] if rows else '-'}), {len(rows)} activation sites")
    print(format_sites(rows))
    for attr in ("hf_gemact_activations", "hf_gemact_blend"):
        if getattr(config, attr, None):
            print(f"{attr}: {getattr(config, attr)}")
    if args.stats:
        _print_stats(args, model)
    return 0


# ------------------------------------------------------------------- inspect --stats: data and output

STATS_BATCH_SIZE = 16
STATS_MAX_LENGTH = 128  # tokens per text sample (less when the model's context is shorter)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_TABLE_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _check_stats_flags(args) -> None:
    """Every --stats problem that can be seen without the checkpoint, before it is loaded."""
    extras = [flag for flag, value in (("--data", args.data), ("--json", args.json), ("--plot", args.plot),
                                       ("--stats_samples", args.stats_samples)) if value is not None]
    if not args.stats:
        if extras:
            raise CommandError(f"{', '.join(extras)} only go with --stats (hf-gemact inspect SRC --stats --data FILE)")
        return
    if args.data is None:
        raise CommandError("--stats needs --data FILE_OR_DATASET: a text file (one sample per line), "
                           ".json/.jsonl/.csv/.parquet with a text column, a folder of images, or a dataset name")
    data_location(args.data)
    for flag, value in (("--json", args.json), ("--plot", args.plot)):
        if value is not None and Path(value).expanduser().is_dir():
            raise CommandError(f"{flag} {value} is a folder: give a file name")


def data_location(data: str):
    """--data as a Path when it exists, else a dataset name (checked for form only)."""
    path = Path(data).expanduser()
    if path.exists():
        return path
    if _HUB_ID.match(data.split(":")[0]) and data.count(":") <= 1:
        return None
    raise CommandError(f"--data {data}: no such file or folder (nor a dataset name like NAME or NAME:CONFIG)")


def is_vision(model) -> bool:
    config = model.config
    return bool(getattr(config, "image_size", None) and getattr(config, "num_channels", None))


def _load_dataset_rows(data: str, path, samples: int, what: str):
    """The first `samples` rows of a table file or of a dataset name (split validation, else test,
    else train); failures become one-line CommandErrors."""
    import datasets

    try:
        if path is not None:
            return datasets.load_dataset(_TABLE_SUFFIXES[path.suffix.lower()], data_files=str(path), split="train")
        name, _, config = data.partition(":")
        splits = datasets.load_dataset(name, config or None)
    except Exception as err:  # noqa: BLE001  (datasets raises many kinds for a bad file or name)
        raise CommandError(f"--data {data}: cannot load it as {what} ({_one_line(err)})") from err
    for split in ("validation", "test", "train"):
        if split in splits:
            return splits[split]
    return next(iter(splits.values()))


def _column(dataset, data: str, names, kind: str) -> str:
    for name in names:
        if name in dataset.column_names:
            return name
    raise CommandError(f"--data {data}: no {kind} column (looked for {', '.join(names)}; columns: "
                       f"{', '.join(dataset.column_names)})")


def stats_texts(data: str, samples: int) -> list[str]:
    """Up to `samples` texts: the non-empty lines of a text file, or the text column ('text', else
    the only string column) of a .json/.jsonl/.csv/.parquet file or a dataset."""
    path = data_location(data)
    if path is not None and path.is_dir():
        raise CommandError(f"--data {data} is a folder: a text checkpoint takes a text file (one sample per line), "
                           f".json/.jsonl/.csv/.parquet with a text column, or a dataset name")
    if path is not None and path.suffix.lower() not in _TABLE_SUFFIXES:
        try:
            with open(path, encoding="utf-8") as f:
                texts = [line.strip() for line in itertools.islice((l for l in f if l.strip()), samples)]
        except (OSError, UnicodeDecodeError) as err:
            raise CommandError(f"--data {data}: cannot read it as UTF-8 text ({_one_line(err)})") from err
    else:
        rows = _load_dataset_rows(data, path, samples, "text data")
        strings = [c for c, f in rows.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
        column = "text" if "text" in rows.column_names else (strings[0] if len(strings) == 1 else None)
        if column is None:
            raise CommandError(f"--data {data}: no 'text' column and {len(strings) or 'no'} string columns "
                               f"(columns: {', '.join(rows.column_names)})")
        texts = [t.strip() for t in rows[column][: samples * 4] if isinstance(t, str) and t.strip()][:samples]
    if not texts:
        raise CommandError(f"--data {data}: no text in it")
    return texts


def stats_images(data: str, samples: int) -> list:
    """Up to `samples` PIL images: the image files of a folder (recursively, sorted), one image file,
    or the image column of a dataset."""
    from PIL import Image

    path = data_location(data)
    if path is None:
        rows = _load_dataset_rows(data, None, samples, "an image dataset")
        column = _column(rows, data, ("image", "img"), "image")
        return list(rows.select(range(min(samples, len(rows))))[column])
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    if not files or files[0].suffix.lower() not in IMAGE_SUFFIXES:
        raise CommandError(f"--data {data}: no image file ({', '.join(IMAGE_SUFFIXES)}) there; a vision checkpoint "
                           f"takes a folder of images, an image file or an image dataset")
    images = []
    for file in files[:samples]:
        try:
            with Image.open(file) as im:
                images.append(im.copy())
        except OSError as err:
            raise CommandError(f"--data {data}: {file} is not a readable image ({_one_line(err)})") from err
    return images


def _image_processor(src: str, model):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(src)
    except (OSError, ValueError):
        pass
    try:  # transformers 5: the PIL backend, which needs no torchvision
        from transformers import ViTImageProcessorPil as ViTImageProcessor
    except ImportError:
        from transformers import ViTImageProcessor
    size = model.config.image_size if isinstance(model.config.image_size, int) else model.config.image_size[0]
    channels = model.config.num_channels
    return ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * channels,
                             image_std=[0.5] * channels)  # what run_image_classification.py uses


def _as_channels(image, channels: int):
    import numpy as np

    a = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def stats_batches(model, src: str, data: str, samples: int) -> tuple[list, int]:
    """(batches of model inputs, number of samples) from --data: images through SRC's image
    processor for vision checkpoints, text through SRC's tokenizer otherwise."""
    if is_vision(model):
        images = stats_images(data, samples)
        processor = _image_processor(src, model)
        channels = model.config.num_channels
        batches = []
        for i in range(0, len(images), STATS_BATCH_SIZE):
            arrays = [_as_channels(im, channels) for im in images[i:i + STATS_BATCH_SIZE]]
            pixels = processor(arrays, input_data_format="channels_last", return_tensors="pt")["pixel_values"]
            batches.append({"pixel_values": pixels})
        return batches, len(images)
    texts = stats_texts(data, samples)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as err:
        raise CommandError(f"{src}: no tokenizer to turn --data into tokens ({_one_line(err)}); save the "
                           f"tokenizer beside the model") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    config = model.config
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    length = min(STATS_MAX_LENGTH, positions or STATS_MAX_LENGTH)
    batches = []
    for i in range(0, len(texts), STATS_BATCH_SIZE):
        batch = dict(tokenizer(texts[i:i + STATS_BATCH_SIZE], return_tensors="pt", padding=True, truncation=True,
                               max_length=length))
        vocab = getattr(config, "vocab_size", None)
        if vocab is not None and int(batch["input_ids"].max()) >= vocab:
            raise CommandError(f"{src}: its tokenizer gives ids up to {int(batch['input_ids'].max())} but the model "
                               f"has {vocab} embeddings (tokenizer and model do not belong together)")
        batches.append(batch)
    return batches, len(texts)


def _print_stats(args, model) -> None:
    from .stats import activation_stats, format_activation_stats, plot_activation_stats

    samples = args.stats_samples or DEFAULT_STATS_SAMPLES
    batches, n = stats_batches(model, args.src, args.data, samples)
    stats = activation_stats(model, batches, near_zero=args.near_zero)
    unit = "images" if is_vision(model) else "texts"
    print(f"\nactivation statistics of the MLP sites on {n} {unit} of {args.data} (near zero: |y| <= "
          f"{args.near_zero:g}; dead: |y| <= it on every position)")
    print(format_activation_stats(stats))
    if args.json:
        out = Path(args.json).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"checkpoint": args.src, "data": args.data, "samples": n, "sites": stats}
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {out}")
    if args.plot:
        title = f"{Path(args.src).name or args.src}: {n} {unit} of {Path(args.data).name or args.data}"
        print(f"wrote {plot_activation_stats(stats, Path(args.plot).expanduser(), title=title)}")


def cmd_patch(args) -> int:
    import hf_gemact
    from .hub import push_folder, write_model_card
    from .surgery import canonical_name

    # every check that can fail on the command line runs before the checkpoint is loaded
    checkpoint_location(args.src)
    target = destination(args.src, args.dst, args.overwrite)
    repo = _hub_repo(args, target)
    canonical_name(args.act)

    model = load_checkpoint(args.src).eval()
    reference = copy.deepcopy(model)
    report = hf_gemact.patch_activations(model, args.act, layers=args.layers,
                                         blend=args.blend is not None, heads=args.heads)
    if args.blend is not None:
        hf_gemact.set_blend(model, args.blend)
    print(report)
    batch = sample_batch(model, args.src)
    print(hf_gemact.activation_drift(reference, model, batch))
    try:
        with staging_folder(target, args.overwrite) as tmp:
            copied = copy_side_files(args.src, tmp)
            model.save_pretrained(tmp)
            write_model_card(tmp, model, base_model=args.src)
    except OSError as err:
        raise CommandError(f"writing DST {args.dst} failed ({_one_line(err)}); DST is as it was") from err
    print(f"saved to {args.dst}" + (f" (copied along: {', '.join(copied)})" if copied else ""))
    if repo is not None:
        print(f"pushed to {push_folder(target, repo, token=args.hub_token)}")
    return 0


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return value


def _near_zero(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 0")
    return value


def _blend_t(text: str) -> float:
    import argparse

    try:
        t = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(t) and 0.0 <= t <= 1.0):
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return t


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="list every activation site of a checkpoint",
                              description="List every activation site (path, role, block, type, name) "
                                          "of a checkpoint folder or hub id.")
    p.add_argument("src", help="checkpoint folder or hub id")
    p.add_argument("--stats", action="store_true",
                   help="also run the model on --data and print per MLP site the zero / near-zero fractions of "
                        "the activation output, the dead units and the input's mean, std and quantiles")
    p.add_argument("--data", default=None, metavar="FILE_OR_DATASET",
                   help="with --stats: a text file (one sample per line), .json/.jsonl/.csv/.parquet with a text "
                        "column, a folder of images (vision checkpoints) or a dataset name NAME[:CONFIG]")
    p.add_argument("--stats_samples", type=_positive_int, default=None, metavar="K",
                   help=f"with --stats: use the first K samples of --data (default {DEFAULT_STATS_SAMPLES})")
    p.add_argument("--near_zero", type=_near_zero, default=NEAR_ZERO, metavar="TAU",
                   help=f"with --stats: |y| <= TAU counts as near zero (default {NEAR_ZERO:g})")
    p.add_argument("--json", default=None, metavar="OUT", help="with --stats: also write the statistics as JSON")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="with --stats: also draw them into a PNG")
    p.set_defaults(func=cmd_inspect)

    p = subparsers.add_parser("patch", help="write a copy of a checkpoint with its MLP activations replaced",
                              description="Replace the MLP activations of SRC by --act, print the report "
                                          "and the drift on a small built-in batch, save to DST with the "
                                          "tokenizer/processor files copied along and a model card "
                                          "(README.md) written.")
    p.add_argument("src", help="checkpoint folder or hub id")
    p.add_argument("dst", help="output folder")
    p.add_argument("--act", required=True, help="activation name (e.g. gem, egem_n3, velu, gelu)")
    p.add_argument("--layers", default=None,
                   help="blocks to patch: comma-separated indices and python slices, e.g. '10,11', "
                        "'-2:' (last two), '6:12' (default: all)")
    p.add_argument("--blend", type=_blend_t, default=None, metavar="T",
                   help="save a blended model at t=T in [0, 1] instead of a direct patch")
    p.add_argument("--heads", action="store_true",
                   help="also patch activations outside the blocks (MLM-head transform, pooler, ...)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST if it is a non-empty folder (never allowed: DST = SRC, inside or around it)")
    p.add_argument("--push_to_hub", action="store_true",
                   help="after DST is saved, upload it to the Hub (huggingface_hub; the model card goes along)")
    p.add_argument("--hub_model_id", default=None,
                   help="repo to push to, NAME or ORG/NAME (default: DST's folder name, in your namespace)")
    p.add_argument("--hub_token", default=None, help="Hub token (default: HF_TOKEN or the cached login)")
    p.set_defaults(func=cmd_patch)
