"""The training loop shared by run_clm.py, run_mlm.py and run_image_classification.py.

One optimizer step = `gradient_accumulation_steps` micro-batches; the training loss is the task
loss plus `hf_gemact.auxiliary_loss(model)` (VeLU's Wasserstein terms, zero for other
activations); validation scores the task loss alone. Outputs in OUTPUT_DIR: log.jsonl (one line
per logged train/eval event), metrics.json (the run's summary), step_N/ checkpoints, and the final
model + tokenizer/processor (save_pretrained).
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .args import UsageError, build_parser, validate
from .tasks import TASKS, current_activation


class EpochSampler(torch.utils.data.Sampler):
    """A permutation that is a pure function of (seed, epoch): the same on every process, and the
    same after a resume (no generator state to carry). The epoch is set with `use_epoch`, not
    `set_epoch`: accelerate calls `set_epoch(number of times this loader was iterated)`, which is
    wrong for the loader that skip_first_batches builds on resume."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weights of linear/conv layers only: not on biases, norms, embeddings
    (nor an output layer tied to them) or activation parameters such as VeLU's `lam`."""
    from transformers.pytorch_utils import Conv1D

    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decayed = {id(m.weight) for m in model.modules()
               if isinstance(m, (nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d, nn.Conv3d))
               and isinstance(getattr(m, "weight", None), nn.Parameter) and id(m.weight) not in embeddings}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]


def _grouped(dataloader, size: int):
    group = []
    for batch in dataloader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def library_versions() -> dict:
    import accelerate
    import datasets
    import evaluate
    import tokenizers
    import transformers

    import hf_gemact

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "datasets": datasets.__version__, "evaluate": evaluate.__version__,
            "tokenizers": tokenizers.__version__, "hf_gemact": hf_gemact.__version__}


class _Log:
    """OUTPUT_DIR/log.jsonl (main process) and the trackers."""

    def __init__(self, accelerator, path: Path, tracking: bool):
        self.accelerator, self.path, self.tracking = accelerator, path, tracking

    def truncate_after(self, step: int) -> None:
        if self.accelerator.is_main_process and self.path.exists():
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tracking:
            split = record["split"]
            self.accelerator.log({f"{split}/{k}": v for k, v in record.items()
                                  if k not in ("step", "split") and isinstance(v, (int, float))},
                                 step=record["step"])


def _jsonable(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def _prepare_output_dir(args, accelerator) -> Path:
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if args.resume_path is None and args.overwrite_output_dir:
            for name in ("log.jsonl", "metrics.json"):
                (out / name).unlink(missing_ok=True)
            for old in list(out.glob("step_*")) + list(out.glob(".tmp-step_*")):
                if old.is_dir():
                    shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return out


def run(task: str, argv=None) -> dict:
    """Parse, check, train, evaluate, save. Returns the metrics.json content. Raises UsageError
    (before any training) on bad input."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from tqdm.auto import tqdm
    from transformers import default_data_collator, get_scheduler

    import hf_gemact
    from hf_gemact import metrics as metric_modules

    args = validate(build_parser(task).parse_args(argv), task)
    start_wall = time.time()
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.ddp_find_unused_parameters)],
    )
    from .lock import acquire_for_run

    # One writer per output dir: a second run into it stops here, before anything is read or
    # removed. Held until run() returns (the lock's file closes when this frame goes away).
    run_lock = acquire_for_run(accelerator, args.output_dir)  # noqa: F841
    resume_state = checkpoint.read_state(args.resume_path) if args.resume_path else None
    if args.resume_from_checkpoint == "latest" and resume_state is None:
        accelerator.print(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir} yet, starting fresh")
    set_seed(args.seed)
    spec = TASKS[task]()
    setup = spec.setup(args, accelerator)  # data, tokenizer, model: every remaining UsageError is raised here
    out = _prepare_output_dir(args, accelerator)
    model = setup.model
    blend = args.blend_steps > 0
    if blend and resume_state and resume_state["step"] >= args.blend_steps:
        hf_gemact.set_blend(model, 1.0)  # the checkpoint was saved after the blend was finalized
        hf_gemact.finalize_blend(model)

    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    sampler = EpochSampler(len(setup.train_dataset), args.seed)
    collate = setup.collate_fn or default_data_collator
    train_dl = torch.utils.data.DataLoader(setup.train_dataset, batch_size=args.per_device_train_batch_size,
                                           sampler=sampler, collate_fn=collate,
                                           generator=torch.Generator().manual_seed(args.seed))
    eval_dl = torch.utils.data.DataLoader(setup.eval_dataset, batch_size=args.per_device_eval_batch_size,
                                          shuffle=False, collate_fn=collate,
                                          generator=torch.Generator().manual_seed(args.seed))
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)
    accum = args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(train_dl) / accum)
    if steps_per_epoch == 0:
        raise UsageError("the training set gives no batch")
    max_steps = args.max_train_steps if args.max_train_steps is not None else args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    # Not passed to prepare(): stepped once per optimizer step on every process, saved with the state.
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer.optimizer,
                              num_warmup_steps=args.num_warmup_steps, num_training_steps=max(max_steps, 1))
    accelerator.register_for_checkpointing(scheduler)

    if args.with_tracking:
        accelerator.init_trackers(f"hf_gemact_{task}", {k: v for k, v in vars(args).items()
                                                         if isinstance(v, (int, float, str, bool))})
    log = _Log(accelerator, out / "log.jsonl", args.with_tracking)
    loss_metric = metric_modules.load("mean_loss")
    acc_metric = metric_modules.load("accuracy") if "accuracy" in spec.metric_keys else None
    unit = spec.unit

    st = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "units": 0, "train_time_s": 0.0,
          "best": None, "last_eval": None}
    if resume_state:
        accelerator.load_state(str(args.resume_path))
        st.update({k: resume_state[k] for k in st if k in resume_state})
        log.truncate_after(st["step"])
        accelerator.print(f"resumed from {args.resume_path} at step {st['step']}")
    elif accelerator.is_main_process:
        (out / "log.jsonl").write_text("")
    if st["batches_in_epoch"] >= len(train_dl):
        st["epoch"] += 1
        st["batches_in_epoch"] = 0

    def evaluate() -> dict:
        model.eval()
        with torch.no_grad():
            for batch in eval_dl:
                scored = accelerator.gather_for_metrics(spec.eval_batch(model, batch))
                loss_metric.add_batch(predictions=scored["loss_sum"].double().cpu(),
                                      references=scored["count"].cpu())
                if acc_metric is not None:
                    acc_metric.add_batch(predictions=scored["pred"].cpu(), references=scored["label"].cpu())
        res = loss_metric.compute()
        result = {"loss": res["loss"]}
        if "perplexity" in spec.metric_keys:
            result["perplexity"] = res["perplexity"]
        if acc_metric is not None:
            result["accuracy"] = acc_metric.compute()["accuracy"]
        result["eval_" + ("tokens" if unit == "tokens" else "samples")] = res["count"]
        model.train()
        return result

    def record_eval() -> None:
        result = evaluate()
        rec = {"step": st["step"], "split": "eval", "epoch": round(st["step"] / steps_per_epoch, 4), **result}
        log.write(rec)
        st["last_eval"] = rec
        best = st["best"]
        key = spec.best_key
        if best is None or (result[key] > best[key] if spec.greater_is_better else result[key] < best[key]):
            st["best"] = rec
        accelerator.print(f"step {st['step']}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))

    # Per-process sums since the last flush: task loss, aux loss, micro-batches, units (tokens or
    # samples); flush() adds them up over processes (every process calls it at the same points).
    local = torch.zeros(4, dtype=torch.float64, device=accelerator.device)

    def flush() -> tuple[float, float]:
        stats = accelerator.reduce(local.clone(), "sum").tolist()
        st["units"] += int(stats[3])
        local.zero_()
        n = max(stats[2], 1.0)
        return stats[0] / n, stats[1] / n

    def save_checkpoint() -> None:
        flush()
        checkpoint.save(accelerator, out, st["step"], {**st, "args": _jsonable(args), "task": task})

    stop_at = args.stop_after_steps
    progress = tqdm(total=max_steps, initial=st["step"], disable=not accelerator.is_local_main_process,
                    desc=f"{task} train")
    units_at_start, train_time, tick = st["units"], 0.0, time.perf_counter()
    interrupted = False
    model.train()
    for epoch in range(st["epoch"], num_epochs):
        if st["step"] >= max_steps or interrupted:
            break
        if epoch != st["epoch"]:
            st["epoch"], st["batches_in_epoch"] = epoch, 0
        sampler.use_epoch(epoch)
        if hasattr(setup.train_dataset, "use_epoch"):
            setup.train_dataset.use_epoch(epoch)
        skip = st["batches_in_epoch"]
        epoch_dl = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        for group in _grouped(epoch_dl, accum):
            if blend and st["step"] < args.blend_steps:
                hf_gemact.set_blend(accelerator.unwrap_model(model), (st["step"] + 1) / args.blend_steps)
            for i, batch in enumerate(group):
                sync = contextlib.nullcontext() if i == len(group) - 1 else accelerator.no_sync(model)
                with sync:
                    outputs = model(**batch)
                    aux = hf_gemact.auxiliary_loss(model)
                    accelerator.backward((outputs.loss + aux) / len(group))
                local += torch.stack([outputs.loss.detach().double(), aux.detach().double(),
                                      torch.ones((), dtype=torch.float64, device=local.device),
                                      torch.tensor(float(spec.units(batch)), dtype=torch.float64,
                                                   device=local.device)])
            if args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            st["step"] += 1
            st["batches_in_epoch"] += len(group)
            progress.update(1)
            if blend and st["step"] == args.blend_steps:
                hf_gemact.finalize_blend(accelerator.unwrap_model(model))
            step = st["step"]
            now = time.perf_counter()
            train_time += now - tick
            if step % args.logging_steps == 0 or step == max_steps:
                task_loss, aux_loss = flush()
                rec = {"step": step, "split": "train", "loss": task_loss + aux_loss, "task_loss": task_loss,
                       "aux_loss": aux_loss, "lr": scheduler.get_last_lr()[0],
                       "epoch": round(step / steps_per_epoch, 4), unit: st["units"],
                       f"{unit}_per_s": (st["units"] - units_at_start) / max(train_time, 1e-9)}
                log.write(rec)
                progress.set_postfix(loss=f"{rec['loss']:.4f}")
            if args.eval_steps and step % args.eval_steps == 0:
                record_eval()
            if args.checkpointing_steps not in (None, "epoch") and step % int(args.checkpointing_steps) == 0:
                save_checkpoint()
            tick = time.perf_counter()
            if step >= max_steps:
                break
            if stop_at is not None and step >= stop_at:
                interrupted = True
                break
        else:  # the epoch ran to its end
            if not args.eval_steps:
                record_eval()
            if args.checkpointing_steps == "epoch":
                save_checkpoint()
            tick = time.perf_counter()
    progress.close()
    flush()
    st["train_time_s"] += train_time

    if interrupted:
        accelerator.print(f"stopped after step {st['step']} (--stop_after_steps); resume with "
                          "--resume_from_checkpoint latest")
        accelerator.end_training()
        return {"stopped_at": st["step"]}

    if st["last_eval"] is None or st["last_eval"]["step"] != st["step"]:
        record_eval()
    if not args.no_save_model:
        accelerator.wait_for_everyone()
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(out, is_main_process=accelerator.is_main_process,
                                  save_function=accelerator.save, state_dict=accelerator.get_state_dict(model))
        if accelerator.is_main_process:
            setup.processor.save_pretrained(out)
    metric_names = [k for k in spec.metric_keys]
    summary = {
        "task": task,
        "activation": current_activation(accelerator.unwrap_model(model), args),
        "model_type": accelerator.unwrap_model(model).config.model_type,
        "num_parameters": sum(p.numel() for p in accelerator.unwrap_model(model).parameters()),
        "final": {k: st["last_eval"][k] for k in ["step"] + metric_names},
        "best": {k: st["best"][k] for k in ["step"] + metric_names},
        "steps": st["step"],
        "epochs": round(st["step"] / steps_per_epoch, 4),
        f"{unit}_seen": st["units"],
        f"{unit}_per_s": (st["units"] - units_at_start) / max(train_time, 1e-9),
        "train_time_s": st["train_time_s"],
        "wall_time_s": time.time() - start_wall,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "resumed_from": str(args.resume_path) if args.resume_path else None,
        "validation_loss_note": "task loss only (no auxiliary loss)",
        **{k: v for k, v in setup.info.items() if v is not None},
        "args": _jsonable(args),
        "versions": library_versions(),
        "command": " ".join(sys.argv),
    }
    if accelerator.is_main_process:
        (out / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    accelerator.end_training()
    return summary


def main(task: str, argv=None) -> int:
    try:
        run(task, argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
