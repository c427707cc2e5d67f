"""`hf-gemact tables DIR`: a task folder's results.md (and curves.png), rebuilt from its raw data.

Three layouts (docs/results/ holds one per task of train_scripts/replicate_papers.sh):

- a sweep's --output_dir: results.csv lists the runs, each in ACTIVATION/seedK with metrics.json and
  log.jsonl; the table is the one the sweep writes (`sweep.tables`).
- a surgery folder: `base/` (the checkpoint before surgery) and other single runs (a folder with
  metrics.json), and groups of seeds (a folder of seedK runs) among which `control/` is the baseline.
  The tables list the single runs, compare the groups with the control as a sweep compares
  activations, and give each run's validation loss at every evaluation; results.csv (one row per run)
  is written from the runs' metrics.json; drift_*.json files there (calibration_drift.py) become
  tables of the damage right after surgery.
- a learning-rate study: lrVALUE/ sweep folders of one task; each one's table, then every
  activation at its best learning rate against the baseline at its best.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from . import sweep

SEED_DIR = re.compile(r"^seed(\d+)$")
SURGERY_BASELINE = "control"


def is_surgery_folder(folder: Path) -> bool:
    return (folder / "base").is_dir()


def _read_metrics(path: Path) -> dict:
    """A run's metrics.json with a number at final.loss and best.loss, or TablesError naming it."""
    if not path.is_file():
        raise sweep.TablesError(f"{path}: not found")
    try:
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise sweep.TablesError(f"{path}: unreadable ({err})") from None
    for part in ("final", "best"):
        value = metrics.get(part, {}).get("loss") if isinstance(metrics, dict) and isinstance(
            metrics.get(part), dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise sweep.TablesError(f"{path}: unreadable (no number at {part}.loss)")
    return metrics


def _loss_row(name: str, seed, run_dir: Path) -> dict:
    """A sweep row of one surgery run, scored by validation loss (not the clm default, perplexity)."""
    metrics = _read_metrics(run_dir / "metrics.json")
    row = sweep.run_row(sweep.Run(name, seed, run_dir), {**metrics, "task": None})
    row["perplexity"] = metrics["final"].get("perplexity")
    row["model_activation"] = metrics.get("activation", "")
    return row


def surgery_runs(folder: Path) -> tuple:
    """(single runs, grouped runs): rows of the folders with a metrics.json, and of every seedK run
    of the folders made of seeds; sorted by name and seed."""
    singles, grouped = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        seeds = sorted((int(m.group(1)), p) for p in sub.iterdir() if p.is_dir() and (m := SEED_DIR.match(p.name)))
        if (sub / "metrics.json").exists():
            singles.append(_loss_row(sub.name, None, sub))
        elif seeds:
            grouped += [_loss_row(sub.name, seed, run_dir) for seed, run_dir in seeds]
    if not any(row["activation"] == SURGERY_BASELINE for row in grouped):
        raise sweep.TablesError(f"{folder / SURGERY_BASELINE}: not found or without seedK runs (the unpatched "
                                "model fine-tuned like the patched ones; train_scripts/replicate_papers.sh makes it)")
    for row in grouped:
        sweep._check_log(Path(row["output_dir"]) / "log.jsonl", "loss")
    return singles, grouped


def _eval_losses(run_dir: Path) -> dict:
    from .plotting import read_eval_curve

    return dict(read_eval_curve(run_dir, "loss"))


def render_surgery(singles: list, grouped: list) -> str:
    lines = ["Single runs: validation loss and perplexity at the end of the run.", "",
             "| run | activation | steps | validation loss | perplexity |", "|---|---|---:|---:|---:|"]
    for row in singles:
        lines.append(f"| {row['activation']} | {row['model_activation']} | {row['steps']} | "
                     f"{row['final']:.4f} | {sweep._fmt(row['perplexity'], 2)} |")
    lines += ["", "Fine-tuned groups, compared with the unpatched control:", "",
              sweep.render_table(grouped, SURGERY_BASELINE, name="run").rstrip("\n"), "",
              "Validation loss at each evaluation of the fine-tuning (each run):", ""]
    curves = {f"{row['activation']}/seed{row['seed']}": _eval_losses(Path(row["output_dir"])) for row in grouped}
    steps = sorted({step for curve in curves.values() for step in curve})
    lines += ["| run | " + " | ".join(f"step {s}" for s in steps) + " |",
              "|---|" + "---:|" * len(steps)]
    for label, curve in curves.items():
        lines.append(f"| {label} | " + " | ".join(sweep._fmt(curve.get(s)) for s in steps) + " |")
    lines += ["", f"Steps each group needs to come within {CATCH_UP_NATS} nats of the control (first evaluation "
                  "where the group's mean validation loss over seeds is at most the control's mean + "
                  f"{CATCH_UP_NATS}):", "", "| run | steps |", "|---|---:|"]
    for name, steps_needed in catch_up_steps(grouped, curves, steps).items():
        lines.append(f"| {name} | {steps_needed if steps_needed is not None else f'not within {steps[-1]}'} |")
    return "\n".join(lines) + "\n"


CATCH_UP_NATS = 0.01


def catch_up_steps(grouped: list, curves: dict, steps: list) -> dict:
    """group -> the first evaluated step at which its mean loss is within CATCH_UP_NATS of the
    control's mean at that step (None if never); means over the seeds evaluated at that step."""
    def mean_curve(name):
        runs = [curves[f"{row['activation']}/seed{row['seed']}"] for row in grouped if row["activation"] == name]
        return {s: sum(c[s] for c in runs) / len(runs) for s in steps if all(s in c for c in runs)}

    control = mean_curve(SURGERY_BASELINE)
    found = {}
    for name in dict.fromkeys(row["activation"] for row in grouped):
        if name == SURGERY_BASELINE:
            continue
        curve = mean_curve(name)
        found[name] = next((s for s in steps if s in curve and s in control
                            and curve[s] <= control[s] + CATCH_UP_NATS), None)
    return found


def drift_table(record: dict) -> str:
    """The markdown table of a drift.json: per activation, plain and calibrated, and their ratio."""
    lm = record["results"][0]["kl"] is not None and record["results"][0]["loss_before"] is not None
    head = "| activation | patch | hidden-state rel. error |" + (" next-token KL | loss jump |" if lm else "")
    lines = [head, "|---|---|---:|" + ("---:|---:|" if lm else "")]
    by_act = {}
    for r in record["results"]:
        by_act.setdefault(r["activation"], {})[r["calibrated"]] = r
        row = f"| {r['activation']} | {'calibrated' if r['calibrated'] else 'plain'} | {r['rel_error']:.4f} |"
        if lm:
            row += f" {r['kl']:.4f} | {r['loss_after'] - r['loss_before']:+.4f} |"
        lines.append(row)
    lines += ["", "Calibrated damage as a fraction of the plain patch's (below 0.5: at most half):", "",
              "| activation | hidden-state rel. error |" + (" next-token KL | loss jump |" if lm else ""),
              "|---|---:|" + ("---:|---:|" if lm else "")]
    for act, pair in by_act.items():
        plain, cal = pair[False], pair[True]
        row = f"| {act} | {cal['rel_error'] / plain['rel_error']:.3f} |"
        if lm:
            jump = (cal["loss_after"] - cal["loss_before"]) / (plain["loss_after"] - plain["loss_before"])
            row += f" {cal['kl'] / plain['kl']:.3f} | {jump:.3f} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def drift_tables(folder: Path) -> str:
    """The tables of every drift_NAME.json in `folder` (train_scripts/calibration_drift.py), by name."""
    parts = []
    for path in sorted(folder.glob("drift_*.json")):
        try:
            record = json.loads(path.read_text())
            table = drift_table(record)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ZeroDivisionError) as err:
            raise sweep.TablesError(f"{path}: unreadable ({err})") from None
        parts.append(f"Right after surgery, {path.stem[len('drift_'):]} ({record['checkpoint'].split('/')[-1]}), "
                     f"{record['calibration_samples']} calibration texts, {record['heldout_samples']} held-out texts "
                     f"(activation_drift, means weighted by tokens):\n\n" + table)
    return "\n".join(parts)


def surgery_tables(folder, write: bool = True) -> str:
    """The surgery folder's results.md; with `write`, also its results.csv and curves.png."""
    from .plotting import plot_runs

    folder = Path(folder)
    singles, grouped = surgery_runs(folder)
    text = render_surgery(singles, grouped)
    drift = drift_tables(folder)
    if drift:
        text += "\n" + drift
    if write:
        target = folder / "results.md"
        try:
            target.write_text(text)
            target = sweep.write_csv(singles + grouped, folder / "results.csv")
            target = folder / "curves.png"
            plot_runs(sweep.curve_groups(grouped), target, metric="loss",
                      title="validation loss during the fine-tuning (mean over seeds, band = min..max)",
                      references={f"{row['activation']} ({row['final']:.4f})": row["final"] for row in singles})
        except OSError as err:
            raise sweep.TablesError(f"{target}: cannot write it ({err.strerror or err})") from None
    return text


LR_DIR = re.compile(r"^lr(\d.*)$")


def is_lr_study(folder: Path) -> bool:
    """A folder of sweeps of one task, one per learning rate: lrVALUE/ (results.csv and its runs)."""
    subs = [p for p in folder.iterdir() if p.is_dir()]
    return bool(subs) and all(LR_DIR.match(p.name) and (p / "results.csv").is_file() for p in subs)


def lr_study_tables(folder: Path, baseline: str = "gelu", write: bool = True) -> str:
    """Each learning rate's sweep table, then every activation at its best learning rate (the one
    with the best mean final metric over its seeds; diverged runs disqualify a learning rate),
    compared with the baseline at its own best."""
    studies = sorted((float(LR_DIR.match(p.name).group(1)), p) for p in folder.iterdir() if p.is_dir())
    parts, best = [], {}
    for lr, sub in studies:
        parts.append(f"Learning rate {lr:g} (`{sub.name}`):\n\n" + sweep.tables(sub, baseline, write))
        rows = sweep.rows_from_folder(sub)
        higher = any(word in rows[0]["metric"] for word in sweep.HIGHER_IS_BETTER)
        for act in dict.fromkeys(row["activation"] for row in rows):
            group = [r for r in rows if r["activation"] == act]
            if any(sweep.is_diverged(r["final"], r["best"]) for r in group):
                continue
            mean = sum(r["final"] for r in group) / len(group)
            score = -mean if higher else mean
            if act not in best or score < best[act][0]:
                best[act] = (score, lr, group)
    if baseline not in best:
        raise sweep.TablesError(f"{folder}: {baseline} has no learning rate without a diverged run")
    label = {act: f"{act} (lr {lr:g})" for act, (_, lr, _) in best.items()}
    rows = [{**r, "activation": label[act]} for act, (_, _, group) in best.items() for r in group]
    parts.append("Each activation at its best learning rate (best mean final value over its seeds):\n\n"
                 + sweep.render_table(rows, label[baseline]))
    return "\n".join(parts)


def tables(folder, baseline: str = "gelu", write: bool = True) -> str:
    folder = Path(folder)
    if folder.is_dir() and is_surgery_folder(folder):
        return surgery_tables(folder, write)
    if folder.is_dir() and is_lr_study(folder):
        return lr_study_tables(folder, baseline, write)
    return sweep.tables(folder, baseline, write)


def _cmd_tables(args) -> int:
    from .cli import CommandError

    try:
        text = tables(args.folder, args.baseline)
    except sweep.TablesError as err:
        raise CommandError(str(err)) from None
    sys.stdout.write(text)
    return 0


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser(
        "tables", help="rebuild a task folder's results.md (and curves.png) from its runs' raw data",
        description="DIR is a finished sweep's --output_dir (results.csv and ACTIVATION/seedK runs, each with "
                    "metrics.json and log.jsonl) or a surgery folder (base/, control/seedK, ...). Prints the "
                    "tables and writes DIR/results.md and DIR/curves.png.")
    p.add_argument("folder", metavar="DIR")
    p.add_argument("--baseline", default="gelu", help="the activation the others are compared with (sweeps)")
    p.set_defaults(func=_cmd_tables)
