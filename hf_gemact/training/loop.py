"""The training loop shared by run_clm.py, run_mlm.py and run_image_classification.py.

One optimizer step = `gradient_accumulation_steps` micro-batches; the training loss is the model's
own loss, which in training mode holds VeLU's Wasserstein terms (zero for other activations; logged
apart as aux_loss), plus, with --distill_weight W, W x the distillation term (T^2 x KL from the
unpatched checkpoint's outputs, logged apart as distill_loss); validation scores the task loss alone.
Outputs in OUTPUT_DIR: log.jsonl (one line per logged train/eval event), metrics.json (the run's
summary), step_N/ and epoch_N/ checkpoints, the final model + tokenizer/processor (save_pretrained)
and hf_gemact_outputs.json (what the run wrote there, for --overwrite_output_dir).

`_run` reads top to bottom: parse and check, then a `Training` object goes through its phases in
order: `setup` (task, model, data, optimizer, output folder), `resume`, `train` (epochs of `step`s,
with `evaluate` and `save_checkpoint` where the flags say), `finish` (final eval, model, metrics.json).
Its `progress` (a `Progress`) is what a checkpoint saves and a resume restores.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict

import torch

from .. import hub
from . import checkpoint
from .checkpoint import Progress
from .args import build_parser, validate
from .batching import EpochSampler, grouped, param_groups
from .errors import TrainingDiverged, UsageError
from .preflight import announce, check_precision
from .preflight import resume_state as read_resume_state
from .run_files import (RunLog, command_line, jsonable, library_versions, prepare_output_dir, run_summary,
                        top_level_files, write_json, written_since)
from .common import calibrate_surgery
from .tasks import TASKS, current_activation, distillation_kl


class Training:
    """One invocation of a training script: what every phase uses, and the phases as methods."""

    def __init__(self, task: str, args, flags: dict, accelerator, start_wall: float):
        from tqdm.auto import tqdm

        self.task, self.args, self.flags, self.accelerator = task, args, flags, accelerator
        self._tqdm = tqdm
        self.start_wall = start_wall
        self.progress = Progress()
        self.train_time = 0.0
        # Per-process sums since the last flush: task loss, aux loss, distillation loss, micro-batches,
        # units (tokens or samples); flush() adds them up over processes (every process calls it at
        # the same points) and returns the means of the first three.
        self.local = torch.zeros(5, dtype=torch.float64, device=accelerator.device)

    def say(self, message: str) -> None:  # above the progress bar, not through it
        if self.accelerator.is_main_process:
            self._tqdm.write(message)

    def on_any_process(self, flag: bool) -> bool:
        """One decision for all processes (a process stopping alone would hang the others)."""
        accelerator = self.accelerator
        t = torch.tensor(float(flag), dtype=torch.float64, device=accelerator.device)
        return bool(accelerator.reduce(t, "sum").item() > 0) if accelerator.num_processes > 1 else flag

    # ------------------------------------------------------------------------------------ setup

    def setup(self, resume_state: dict | None) -> None:
        from transformers import default_data_collator, get_scheduler

        from .. import metrics as metric_modules
        from ..surgery import finalize_blend, set_blend
        from .args import check_blend

        args, accelerator = self.args, self.accelerator
        self.spec = spec = TASKS[self.task]()
        self.data = setup = spec.setup(args, accelerator)  # every remaining UsageError is raised here
        model = setup.model
        if args.calibration_samples:
            setup.info["surgery"] = calibrate_surgery(model, setup, args, spec.inputs)
        # The teacher is not passed to prepare(): it has nothing to train, so no DDP/FSDP wrapper (DDP
        # refuses a model without trainable parameters) and no optimizer; it runs on this process's
        # device under the run's autocast (see distillation_loss).
        self.teacher = setup.teacher.to(accelerator.device) if setup.teacher is not None else None
        self.blend = args.blend_steps > 0
        if self.blend and resume_state and resume_state["step"] >= args.blend_steps:
            set_blend(model, 1.0)  # the checkpoint was saved after the blend was finalized
            finalize_blend(model)

        optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.learning_rate,
                                      betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        self.sampler = EpochSampler(len(setup.train_dataset), args.seed)
        collate = setup.collate_fn or default_data_collator
        train_dl = torch.utils.data.DataLoader(setup.train_dataset, batch_size=args.per_device_train_batch_size,
                                               sampler=self.sampler, collate_fn=collate,
                                               generator=torch.Generator().manual_seed(args.seed))
        eval_dl = torch.utils.data.DataLoader(setup.eval_dataset, batch_size=args.per_device_eval_batch_size,
                                              shuffle=False, collate_fn=collate,
                                              generator=torch.Generator().manual_seed(args.seed))
        self.model, self.optimizer, self.train_dl, self.eval_dl = accelerator.prepare(
            model, optimizer, train_dl, eval_dl)
        self.steps_per_epoch = math.ceil(len(self.train_dl) / args.gradient_accumulation_steps)
        if self.steps_per_epoch == 0:
            raise UsageError("the training set gives no batch")
        self.max_steps = (args.max_train_steps if args.max_train_steps is not None
                          else args.num_train_epochs * self.steps_per_epoch)
        self.num_epochs = math.ceil(self.max_steps / self.steps_per_epoch)
        check_blend(args, self.max_steps)
        # after the last refusal: nothing is removed for a run that cannot start
        self.out = out = prepare_output_dir(args, accelerator)
        # Not passed to prepare(): stepped once per optimizer step on every process, saved with the state.
        self.scheduler = get_scheduler(args.lr_scheduler_type, optimizer=self.optimizer.optimizer,
                                       num_warmup_steps=args.num_warmup_steps,
                                       num_training_steps=max(self.max_steps, 1))
        accelerator.register_for_checkpointing(self.scheduler)
        if args.with_tracking:
            before = top_level_files(out) if accelerator.is_main_process else {}
            accelerator.init_trackers(f"hf_gemact_{self.task}", {k: v for k, v in vars(args).items()
                                                                  if isinstance(v, (int, float, str, bool))})
            if accelerator.is_main_process:
                checkpoint.record_outputs(out, written_since(out, before))
        self.log = RunLog(accelerator, out / "log.jsonl", args.with_tracking)
        self.loss_metric = metric_modules.load("mean_loss")
        self.acc_metric = metric_modules.load("accuracy") if "accuracy" in spec.metric_keys else None
        self.unit = spec.unit

    # ----------------------------------------------------------------------------------- resume

    def resume(self, resume_state: dict | None) -> None:
        args, accelerator, progress = self.args, self.accelerator, self.progress
        if resume_state:
            problem = None
            try:
                accelerator.load_state(str(args.resume_path))
            except Exception as err:  # noqa: BLE001  (whatever torch/safetensors raise: one line, exit 2)
                detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
                problem = f"{args.resume_path}: accelerate could not load it ({type(err).__name__}: {detail})"
            problem = problem or checkpoint.optimizer_state_problem(self.optimizer.optimizer, resume_state,
                                                                    args.resume_path)
            if self.on_any_process(problem is not None):
                raise checkpoint.CheckpointError(problem or f"{args.resume_path}: another process could not resume "
                                                 "from it (its message is in that process's output)")
            progress.restore(resume_state)
            self.log.truncate_after(progress.step)
        elif accelerator.is_main_process:
            (self.out / "log.jsonl").write_text("")
        if progress.batches_in_epoch >= len(self.train_dl):
            progress.epoch += 1
            progress.batches_in_epoch = 0
        announce(self.say, examples=len(self.data.train_dataset), eval_examples=len(self.data.eval_dataset),
                  epochs=self.num_epochs, steps_per_epoch=self.steps_per_epoch, max_steps=self.max_steps,
                  per_device=args.per_device_train_batch_size, processes=accelerator.num_processes,
                  accum=args.gradient_accumulation_steps, resume_path=args.resume_path, start_step=progress.step,
                  args=args)

    # ------------------------------------------------------------------------------------ train

    def train(self) -> bool:
        """Epochs of optimizer steps until the last step or --stop_after_steps; True when stopped early."""
        args, accelerator, progress = self.args, self.accelerator, self.progress
        self.bar = self._tqdm(total=self.max_steps, initial=progress.step,
                              disable=not accelerator.is_local_main_process, desc=f"{self.task} train")
        self.tick = time.perf_counter()
        interrupted = False
        self.model.train()
        for epoch in range(progress.epoch, self.num_epochs):
            if progress.step >= self.max_steps or interrupted:
                break
            if epoch != progress.epoch:
                progress.epoch, progress.batches_in_epoch = epoch, 0
            self.sampler.use_epoch(epoch)
            if hasattr(self.data.train_dataset, "use_epoch"):
                self.data.train_dataset.use_epoch(epoch)
            skip = progress.batches_in_epoch
            epoch_dl = accelerator.skip_first_batches(self.train_dl, skip) if skip else self.train_dl
            for group in grouped(epoch_dl, args.gradient_accumulation_steps):
                self.step(group)
                self.after_step(epoch)
                self.tick = time.perf_counter()
                if progress.step >= self.max_steps:
                    break
                if args.stop_after_steps is not None and progress.step >= args.stop_after_steps:
                    interrupted = True
                    break
        self.bar.close()
        self.flush()
        progress.train_time_s += self.train_time
        self.train_time = 0.0
        return interrupted

    def step(self, group: list) -> None:
        """One optimizer step over the micro-batches of `group`."""
        from ..modules import auxiliary_loss, recorded_aux_loss
        from ..surgery import finalize_blend, set_blend

        args, accelerator, progress, model = self.args, self.accelerator, self.progress, self.model
        if self.blend and progress.step < args.blend_steps:
            set_blend(accelerator.unwrap_model(model), (progress.step + 1) / args.blend_steps)
        for i, batch in enumerate(group):
            sync = contextlib.nullcontext() if i == len(group) - 1 else accelerator.no_sync(model)
            with sync:
                outputs = model(**batch)
                # In training mode outputs.loss already holds VeLU's W2 terms (aux_loss.py);
                # auxiliary_loss adds only terms no returned loss took (0 here), never one twice.
                loss = outputs.loss + auxiliary_loss(model)
                distill = torch.zeros((), device=loss.device)
                if self.teacher is not None:  # a mean per micro-batch, as the task loss: the same weight per step
                    distill = self.distillation_loss(outputs, batch)
                    loss = loss + args.distill_weight * distill
                accelerator.backward(loss / len(group))
            aux = recorded_aux_loss(model).detach().double()
            local = self.local
            local += torch.stack([outputs.loss.detach().double() - aux, aux, distill.detach().double(),
                                  torch.ones((), dtype=torch.float64, device=local.device),
                                  torch.tensor(float(self.spec.units(batch)), dtype=torch.float64,
                                               device=local.device)])
        self.stop_if_loss_diverged(progress.step + 1)
        if args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        progress.batches_in_epoch += len(group)
        self.bar.update(1)
        if self.blend and progress.step == args.blend_steps:
            finalize_blend(accelerator.unwrap_model(model))
        self.train_time += time.perf_counter() - self.tick

    def after_step(self, epoch: int) -> None:
        """The log line, evaluation and checkpoint that the flags ask for after this step."""
        args, progress = self.args, self.progress
        step = progress.step
        if step % args.logging_steps == 0 or step == self.max_steps:
            self.log_train(step)
        if args.eval_steps and step % args.eval_steps == 0:
            self.evaluate()
        if args.checkpointing_steps not in (None, "epoch") and step % int(args.checkpointing_steps) == 0:
            self.save_checkpoint(f"step_{step}")
        if progress.batches_in_epoch >= len(self.train_dl):  # the epoch ran to its end
            if not args.eval_steps:
                self.evaluate()
            if args.checkpointing_steps == "epoch":
                self.save_checkpoint(f"epoch_{epoch}")

    def log_train(self, step: int) -> None:
        task_loss, aux_loss, distill_loss = self.flush()
        unit = self.unit
        rec = {"step": step, "split": "train", "loss": task_loss + aux_loss + self.args.distill_weight * distill_loss,
               "task_loss": task_loss, "aux_loss": aux_loss,
               **({"distill_loss": distill_loss} if self.teacher is not None else {}),
               "lr": self.scheduler.get_last_lr()[0], "epoch": round(step / self.steps_per_epoch, 4),
               unit: self.progress.units, f"{unit}_per_s": self.throughput()}
        self.log.write(rec)
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}")

    def flush(self) -> tuple[float, float, float]:
        stats = self.accelerator.reduce(self.local.clone(), "sum").tolist()
        progress = self.progress
        progress.units += int(stats[4])
        progress.micro_batches += int(stats[3])
        progress.distill_loss_sum += stats[2]
        self.local.zero_()
        n = max(stats[3], 1.0)
        return stats[0] / n, stats[1] / n, stats[2] / n

    def throughput(self) -> float:  # over the whole run, resumes included
        return self.progress.units / max(self.progress.train_time_s + self.train_time, 1e-9)

    def distillation_loss(self, outputs, batch) -> torch.Tensor:
        """T^2 x KL(teacher || student), averaged over the positions the task loss scores. The
        teacher runs without a graph; it holds the weights it was loaded with for the whole run."""
        with torch.no_grad(), self.accelerator.autocast():
            teacher_logits = self.teacher(**self.spec.inputs(batch)).logits
        return distillation_kl(self.spec.scored(outputs.logits, batch), self.spec.scored(teacher_logits, batch),
                               self.args.distill_temperature)

    # --------------------------------------------------------------------------------- evaluate

    def scores(self) -> dict:
        model, spec, loss_metric, acc_metric = self.model, self.spec, self.loss_metric, self.acc_metric
        model.eval()
        with torch.no_grad():
            for batch in self.eval_dl:
                scored = self.accelerator.gather_for_metrics(spec.eval_batch(model, batch))
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
        result["eval_" + ("tokens" if self.unit == "tokens" else "samples")] = res["count"]
        model.train()
        return result

    def evaluate(self) -> None:
        progress, spec = self.progress, self.spec
        result = self.scores()
        rec = {"step": progress.step, "split": "eval", "epoch": round(progress.step / self.steps_per_epoch, 4),
               **result}
        self.log.write(rec)
        progress.last_eval = rec
        best, key = progress.best, spec.best_key
        if best is None or (result[key] > best[key] if spec.greater_is_better else result[key] < best[key]):
            progress.best = rec
        self.say(f"step {progress.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))

    # ------------------------------------------------------------------------------- checkpoint

    def save_checkpoint(self, name: str) -> None:
        args, accelerator = self.args, self.accelerator
        self.flush()
        self.stop_if_weights_diverged(f"checkpoint {name}")
        state = {**asdict(self.progress), "train_time_s": self.progress.train_time_s + self.train_time,
                 "args": jsonable(args), "flags": self.flags, "task": self.task,
                 "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
                 "optimizer_state_params": checkpoint.optimizer_state_holders(self.optimizer.optimizer)}
        path = checkpoint.save(accelerator, self.out, name, state)
        if args.save_total_limit and accelerator.is_main_process:
            checkpoint.prune(self.out, args.save_total_limit, keep=path)
        accelerator.wait_for_everyone()

    # ------------------------------------------------------------------------------- divergence

    def last_good_checkpoint(self) -> str:
        found = checkpoint.list_checkpoints(self.out)
        return f"the last checkpoint, {found[-1]}, is intact" if found else "no checkpoint was written"

    def diverged(self, message: str) -> TrainingDiverged:
        self.bar.close()
        accelerator, progress = self.accelerator, self.progress
        if accelerator.is_main_process:  # a result, not a crash: sweeps show it as diverged
            nan = {k: float("nan") for k in self.spec.metric_keys}
            write_json(self.out / "metrics.json", {
                "task": self.task, "activation": current_activation(accelerator.unwrap_model(self.model), self.args),
                "status": "diverged", "diverged": message, "steps": progress.step,
                "final": {"step": progress.step, **nan}, "best": progress.best or {"step": progress.step, **nan},
                "args": jsonable(self.args), "versions": library_versions(), "command": command_line()})
            checkpoint.record_outputs(self.out, ["metrics.json"])
        accelerator.end_training()
        return TrainingDiverged(message)

    def stop_if_loss_diverged(self, step: int) -> None:
        """Before the optimizer step: a non-finite loss stops the run with that step unapplied."""
        local = self.local
        if self.on_any_process(not bool(torch.isfinite(local[:3]).all())):
            raise self.diverged(
                f"step {step}: the training loss became non-finite (task loss {local[0].item():.4g}, auxiliary "
                f"{local[1].item():.4g}, distillation {local[2].item():.4g} summed since the last log line); "
                "stopped before applying the step, "
                f"nothing of it was saved; {self.last_good_checkpoint()}. Lower --learning_rate or check the data")

    def stop_if_weights_diverged(self, what: str) -> None:
        bad = any(not bool(torch.isfinite(p.detach()).all()) for p in self.model.parameters())
        if self.on_any_process(bad):
            raise self.diverged(f"after step {self.progress.step} the weights hold non-finite values, so {what} "
                                f"was not written; {self.last_good_checkpoint()}. Lower --learning_rate")

    # ----------------------------------------------------------------------------------- finish

    def finish(self) -> dict:
        """Final evaluation, sparsity, the saved model, metrics.json and the model card."""
        from ..stats import sparsity_summary

        args, accelerator, progress, out = self.args, self.accelerator, self.progress, self.out
        if progress.last_eval is None or progress.last_eval["step"] != progress.step:
            self.evaluate()
        model = accelerator.unwrap_model(self.model)
        # MLP activation sparsity on the first validation batches of every process (hf-gemact sweep's column)
        sparsity = sparsity_summary(model, self.eval_dl, forward=self.model,
                                    reduce=lambda t: accelerator.reduce(t, "sum"))
        if not args.no_save_model:
            self.stop_if_weights_diverged("the model")
            accelerator.wait_for_everyone()
            before = top_level_files(out) if accelerator.is_main_process else {}
            model.save_pretrained(out, is_main_process=accelerator.is_main_process,
                                  save_function=accelerator.save, state_dict=accelerator.get_state_dict(self.model))
            if accelerator.is_main_process:
                self.data.processor.save_pretrained(out)
                checkpoint.record_outputs(out, written_since(out, before))
        summary = run_summary(self, model, sparsity)
        if accelerator.is_main_process:
            write_json(out / "metrics.json", summary)
            card = hub.write_model_card(out, model, base_model=args.model_name_or_path, metrics=summary,
                                        task=self.task)
            checkpoint.record_outputs(out, ["metrics.json", card.name])
        accelerator.end_training()
        if args.hub_repo and accelerator.is_main_process:
            self.say(f"pushed {out} to "
                     f"{hub.push_folder(out, args.hub_repo, token=args.hub_token, commit_message='End of training')}")
        return summary


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

    from .args import run_flags, trackers
    from .lock import acquire_for_run

    args = validate(build_parser(task).parse_args(argv), task)
    flags = run_flags(args)  # as given, before the model and data fill in defaults
    start_wall = time.time()
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=trackers(args),
        project_dir=args.output_dir,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.ddp_find_unused_parameters)],
    )
    training = Training(task, args, flags, accelerator, start_wall)
    # One writer per output dir: a second run into it stops here, before anything is read or
    # removed. Held until run() returns.
    locks.append(acquire_for_run(accelerator, args.output_dir, command_line()))
    check_precision(args, accelerator)
    resume_state = read_resume_state(args, flags, accelerator, task)
    if args.resume_from_checkpoint == "latest" and resume_state is None:
        training.say(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir} yet, starting fresh")
    set_seed(args.seed)
    training.setup(resume_state)
    training.resume(resume_state)
    if training.train():
        training.say(f"stopped after step {training.progress.step} (--stop_after_steps); resume with "
                     "--resume_from_checkpoint latest")
        accelerator.end_training()
        return {"stopped_at": training.progress.step}
    return training.finish()


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
