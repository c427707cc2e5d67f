"""The text tasks: causal LM (GPT-2 family) and masked LM (BERT family) on a text corpus."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import data
from .common import (Setup, Task, _select, build_config, build_model, check_teacher_vocabulary, per_example_ce,
                     pretrained, surgery_note)
from .errors import UsageError


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


def _text_opening(args, accelerator, task: str):
    """(config, raw text splits, text column, tokenizer): the start of both text tasks."""
    config = build_config(args)
    with accelerator.main_process_first():
        raw, column = data.load_raw_text(args)
        tokenizer = load_tokenizer(args, raw, column, task)
    _note_slow_tokenizer(args, tokenizer, accelerator)
    return config, raw, column, tokenizer


def _text_model(auto_class, args, config, tokenizer, **token_ids):
    """(model, surgery report, teacher) for a text task: a fresh model takes the tokenizer's size and
    `token_ids`; the embeddings grow when the tokenizer has more tokens than the checkpoint."""
    vocab = len(tokenizer)
    if not args.model_name_or_path:
        config.vocab_size = vocab
        for name, value in token_ids.items():
            setattr(config, name, value)
    model, report, teacher = build_model(auto_class, args, config)
    check_teacher_vocabulary(teacher, vocab)
    if vocab > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab)
    return model, report, teacher


class CausalLM(Task):
    name, unit = "clm", "tokens"
    metric_keys = ("loss", "perplexity")

    def setup(self, args, accelerator) -> Setup:
        from transformers import AutoModelForCausalLM

        config, raw, column, tokenizer = _text_opening(args, accelerator, "clm")
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
        model, report, teacher = _text_model(AutoModelForCausalLM, args, config, tokenizer,
                                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        train, val = _select(lm["train"], args.max_train_samples), _select(lm["validation"], args.max_eval_samples)
        train.set_format("torch")
        val.set_format("torch")
        return Setup(model, train, val, tokenizer, teacher=teacher,
                     info={"block_size": block, "text_column": column, "surgery": surgery_note(report)})

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


class MaskedLM(Task):
    name, unit = "mlm", "tokens"
    metric_keys = ("loss", "perplexity")

    def setup(self, args, accelerator) -> Setup:
        from transformers import AutoModelForMaskedLM

        config, raw, column, tokenizer = _text_opening(args, accelerator, "mlm")
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
        model, report, teacher = _text_model(AutoModelForMaskedLM, args, config, tokenizer,
                                             pad_token_id=tokenizer.pad_token_id)
        train = MaskedTrainSet(_select(lm["train"], args.max_train_samples), args.seed, prob, mask_id, vocab)
        val.set_format("torch")
        return Setup(model, train, val, tokenizer, collate_fn=pad_collate(pad_id if pad_id is not None else 0),
                     teacher=teacher, info={"max_seq_length": seq, "eval_mask_seed": eval_seed, "line_by_line": args.line_by_line,
                           "text_column": column, "surgery": surgery_note(report)})

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
