"""The three tasks: how each builds its model and datasets and how it scores a validation batch.

The loop (`loop.py`) knows nothing task-specific; a task returns a `Setup` and scores batches as
per-example sums (loss summed over the example's scored tokens, and their count), which
`hf_gemact.metrics.mean_loss` turns into a mean loss exactly, whatever the batching or the number
of processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import data
from .args import UsageError

ACTIVATION_ATTRS = ("activation_function", "hidden_act", "hidden_activation")


@dataclass
class Setup:
    model: torch.nn.Module
    train_dataset: Any
    eval_dataset: Any
    processor: Any  # tokenizer or image processor, saved beside the model
    collate_fn: Callable | None = None
    info: dict = field(default_factory=dict)  # extra facts for metrics.json
    teacher: torch.nn.Module | None = None  # --distill_weight: the checkpoint before surgery


# ----------------------------------------------------------------------------- model / config


def activation_attr(config) -> str | None:
    for attr in ACTIVATION_ATTRS:
        if hasattr(config, attr):
            return attr
    return None


def pretrained(loader, source, args, **kwargs):
    """`loader(source)` with --trust_remote_code; a folder or repository with custom code, refused
    without the flag, gives a one-line error instead of transformers' traceback."""
    try:
        return loader(source, trust_remote_code=args.trust_remote_code, **kwargs)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise UsageError(f"{source} holds custom code (auto_map); pass --trust_remote_code to run it, "
                             "only for sources you trust") from None
        raise


def build_config(args, defaults: dict | None = None):
    from transformers import CONFIG_MAPPING, AutoConfig

    if args.model_name_or_path:
        config = pretrained(AutoConfig.from_pretrained, args.model_name_or_path, args)
    elif args.config_name:
        config = pretrained(AutoConfig.from_pretrained, args.config_name, args)
    else:
        if args.model_type not in CONFIG_MAPPING:
            raise UsageError(f"--model_type {args.model_type!r} is not a transformers model type")
        config = CONFIG_MAPPING[args.model_type](**(defaults or {}))
    if args.config_overrides:
        try:
            config.update_from_string(args.config_overrides)
        except ValueError as err:
            raise UsageError(f"--config_overrides {args.config_overrides!r}: {err}") from None
    if args.activation and not args.model_name_or_path:
        attr = activation_attr(config)
        if attr is None:
            raise UsageError(f"{type(config).__name__} has no activation field ({', '.join(ACTIVATION_ATTRS)})")
        setattr(config, attr, args.activation)
    return config


def _load_pretrained_weights(auto_class, args, config, **kwargs):
    try:
        return pretrained(auto_class.from_pretrained, args.model_name_or_path, args, config=config,
                          ignore_mismatched_sizes=args.ignore_mismatched_sizes, **kwargs)
    except RuntimeError as err:
        if "ignore_mismatched_sizes" not in str(err):
            raise
        raise UsageError(f"--model_name_or_path {args.model_name_or_path}: some weights differ in shape from "
                         "the model built for this data (e.g. a classifier head for another number of labels); "
                         "pass --ignore_mismatched_sizes to start those weights fresh") from None


def build_model(auto_class, args, config, **kwargs):
    """(model, surgery report, teacher): the teacher (--distill_weight) is a copy of the loaded
    checkpoint taken before surgery, so that it holds exactly the weights the student starts from,
    a freshly initialised head included, with the old activations."""
    if args.model_name_or_path:
        model = _load_pretrained_weights(auto_class, args, config, **kwargs)
        if args.activation:
            import hf_gemact

            if not hasattr(hf_gemact, "patch_activations"):
                raise UsageError("--activation on a pretrained model needs hf_gemact.patch_activations "
                                 "(model surgery), which this installation lacks")
            teacher = frozen_copy(model) if args.distill_weight > 0 else None
            report = hf_gemact.patch_activations(model, args.activation, blend=args.blend_steps > 0)
            return model, report, teacher
        return model, None, None
    return auto_class.from_config(config, trust_remote_code=args.trust_remote_code), None, None


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy that never trains: eval mode (no dropout), no parameter asks for a gradient."""
    import copy

    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


def check_teacher_vocabulary(teacher, tokenizer_size: int) -> None:
    """A tokenizer larger than the checkpoint's vocabulary makes the student grow new output rows
    that the teacher has no probability for: the two distributions would not be comparable."""
    if teacher is None:
        return
    rows = teacher.get_input_embeddings().weight.shape[0]
    if tokenizer_size > rows:
        raise UsageError(f"--distill_weight: the tokenizer has {tokenizer_size} tokens, the checkpoint's vocabulary "
                         f"{rows}; the teacher cannot score the added tokens. Use the checkpoint's own tokenizer "
                         "(leave --tokenizer_name out), or leave --distill_weight out")


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 x KL(teacher || student) of softmax(logits / T), summed over the classes and averaged
    over the rows (the scored positions); float32 whatever the logits' precision. T^2 keeps the
    gradient's scale as T changes (Hinton et al. 2015: the gradient of the softened KL shrinks
    as 1/T^2)."""
    t = temperature
    if student_logits.shape[0] == 0:  # nothing scored in this micro-batch: a zero that keeps the graph
        return student_logits.float().sum() * 0.0
    log_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_row = F.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(-1)
    return per_row.mean() * (t * t)


def current_activation(model, args) -> str | None:
    if args.activation:
        return args.activation
    attr = activation_attr(model.config)
    return getattr(model.config, attr) if attr else None


def per_example_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, number of scored tokens) per example; labels -100 are skipped."""
    loss = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="none")
    loss = loss.view(labels.shape)
    if loss.dim() == 1:
        return loss, (labels != -100).long()
    return loss.sum(-1), (labels != -100).sum(-1)


# ----------------------------------------------------------------------------- text tasks


def load_tokenizer(args, raw, column, task):
    from transformers import AutoTokenizer

    source = args.tokenizer_name or args.model_name_or_path
    if source:
        return pretrained(AutoTokenizer.from_pretrained, source, args, use_fast=not args.use_slow_tokenizer)
    train = raw["train"]

    def texts():
        for i in range(0, len(train), 1000):
            yield from (t for t in train[i: i + 1000][column] if t)

    return data.train_bpe_tokenizer(texts, task, args.vocab_size, data.text_fingerprint(train, column))


def _map_kwargs(args, desc):
    return dict(batched=True, num_proc=args.preprocessing_num_workers,
                load_from_cache_file=not args.overwrite_cache, desc=desc)


def _select(dataset, n):
    return dataset.select(range(min(n, len(dataset)))) if n is not None else dataset


def _tokenize(raw, column, tokenizer, args, **tok_kwargs):
    def tokenize(batch):
        return tokenizer([t or "" for t in batch[column]], **tok_kwargs)

    return raw.map(tokenize, remove_columns=raw["train"].column_names, **_map_kwargs(args, "tokenizing"))


def _check_blocks(ds, size_flag, size):
    for split in ("train", "validation"):
        if len(ds[split]) == 0:
            raise UsageError(f"the {split} split is too small for one block of {size} tokens "
                             f"({size_flag}); give more text or a smaller {size_flag}")


def _note_slow_tokenizer(args, tokenizer, accelerator) -> None:
    if getattr(args, "use_slow_tokenizer", False) and getattr(tokenizer, "is_fast", False):
        accelerator.print("note: --use_slow_tokenizer: this transformers version loads the tokenizers "
                          f"(Rust) tokenizer {type(tokenizer).__name__} anyway; tokenization is the same")


class CausalLM:
    name, unit, best_key, greater_is_better = "clm", "tokens", "loss", False
    metric_keys = ("loss", "perplexity")

    def setup(self, args, accelerator) -> Setup:
        from transformers import AutoModelForCausalLM

        config = build_config(args)
        with accelerator.main_process_first():
            raw, column = data.load_raw_text(args)
            tokenizer = load_tokenizer(args, raw, column, "clm")
        _note_slow_tokenizer(args, tokenizer, accelerator)
        n_pos = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        block = args.block_size or min(1024, n_pos or 1024, tokenizer.model_max_length)
        if n_pos and block > n_pos:
            raise UsageError(f"--block_size {block} exceeds the model's context length {n_pos}")
        args.block_size = block

        def group(batch):
            ids = [t for seq in batch["input_ids"] for t in seq]
            n = len(ids) // block * block
            chunks = [ids[i: i + block] for i in range(0, n, block)]
            return {"input_ids": chunks, "attention_mask": [[1] * block for _ in chunks],
                    "labels": [list(c) for c in chunks]}

        with accelerator.main_process_first():
            tokenized = _tokenize(raw, column, tokenizer, args)
            lm = tokenized.map(group, remove_columns=tokenized["train"].column_names,
                               **_map_kwargs(args, f"grouping into blocks of {block}"))
        _check_blocks(lm, "--block_size", block)
        if not args.model_name_or_path:
            config.vocab_size = len(tokenizer)
            config.bos_token_id = tokenizer.bos_token_id
            config.eos_token_id = tokenizer.eos_token_id
        model, report, teacher = build_model(AutoModelForCausalLM, args, config)
        check_teacher_vocabulary(teacher, len(tokenizer))
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        train, val = _select(lm["train"], args.max_train_samples), _select(lm["validation"], args.max_eval_samples)
        train.set_format("torch")
        val.set_format("torch")
        return Setup(model, train, val, tokenizer, teacher=teacher,
                     info={"block_size": block, "text_column": column, "surgery": _report(report)})

    def units(self, batch) -> int:
        return batch["input_ids"].numel()

    def inputs(self, batch) -> dict:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def scored(self, logits, batch) -> torch.Tensor:
        """The next-token predictions the task loss scores: position i predicts label i + 1."""
        return logits[:, :-1][batch["labels"][:, 1:] != -100]

    def eval_batch(self, model, batch) -> dict:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum, count = per_example_ce(logits[:, :-1], batch["labels"][:, 1:])
        return {"loss_sum": loss_sum, "count": count}


def mask_tokens(ids, special, rng, prob, mask_id, vocab_size):
    """BERT masking of one example: `prob` of the non-special positions are scored; of those 80%
    become the mask token, 10% a random token, 10% stay. At least one position is scored."""
    ids = np.array(ids, dtype=np.int64)
    labels = np.full_like(ids, -100)
    candidates = np.flatnonzero(np.asarray(special) == 0)
    chosen = candidates[rng.random(len(candidates)) < prob]
    if len(chosen) == 0 and len(candidates):
        chosen = rng.choice(candidates, 1)
    labels[chosen] = ids[chosen]
    r = rng.random(len(chosen))
    ids[chosen[r < 0.8]] = mask_id
    swap = chosen[(r >= 0.8) & (r < 0.9)]
    ids[swap] = rng.integers(vocab_size, size=len(swap))
    return ids, labels


class MaskedTrainSet(torch.utils.data.Dataset):
    """Training examples masked afresh each epoch, as a pure function of (seed, epoch, index): no
    global RNG is involved, so a resumed run sees exactly the masks the uninterrupted one saw.
    (`use_epoch`, not `set_epoch`, which accelerate would call with its own iteration count.)"""

    def __init__(self, dataset, seed, prob, mask_id, vocab_size):
        self.dataset, self.seed, self.prob = dataset, seed, prob
        self.mask_id, self.vocab_size, self.epoch = mask_id, vocab_size, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        row = self.dataset[int(i)]
        rng = np.random.default_rng([self.seed, 1, self.epoch, int(i)])
        ids, labels = mask_tokens(row["input_ids"], row["special_tokens_mask"], rng, self.prob,
                                  self.mask_id, self.vocab_size)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.as_tensor(row["attention_mask"]),
                "labels": torch.from_numpy(labels)}


def pad_collate(pad_id: int):
    """Batches of examples of different lengths (--line_by_line): padded to the longest, padding
    neither attended to nor scored."""
    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)

        def stack(key, fill):
            return torch.stack([F.pad(torch.as_tensor(r[key]), (0, width - len(r[key])), value=fill) for r in rows])

        return {"input_ids": stack("input_ids", pad_id), "attention_mask": stack("attention_mask", 0),
                "labels": stack("labels", -100)}

    return collate


class MaskedLM:
    name, unit, best_key, greater_is_better = "mlm", "tokens", "loss", False
    metric_keys = ("loss", "perplexity")

    def setup(self, args, accelerator) -> Setup:
        from transformers import AutoModelForMaskedLM

        config = build_config(args)
        with accelerator.main_process_first():
            raw, column = data.load_raw_text(args)
            tokenizer = load_tokenizer(args, raw, column, "mlm")
        _note_slow_tokenizer(args, tokenizer, accelerator)
        if tokenizer.mask_token_id is None:
            raise UsageError("the tokenizer has no mask token; masked LM needs one")
        cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        if cls_id is None or sep_id is None:
            raise UsageError("the tokenizer needs cls/sep (or bos/eos) tokens for masked LM")
        n_pos = getattr(config, "max_position_embeddings", None) or 512
        seq = args.max_seq_length or min(512, n_pos)
        if seq > n_pos:
            raise UsageError(f"--max_seq_length {seq} exceeds the model's max_position_embeddings {n_pos}")
        if seq < 3:
            raise UsageError(f"--max_seq_length {seq}: must be >= 3 (CLS, SEP and one token)")
        args.max_seq_length = seq
        body = seq - 2
        pad_id = tokenizer.pad_token_id
        if args.line_by_line and pad_id is None:
            raise UsageError("the tokenizer has no pad token; --line_by_line needs one to batch lines")

        def group(batch):
            ids = [t for s in batch["input_ids"] for t in s]
            n = len(ids) // body * body
            chunks = [[cls_id] + ids[i: i + body] + [sep_id] for i in range(0, n, body)]
            return {"input_ids": chunks, "special_tokens_mask": [[1] + [0] * body + [1] for _ in chunks],
                    "attention_mask": [[1] * seq for _ in chunks]}

        def lines(batch):
            # as HF's --line_by_line: each line without its line break, blank lines dropped
            texts = [t.rstrip("\r\n") for t in batch[column] if t and not t.isspace()]
            rows = {"input_ids": [], "special_tokens_mask": [], "attention_mask": []}
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
                ids = [cls_id] + ids[:body] + [sep_id]
                pad = seq - len(ids) if args.pad_to_max_length else 0
                rows["input_ids"].append(ids + [pad_id] * pad)
                rows["special_tokens_mask"].append([1] + [0] * (len(ids) - 2) + [1] * (1 + pad))
                rows["attention_mask"].append([1] * len(ids) + [0] * pad)
            return rows

        mask_id, vocab = tokenizer.mask_token_id, len(tokenizer)
        prob, eval_seed = args.mlm_probability, args.eval_mask_seed

        def fixed_masks(batch, indices):
            out = {"input_ids": [], "attention_mask": [], "labels": []}
            for i, ids, special, attention in zip(indices, batch["input_ids"], batch["special_tokens_mask"],
                                                  batch["attention_mask"]):
                masked, labels = mask_tokens(ids, special, np.random.default_rng([eval_seed, 0, i]),
                                             prob, mask_id, vocab)
                out["input_ids"].append(masked)
                out["attention_mask"].append(attention)
                out["labels"].append(labels)
            return out

        with accelerator.main_process_first():
            if args.line_by_line:
                lm = raw.map(lines, remove_columns=raw["train"].column_names,
                             **_map_kwargs(args, f"one example per line, at most {seq} tokens"))
                for split in ("train", "validation"):
                    if len(lm[split]) == 0:
                        raise UsageError(f"--line_by_line: the {split} split has no non-blank line")
            else:
                tokenized = _tokenize(raw, column, tokenizer, args, add_special_tokens=False)
                lm = tokenized.map(group, remove_columns=tokenized["train"].column_names,
                                   **_map_kwargs(args, f"grouping into sequences of {seq}"))
                _check_blocks(lm, "--max_seq_length", seq)
            val = _select(lm["validation"], args.max_eval_samples)
            val = val.map(fixed_masks, with_indices=True, remove_columns=val.column_names,
                          **_map_kwargs(args, f"fixed validation masks (seed {eval_seed})"))
        if not args.model_name_or_path:
            config.vocab_size = vocab
            config.pad_token_id = tokenizer.pad_token_id
        model, report, teacher = build_model(AutoModelForMaskedLM, args, config)
        check_teacher_vocabulary(teacher, vocab)
        if vocab > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(vocab)
        train = MaskedTrainSet(_select(lm["train"], args.max_train_samples), args.seed, prob, mask_id, vocab)
        val.set_format("torch")
        return Setup(model, train, val, tokenizer, collate_fn=pad_collate(pad_id if pad_id is not None else 0),
                     teacher=teacher, info={"max_seq_length": seq, "eval_mask_seed": eval_seed, "line_by_line": args.line_by_line,
                           "text_column": column, "surgery": _report(report)})

    def units(self, batch) -> int:
        return int(batch["attention_mask"].sum())

    def inputs(self, batch) -> dict:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def scored(self, logits, batch) -> torch.Tensor:
        """The masked positions (the only ones the task loss scores)."""
        return logits[batch["labels"] != -100]

    def eval_batch(self, model, batch) -> dict:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum, count = per_example_ce(logits, batch["labels"])
        return {"loss_sum": loss_sum, "count": count}


# ----------------------------------------------------------------------------- images


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


class ImageClassification:
    name, unit, best_key, greater_is_better = "image", "samples", "accuracy", True
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
                     info={"labels": names, "image_channels": channels, "surgery": _report(report)})

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


def _report(report):
    if report is None:
        return None
    if isinstance(report, (dict, list, str, int, float)):
        return report
    for attr in ("to_dict", "as_dict"):
        if hasattr(report, attr):
            return getattr(report, attr)()
    return str(report)


TASKS = {"clm": CausalLM, "mlm": MaskedLM, "image": ImageClassification}
