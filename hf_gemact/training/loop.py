"""The training loop shared by run_clm.py, run_mlm.py and run_image_classification.py.

One optimizer step = `gradient_accumulation_steps` micro-batches; the training loss is the model's
own loss, which in training mode holds VeLU's Wasserstein terms (zero for other activations; logged
apart as aux_loss), plus, with --distill_weight W, W x the distillation term (T^2 x KL from the
unpatched checkpoint's outputs, logged apart as distill_loss); validation scores the task loss alone.
Outputs in OUTPUT_DIR: log.jsonl (one line per logged train/eval event), metrics.json (the run's
summary), step_N/ and epoch_N/ checkpoints, the final model + tokenizer/processor (save_pretrained)
and hf_gemact_outputs.json (what the run wrote there, for --overwrite_output_dir).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .. import hub
from . import checkpoint
from .args import UsageError, build_parser, validate
from .tasks import TASKS, current_activation, distillation_kl


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


_SECRET_FLAGS = ("hub_token", "hub_repo")


def _command_line() -> str:
    """sys.argv as run, with the values of secret flags replaced."""
    words, hide = [], False
    for word in sys.argv:
        flag, eq, _ = word.partition("=")
        if hide:
            word, hide = "***", False
        elif flag.lstrip("-") in _SECRET_FLAGS:
            word, hide = (f"{flag}=***", False) if eq else (word, True)
        words.append(word)
    return " ".join(words)


def _jsonable(args) -> dict:
    """The flags as written into metrics.json and checkpoints (secrets left out)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in _SECRET_FLAGS}


def _write_json(path: Path, obj) -> None:
    """Written beside and renamed into place: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


class TrainingDiverged(RuntimeError):
    """The training loss or the weights became non-finite; the message names the step."""


def _check_precision(args, accelerator) -> None:
    """accelerate runs fp16 on CPU as plain fp32 while still calling it fp16: refuse rather than
    train in another precision than the one metrics.json would report."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        source = ("--mixed_precision fp16" if args.mixed_precision == "fp16"
                  else "mixed precision fp16 (from accelerate's config or ACCELERATE_MIXED_PRECISION)")
        raise UsageError(f"{source} needs a GPU: on CPU accelerate would train in fp32; pass "
                         "--mixed_precision no (or bf16, which runs on CPU)")


def _resume_state(args, flags: dict, accelerator, task: str) -> dict | None:
    """The checkpoint's state, after checking that this invocation continues the same run."""
    from .args import MAY_CHANGE_ON_RESUME, resume_conflicts

    if args.resume_path is None:
        return None
    path = args.resume_path
    state = checkpoint.read_state(path)
    if state.get("task", task) != task:
        raise UsageError(f"--resume_from_checkpoint {path} is a {state['task']} checkpoint, not {task}")
    recorded = state.get("flags")
    legacy = recorded is None
    diffs = resume_conflicts(task, state.get("args", {}) if legacy else recorded, flags, legacy)
    processes = state.get("num_processes") or checkpoint.saved_processes(path)
    if processes != accelerator.num_processes:
        diffs.append(f"number of processes {processes} -> {accelerator.num_processes}")
    precision = state.get("mixed_precision")
    if precision is not None and precision != accelerator.mixed_precision:
        diffs.append(f"mixed precision {precision} -> {accelerator.mixed_precision}")
    if diffs:
        may_change = sorted(f for f in MAY_CHANGE_ON_RESUME if f in flags)
        raise UsageError(f"cannot resume from {path}: it was written by a run with other settings: "
                         + "; ".join(diffs) + ". Resume with the run's own settings, or start a new run "
                         "(another --output_dir). Only these may change on resume: --" + ", --".join(may_change))
    return state


def _top_level_files(out: Path) -> dict:
    """name -> identity of each entry at the top of OUTPUT_DIR, to see what a save rewrote."""
    found = {}
    for entry in out.iterdir():
        info = entry.lstat()
        found[entry.name] = (info.st_mtime_ns, info.st_size, info.st_ino)
    return found


def _written_since(out: Path, before: dict) -> list[str]:
    return [name for name, ident in _top_level_files(out).items() if before.get(name) != ident]


def _prepare_output_dir(args, accelerator) -> Path:
    """Create OUTPUT_DIR; for a new run over an earlier one (--overwrite_output_dir), remove what
    earlier runs of these scripts wrote there, so that no old model, log or checkpoint sits beside
    the new run's (files they did not write stay)."""
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        continuing = args.resume_path is not None and checkpoint.inside(args.resume_path, out)
        if not continuing and args.overwrite_output_dir:
            removed = checkpoint.remove_previous_outputs(out)
            if removed:
                accelerator.print(f"--overwrite_output_dir: removed an earlier run's {', '.join(p.name for p in removed)}")
        checkpoint.record_outputs(out, ["log.jsonl"])
    accelerator.wait_for_everyone()
    return out


def _announce(say, *, examples, eval_examples, epochs, steps_per_epoch, max_steps, per_device, processes, accum,
              resume_path, start_step, args) -> None:
    say("***** Running training *****")
    say(f"  examples: {examples} train, {eval_examples} validation")
    say(f"  epochs: {epochs} ({steps_per_epoch} optimizer steps each)")
    say(f"  batch size per device: {per_device}")
    say(f"  total batch size: {per_device * processes * accum} ({per_device} per device x {processes} "
        f"processes x {accum} accumulation steps)")
    say(f"  gradient accumulation steps: {accum}")
    say(f"  optimizer steps: {max_steps}")
    say(f"  processes: {processes}")
    if args.distill_weight > 0:
        say(f"  distillation: weight {args.distill_weight:g}, temperature {args.distill_temperature:g}, teacher: "
            f"{args.model_name_or_path} before surgery")
    if resume_path is not None:
        say(f"  resuming at step {start_step} from {resume_path}")


def run(task: str, argv=None) -> dict:
    """Parse, check, train, evaluate, save. Returns the metrics.json content. Raises UsageError
    (before any training) on bad input, TrainingDiverged when the loss or weights turn non-finite."""
    locks = []
    try:
        return _run(task, argv, locks)
    finally:  # now, not when the frame goes (a kept traceback would hold the lock file)
        for lock in locks:
            if lock is not None:  # other processes of a multi-process run hold none
                lock.release()


def _run(task: str, argv, locks: list) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from tqdm.auto import tqdm
    from transformers import default_data_collator, get_scheduler

    import hf_gemact
    from hf_gemact import metrics as metric_modules
    from hf_gemact.stats import sparsity_summary

    from .args import check_blend, run_flags, trackers

    args = validate(build_parser(task).parse_args(argv), task)
    flags = run_flags(args)  # as given, before the model and data fill in defaults
    start_wall = time.time()
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=trackers(args),
        project_dir=args.output_dir,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.ddp_find_unused_parameters)],
    )

    def say(message: str) -> None:  # above the progress bar, not through it
        if accelerator.is_main_process:
            tqdm.write(message)

    def on_any_process(flag: bool) -> bool:
        """One decision for all processes (a process stopping alone would hang the others)."""
        t = torch.tensor(float(flag), dtype=torch.float64, device=accelerator.device)
        return bool(accelerator.reduce(t, "sum").item() > 0) if accelerator.num_processes > 1 else flag

    from .lock import acquire_for_run

    # One writer per output dir: a second run into it stops here, before anything is read or
    # removed. Held until run() returns.
    locks.append(acquire_for_run(accelerator, args.output_dir, _command_line()))
    _check_precision(args, accelerator)
    resume_state = _resume_state(args, flags, accelerator, task)
    if args.resume_from_checkpoint == "latest" and resume_state is None:
        say(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir} yet, starting fresh")
    set_seed(args.seed)
    spec = TASKS[task]()
    setup = spec.setup(args, accelerator)  # data, tokenizer, model: every remaining UsageError is raised here
    model = setup.model
    # The teacher is not passed to prepare(): it has nothing to train, so no DDP/FSDP wrapper (DDP
    # refuses a model without trainable parameters) and no optimizer; it runs on this process's
    # device under the run's autocast (see distillation_loss).
    teacher = setup.teacher.to(accelerator.device) if setup.teacher is not None else None
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
    check_blend(args, max_steps)
    out = _prepare_output_dir(args, accelerator)  # after the last refusal: nothing is removed for a run that cannot start
    # Not passed to prepare(): stepped once per optimizer step on every process, saved with the state.
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer.optimizer,
                              num_warmup_steps=args.num_warmup_steps, num_training_steps=max(max_steps, 1))
    accelerator.register_for_checkpointing(scheduler)

    if args.with_tracking:
        before = _top_level_files(out) if accelerator.is_main_process else {}
        accelerator.init_trackers(f"hf_gemact_{task}", {k: v for k, v in vars(args).items()
                                                         if isinstance(v, (int, float, str, bool))})
        if accelerator.is_main_process:
            checkpoint.record_outputs(out, _written_since(out, before))
    log = _Log(accelerator, out / "log.jsonl", args.with_tracking)
    loss_metric = metric_modules.load("mean_loss")
    acc_metric = metric_modules.load("accuracy") if "accuracy" in spec.metric_keys else None
    unit = spec.unit

    st = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "units": 0, "train_time_s": 0.0,
          "best": None, "last_eval": None, "micro_batches": 0, "distill_loss_sum": 0.0}
    if resume_state:
        problem = None
        try:
            accelerator.load_state(str(args.resume_path))
        except Exception as err:  # noqa: BLE001  (whatever torch/safetensors raise: one line, exit 2)
            detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
            problem = f"{args.resume_path}: accelerate could not load it ({type(err).__name__}: {detail})"
        problem = problem or checkpoint.optimizer_state_problem(optimizer.optimizer, resume_state, args.resume_path)
        if on_any_process(problem is not None):
            raise checkpoint.CheckpointError(problem or f"{args.resume_path}: another process could not resume "
                                             "from it (its message is in that process's output)")
        st.update({k: resume_state[k] for k in st if k in resume_state})
        log.truncate_after(st["step"])
    elif accelerator.is_main_process:
        (out / "log.jsonl").write_text("")
    if st["batches_in_epoch"] >= len(train_dl):
        st["epoch"] += 1
        st["batches_in_epoch"] = 0
    _announce(say, examples=len(setup.train_dataset), eval_examples=len(setup.eval_dataset), epochs=num_epochs,
              steps_per_epoch=steps_per_epoch, max_steps=max_steps, per_device=args.per_device_train_batch_size,
              processes=accelerator.num_processes, accum=accum, resume_path=args.resume_path, start_step=st["step"],
              args=args)

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
        say(f"step {st['step']}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))

    # Per-process sums since the last flush: task loss, aux loss, distillation loss, micro-batches,
    # units (tokens or samples); flush() adds them up over processes (every process calls it at the
    # same points) and returns the means of the first three.
    local = torch.zeros(5, dtype=torch.float64, device=accelerator.device)

    def flush() -> tuple[float, float, float]:
        stats = accelerator.reduce(local.clone(), "sum").tolist()
        st["units"] += int(stats[4])
        st["micro_batches"] += int(stats[3])
        st["distill_loss_sum"] += stats[2]
        local.zero_()
        n = max(stats[3], 1.0)
        return stats[0] / n, stats[1] / n, stats[2] / n

    def distillation_loss(outputs, batch) -> torch.Tensor:
        """T^2 x KL(teacher || student), averaged over the positions the task loss scores. The
        teacher runs without a graph; it holds the weights it was loaded with for the whole run."""
        with torch.no_grad(), accelerator.autocast():
            teacher_logits = teacher(**spec.inputs(batch)).logits
        return distillation_kl(spec.scored(outputs.logits, batch), spec.scored(teacher_logits, batch),
                               args.distill_temperature)

    def last_good_checkpoint() -> str:
        found = checkpoint.list_checkpoints(out)
        return f"the last checkpoint, {found[-1]}, is intact" if found else "no checkpoint was written"

    def diverged(message: str):
        progress.close()
        if accelerator.is_main_process:  # a result, not a crash: sweeps show it as diverged
            nan = {k: float("nan") for k in spec.metric_keys}
            _write_json(out / "metrics.json", {
                "task": task, "activation": current_activation(accelerator.unwrap_model(model), args),
                "status": "diverged", "diverged": message, "steps": st["step"],
                "final": {"step": st["step"], **nan}, "best": st["best"] or {"step": st["step"], **nan},
                "args": _jsonable(args), "versions": library_versions(), "command": _command_line()})
            checkpoint.record_outputs(out, ["metrics.json"])
        accelerator.end_training()
        return TrainingDiverged(message)

    def stop_if_loss_diverged(step: int) -> None:
        """Before the optimizer step: a non-finite loss stops the run with that step unapplied."""
        if on_any_process(not bool(torch.isfinite(local[:3]).all())):
            raise diverged(
                f"step {step}: the training loss became non-finite (task loss {local[0].item():.4g}, auxiliary "
                f"{local[1].item():.4g}, distillation {local[2].item():.4g} summed since the last log line); "
                "stopped before applying the step, "
                f"nothing of it was saved; {last_good_checkpoint()}. Lower --learning_rate or check the data")

    def stop_if_weights_diverged(what: str) -> None:
        bad = any(not bool(torch.isfinite(p.detach()).all()) for p in model.parameters())
        if on_any_process(bad):
            raise diverged(f"after step {st['step']} the weights hold non-finite values, so {what} was "
                                   f"not written; {last_good_checkpoint()}. Lower --learning_rate")

    def save_checkpoint(name: str) -> None:
        flush()
        stop_if_weights_diverged(f"checkpoint {name}")
        state = {**st, "train_time_s": st["train_time_s"] + train_time, "args": _jsonable(args), "flags": flags,
                 "task": task, "num_processes": accelerator.num_processes,
                 "mixed_precision": accelerator.mixed_precision,
                 "optimizer_state_params": checkpoint.optimizer_state_holders(optimizer.optimizer)}
        path = checkpoint.save(accelerator, out, name, state)
        if args.save_total_limit and accelerator.is_main_process:
            checkpoint.prune(out, args.save_total_limit, keep=path)
        accelerator.wait_for_everyone()

    def throughput() -> float:  # over the whole run, resumes included
        return st["units"] / max(st["train_time_s"] + train_time, 1e-9)

    stop_at = args.stop_after_steps
    progress = tqdm(total=max_steps, initial=st["step"], disable=not accelerator.is_local_main_process,
                    desc=f"{task} train")
    train_time, tick = 0.0, time.perf_counter()
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
                    # In training mode outputs.loss already holds VeLU's W2 terms (integration.py);
                    # auxiliary_loss adds only terms no returned loss took (0 here), never one twice.
                    loss = outputs.loss + hf_gemact.auxiliary_loss(model)
                    distill = torch.zeros((), device=loss.device)
                    if teacher is not None:  # a mean per micro-batch, as the task loss: the same weight per step
                        distill = distillation_loss(outputs, batch)
                        loss = loss + args.distill_weight * distill
                    accelerator.backward(loss / len(group))
                aux = hf_gemact.recorded_aux_loss(model).detach().double()
                local += torch.stack([outputs.loss.detach().double() - aux, aux, distill.detach().double(),
                                      torch.ones((), dtype=torch.float64, device=local.device),
                                      torch.tensor(float(spec.units(batch)), dtype=torch.float64,
                                                   device=local.device)])
            stop_if_loss_diverged(st["step"] + 1)
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
                task_loss, aux_loss, distill_loss = flush()
                optimised = task_loss + aux_loss + args.distill_weight * distill_loss
                rec = {"step": step, "split": "train", "loss": optimised,
                       "task_loss": task_loss, "aux_loss": aux_loss,
                       **({"distill_loss": distill_loss} if teacher is not None else {}),
                       "lr": scheduler.get_last_lr()[0], "epoch": round(step / steps_per_epoch, 4), unit: st["units"],
                       f"{unit}_per_s": throughput()}
                log.write(rec)
                progress.set_postfix(loss=f"{rec['loss']:.4f}")
            if args.eval_steps and step % args.eval_steps == 0:
                record_eval()
            if args.checkpointing_steps not in (None, "epoch") and step % int(args.checkpointing_steps) == 0:
                save_checkpoint(f"step_{step}")
            if st["batches_in_epoch"] >= len(train_dl):  # the epoch ran to its end
                if not args.eval_steps:
                    record_eval()
                if args.checkpointing_steps == "epoch":
                    save_checkpoint(f"epoch_{epoch}")
            tick = time.perf_counter()
            if step >= max_steps:
                break
            if stop_at is not None and step >= stop_at:
                interrupted = True
                break
    progress.close()
    flush()
    st["train_time_s"] += train_time

    if interrupted:
        say(f"stopped after step {st['step']} (--stop_after_steps); resume with --resume_from_checkpoint latest")
        accelerator.end_training()
        return {"stopped_at": st["step"]}

    if st["last_eval"] is None or st["last_eval"]["step"] != st["step"]:
        record_eval()
    # MLP activation sparsity on the first validation batches of every process (hf-gemact sweep's column)
    sparsity = sparsity_summary(accelerator.unwrap_model(model), eval_dl, forward=model,
                                reduce=lambda t: accelerator.reduce(t, "sum"))
    if not args.no_save_model:
        stop_if_weights_diverged("the model")
        accelerator.wait_for_everyone()
        before = _top_level_files(out) if accelerator.is_main_process else {}
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(out, is_main_process=accelerator.is_main_process,
                                  save_function=accelerator.save, state_dict=accelerator.get_state_dict(model))
        if accelerator.is_main_process:
            setup.processor.save_pretrained(out)
            checkpoint.record_outputs(out, _written_since(out, before))
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
        f"{unit}_per_s": st["units"] / max(st["train_time_s"], 1e-9),
        "train_time_s": st["train_time_s"],
        "wall_time_s": time.time() - start_wall,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "resumed_from": str(args.resume_path) if args.resume_path else None,
        "validation_loss_note": "task loss only (no auxiliary or distillation loss)",
        "distillation": ({"weight": args.distill_weight, "temperature": args.distill_temperature,
                          "teacher": args.model_name_or_path,
                          "mean_loss": st["distill_loss_sum"] / max(st["micro_batches"], 1)}
                         if teacher is not None else None),
        "activation_sparsity": sparsity,
        **{k: v for k, v in setup.info.items() if v is not None},
        "args": _jsonable(args),
        "versions": library_versions(),
        "command": _command_line(),
    }
    if accelerator.is_main_process:
        _write_json(out / "metrics.json", summary)
        card = hub.write_model_card(out, accelerator.unwrap_model(model), base_model=args.model_name_or_path,
                                    metrics=summary, task=task)
        checkpoint.record_outputs(out, ["metrics.json", card.name])
    accelerator.end_training()
    if args.hub_repo and accelerator.is_main_process:
        say(f"pushed {out} to {hub.push_folder(out, args.hub_repo, token=args.hub_token, commit_message='End of training')}")
    return summary


def main(task: str, argv=None) -> int:
    try:
        run(task, argv)
    except (UsageError, TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except hub.HubError as err:  # the environment failed after the run was saved, not the input
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
