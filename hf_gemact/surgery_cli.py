"""`hf-gemact inspect SRC` and `hf-gemact patch SRC DST --act NAME [--layers ...]`."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

# Files that save_pretrained writes itself (never copied from SRC).
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
_MODEL_PATTERNS = ("model-*.safetensors", "pytorch_model-*.bin", "*.ckpt")

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


def copy_side_files(src: str, dst: str) -> list[str]:
    """Copy tokenizer / processor / other non-model files of a local SRC folder (or save the hub
    tokenizer and image processor) into DST."""
    copied = []
    src_path = Path(src)
    if src_path.is_dir():
        for item in sorted(src_path.iterdir()):
            if item.name in _MODEL_FILES or any(item.match(p) for p in _MODEL_PATTERNS) or item.name.startswith("."):
                continue
            target = Path(dst) / item.name
            if item.is_dir():
                shutil.copytree(item, target, dirs_exist_ok=True)
            else:
                shutil.copy2(item, target)
            copied.append(item.name)
        return copied
    for loader in ("AutoTokenizer", "AutoImageProcessor"):
        try:
            import transformers

            getattr(transformers, loader).from_pretrained(src).save_pretrained(dst)
            copied.append(loader)
        except Exception:
            pass
    return copied


def cmd_inspect(args) -> int:
    import hf_gemact  # noqa: F401  (grammar names and the load hook)

    model = load_model(args.src)
    rows = describe_sites(model)
    config = model.config
    print(f"{args.src}: {type(model).__name__} (model_type={config.model_type!r}, recipe "
          f"{rows[0]['recipe'] if rows else '-'}), {len(rows)} activation sites")
    print(format_sites(rows))
    for attr in ("hf_gemact_activations", "hf_gemact_blend"):
        if getattr(config, attr, None):
            print(f"{attr}: {getattr(config, attr)}")
    return 0


def cmd_patch(args) -> int:
    import hf_gemact

    model = load_model(args.src).eval()
    reference = copy.deepcopy(model)
    report = hf_gemact.patch_activations(model, args.act, layers=args.layers,
                                         blend=args.blend is not None, heads=args.heads)
    if args.blend is not None:
        hf_gemact.set_blend(model, args.blend)
    print(report)
    batch = sample_batch(model, args.src)
    print(hf_gemact.activation_drift(reference, model, batch))
    Path(args.dst).mkdir(parents=True, exist_ok=True)
    copied = copy_side_files(args.src, args.dst)
    model.save_pretrained(args.dst)
    print(f"saved to {args.dst}" + (f" (copied along: {', '.join(copied)})" if copied else ""))
    return 0


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="list every activation site of a checkpoint",
                              description="List every activation site (path, role, block, type, name) "
                                          "of a checkpoint folder or hub id.")
    p.add_argument("src", help="checkpoint folder or hub id")
    p.set_defaults(func=cmd_inspect)

    p = subparsers.add_parser("patch", help="write a copy of a checkpoint with its MLP activations replaced",
                              description="Replace the MLP activations of SRC by --act, print the report "
                                          "and the drift on a small built-in batch, save to DST with the "
                                          "tokenizer/processor files copied along.")
    p.add_argument("src", help="checkpoint folder or hub id")
    p.add_argument("dst", help="output folder")
    p.add_argument("--act", required=True, help="activation name (e.g. gem, egem_n3, velu, gelu)")
    p.add_argument("--layers", default=None,
                   help="blocks to patch: comma-separated indices and python slices, e.g. '10,11', "
                        "'-2:' (last two), '6:12' (default: all)")
    p.add_argument("--blend", type=float, default=None, metavar="T",
                   help="save a blended model at t=T instead of a direct patch")
    p.add_argument("--heads", action="store_true",
                   help="also patch activations outside the blocks (MLM-head transform, pooler, ...)")
    p.set_defaults(func=cmd_patch)
