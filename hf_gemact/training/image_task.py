"""The image task: image classification (ViT family); offline default Fashion-MNIST."""

from __future__ import annotations

import numpy as np
import torch

from . import data
from .common import Setup, Task, _select, build_config, build_model, per_example_ce, pretrained, surgery_note
from .errors import UsageError


VIT_DEFAULTS = dict(image_size=28, patch_size=7, num_channels=1, hidden_size=192, num_hidden_layers=6,
                    num_attention_heads=3, intermediate_size=768)


_GRAY_MODES = ("1", "L", "LA", "La", "I", "F")


def channels_of(image) -> int:
    """1 for a grayscale image (PIL mode or array shape), 3 for anything in colour."""
    mode = getattr(image, "mode", None)
    if mode is not None:
        return 1 if mode in _GRAY_MODES or mode.startswith("I;") else 3
    a = np.asarray(image)
    return 1 if a.ndim == 2 or a.shape[-1] == 1 else 3


def data_channels(dataset, column: str, sample: int = 64) -> int:
    """3 if any of the first `sample` training images is in colour, else 1."""
    images = dataset.select(range(min(sample, len(dataset))))[column]
    return 3 if any(channels_of(im) == 3 for im in images) else 1


def _first(columns, names, flag):
    for n in names:
        if n in columns:
            return n
    raise UsageError(f"no column among {names} in {columns}; pass {flag}")


class ImageClassification(Task):
    name, unit = "image", "samples"
    metric_keys = ("loss", "accuracy")

    def setup(self, args, accelerator) -> Setup:
        import datasets
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        try:  # transformers 5: the PIL backend, which needs no torchvision
            from transformers import ViTImageProcessorPil as ViTImageProcessor
        except ImportError:
            from transformers import ViTImageProcessor

        from .args import image_dirs, override_keys

        train_dir, validation_dir = image_dirs(args)
        with accelerator.main_process_first():
            if args.dataset_name:
                raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name,
                                            **data.remote_code_kwargs(datasets.load_dataset, args))
                raw = data.ensure_validation(raw, args)
            elif train_dir:
                files = {"train": f"{train_dir}/**"}
                if validation_dir:
                    files["validation"] = f"{validation_dir}/**"
                raw = data.ensure_validation(datasets.load_dataset("imagefolder", data_files=files), args)
            else:
                raw = data.load_fashion_mnist()
        cols = raw["train"].column_names
        image_col = args.image_column_name or _first(cols, ("image", "img", "pixel_values"), "--image_column_name")
        label_col = args.label_column_name or _first(cols, ("label", "labels", "fine_label"), "--label_column_name")
        feature = raw["train"].features[label_col]
        names = feature.names if hasattr(feature, "names") else sorted(set(raw["train"][label_col]))
        names = [str(n) for n in names]

        defaults = VIT_DEFAULTS if args.model_type == "vit" else None
        config = build_config(args, defaults)
        config.num_labels = len(names)
        config.id2label = dict(enumerate(names))
        config.label2id = {n: i for i, n in enumerate(names)}
        found = data_channels(raw["train"], image_col)
        if (not args.model_name_or_path and hasattr(config, "num_channels")
                and "num_channels" not in override_keys(args.config_overrides)):
            config.num_channels = found  # a fresh model takes the data's channels (RGB folders stay RGB)
        channels = getattr(config, "num_channels", 3)
        if found != channels:
            accelerator.print(f"note: the images have {found} channel(s), the model {channels}: "
                              + ("grayscale repeated into RGB" if channels == 3 else "colour converted to grayscale"))
        size = getattr(config, "image_size", 224)
        if args.model_name_or_path:
            try:
                processor = pretrained(AutoImageProcessor.from_pretrained, args.model_name_or_path, args)
            except OSError:
                processor = None
        else:
            processor = None
        if processor is None:
            processor = ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * channels,
                                          image_std=[0.5] * channels)

        def to_array(img):
            if hasattr(img, "convert"):  # PIL
                img = img.convert("L" if channels == 1 else "RGB")
            a = np.asarray(img, dtype=np.uint8)
            if a.ndim == 2:
                a = a[:, :, None]
            if a.shape[-1] == 1 and channels == 3:
                a = np.repeat(a, 3, axis=-1)
            if a.shape[-1] != 1 and channels == 1:
                from PIL import Image

                a = np.asarray(Image.fromarray(a[..., :3]).convert("L"))[:, :, None]
            return a

        def transform(batch):
            pixels = processor([to_array(im) for im in batch[image_col]], input_data_format="channels_last",
                               return_tensors="pt")["pixel_values"]
            return {"pixel_values": pixels, "labels": torch.as_tensor(batch[label_col], dtype=torch.long)}

        model, report, teacher = build_model(AutoModelForImageClassification, args, config)
        train = _select(raw["train"], args.max_train_samples).with_transform(transform)
        val = _select(raw["validation"], args.max_eval_samples).with_transform(transform)
        if len(train) == 0 or len(val) == 0:
            raise UsageError("the training or validation image set is empty")
        return Setup(model, train, val, processor, teacher=teacher,
                     info={"labels": names, "image_channels": channels, "surgery": surgery_note(report)})

    def units(self, batch) -> int:
        return batch["labels"].shape[0]

    def inputs(self, batch) -> dict:
        return {"pixel_values": batch["pixel_values"]}

    def scored(self, logits, batch) -> torch.Tensor:
        return logits  # one class distribution per image

    def eval_batch(self, model, batch) -> dict:
        logits = model(pixel_values=batch["pixel_values"]).logits
        loss_sum, count = per_example_ce(logits, batch["labels"])
        return {"loss_sum": loss_sum, "count": count, "pred": logits.argmax(-1), "label": batch["labels"]}
