"""`hf-gemact inspect SRC --stats --data FILE_OR_DATASET`: --data read into batches of model inputs
(text through SRC's tokenizer, images through its image processor), and the statistics printed and
written (stats.py computes them)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from .cli import HUB_ID, CommandError, one_line

DEFAULT_STATS_SAMPLES = 256
STATS_BATCH_SIZE = 16
STATS_MAX_LENGTH = 128  # tokens per text sample (less when the model's context is shorter)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_TABLE_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def check_stats_flags(args) -> None:
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
    if HUB_ID.match(data.split(":")[0]) and data.count(":") <= 1:
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
        raise CommandError(f"--data {data}: cannot load it as {what} ({one_line(err)})") from err
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
            raise CommandError(f"--data {data}: cannot read it as UTF-8 text ({one_line(err)})") from err
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
            raise CommandError(f"--data {data}: {file} is not a readable image ({one_line(err)})") from err
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
        raise CommandError(f"{src}: no tokenizer to turn --data into tokens ({one_line(err)}); save the "
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


def print_stats(args, model) -> None:
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
