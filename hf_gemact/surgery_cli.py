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
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .cli import HUB_ID as _HUB_ID
from .cli import CommandError, one_line as _one_line
from .inspect_stats import DEFAULT_STATS_SAMPLES, check_stats_flags, data_location, print_stats, stats_batches
from .stats import NEAR_ZERO
from .surgery import describe_sites

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

    location = checkpoint_location(src)  # importing this module imported hf_gemact: names and load hook are in place
    try:
        return load_model(location)
    except SurgeryError:
        raise  # a malformed hf_gemact record: its message names the entry and the file
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        where = "" if Path(location).is_dir() else " (no such folder, so it was taken for a Hub id)"
        raise CommandError(f"{src}{where}: cannot load the checkpoint: {_one_line(err)}") from err


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
    check_stats_flags(args)
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
        print_stats(args, model)
    return 0


CALIBRATION_SAMPLES = 128  # --calibrate's default: a few batches are enough to fit a handful of parameters


def check_calibration_flags(args) -> None:
    if args.calibration_samples is not None and args.calibrate is None:
        raise CommandError("--calibration_samples only goes with --calibrate FILE_OR_DATASET")
    if args.calibrate is not None:
        if args.blend is not None:
            raise CommandError("--calibrate and --blend do not go together (the bias correction is exact for the new "
                               "activation, not for a blend); pass one of them")
        with _as_calibrate_flag():
            data_location(args.calibrate)


@contextlib.contextmanager
def _as_calibrate_flag():
    """inspect --stats' data readers name their flag --data; here the same data come from --calibrate."""
    try:
        yield
    except CommandError as err:
        raise CommandError(str(err).replace("--data", "--calibrate", 1)) from err


def cmd_patch(args) -> int:
    import hf_gemact
    from .hub import push_folder, write_model_card
    from .surgery import canonical_name

    # every check that can fail on the command line runs before the checkpoint is loaded
    checkpoint_location(args.src)
    target = destination(args.src, args.dst, args.overwrite)
    repo = _hub_repo(args, target)
    canonical_name(args.act)
    check_calibration_flags(args)

    model = load_checkpoint(args.src).eval()
    reference = copy.deepcopy(model)
    calibrate = None
    if args.calibrate is not None:
        with _as_calibrate_flag():
            calibrate, n = stats_batches(model, args.src, args.calibrate, args.calibration_samples or CALIBRATION_SAMPLES)
        print(f"calibrating on {n} samples of {args.calibrate}")
    report = hf_gemact.patch_activations(model, args.act, layers=args.layers,
                                         blend=args.blend is not None, heads=args.heads, calibrate=calibrate)
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


def _flag_value(parse, what: str, valid, range_text: str):
    """An argparse `type` that parses a flag's value with `parse` and accepts it when `valid(value)`."""
    def convert(text: str):
        import argparse

        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"{text} is not {range_text}")
        return value

    return convert


_positive_int = _flag_value(int, "an integer", lambda v: v >= 1, ">= 1")
_near_zero = _flag_value(float, "a number", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
_blend_t = _flag_value(float, "a number", lambda t: math.isfinite(t) and 0.0 <= t <= 1.0, "in [0, 1]")


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
    p.add_argument("--calibrate", default=None, metavar="FILE_OR_DATASET",
                   help="calibrate the patch on this data (as --data of inspect --stats): per site the family's "
                        "free parameters are fitted to the old activation and the remaining mean error is folded "
                        "into the bias of the projection that reads it")
    p.add_argument("--calibration_samples", type=_positive_int, default=None, metavar="K",
                   help=f"with --calibrate: use its first K samples (default {CALIBRATION_SAMPLES})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST if it is a non-empty folder (never allowed: DST = SRC, inside or around it)")
    p.add_argument("--push_to_hub", action="store_true",
                   help="after DST is saved, upload it to the Hub (huggingface_hub; the model card goes along)")
    p.add_argument("--hub_model_id", default=None,
                   help="repo to push to, NAME or ORG/NAME (default: DST's folder name, in your namespace)")
    p.add_argument("--hub_token", default=None, help="Hub token (default: HF_TOKEN or the cached login)")
    p.set_defaults(func=cmd_patch)
