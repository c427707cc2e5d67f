"""`hf-gemact sweep`: activations x seeds x one training script, then paper-style tables.

Each run goes to OUT/<activation>/seed<k>. A run whose folder holds metrics.json is finished and
skipped; any other run is (re)started, resuming from its last complete checkpoint when it has one.
After the grid, OUT/results.csv (one row per run) and OUT/results.md (one row per activation) are
written, and `hf-gemact plot runs` can draw the curves.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

SCRIPTS = {
    "clm": "run_clm.py",
    "mlm": "run_mlm.py",
    "image": "run_image_classification.py",
}
HIGHER_IS_BETTER = ("accuracy", "acc", "f1")
# the metric each paper reports: GPT-2 perplexity, BERT validation loss, ViT accuracy
PRIMARY_METRIC = {"clm": "perplexity", "mlm": "loss", "image": "accuracy"}


@dataclass
class Run:
    activation: str
    seed: int
    output_dir: Path

    @property
    def finished(self) -> bool:
        return (self.output_dir / "metrics.json").is_file()


def plan(activations, seeds, out: Path) -> list:
    return [Run(act, seed, out / act / f"seed{seed}") for act in activations for seed in seeds]


def _has_checkpoint(run_dir: Path) -> bool:
    from .training.checkpoint import list_checkpoints

    return bool(list_checkpoints(run_dir))


def command_for(run: Run, script: Path, script_args: list, launcher: list) -> list:
    cmd = [*launcher, str(script), *script_args, "--activation", run.activation, "--seed", str(run.seed),
           "--output_dir", str(run.output_dir)]
    if _has_checkpoint(run.output_dir):
        cmd += ["--resume_from_checkpoint", "latest"]
    elif run.output_dir.is_dir():
        cmd += ["--overwrite_output_dir"]  # a run that died before its first checkpoint starts afresh
    return cmd


def execute(runs, script: Path, script_args: list, launcher: list, devices=None, log=print) -> list:
    """Run what is not finished; with several devices, one run per device at a time."""
    todo = [r for r in runs if not r.finished]
    for r in runs:
        if r.finished:
            log(f"[sweep] skip finished {r.output_dir}")
    slots = list(devices) if devices else [None]
    failures = []

    def work(index_and_run):
        index, run = index_and_run
        env = dict(os.environ)
        device = slots[index % len(slots)]
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(device)
        cmd = command_for(run, script, script_args, launcher)
        run.output_dir.mkdir(parents=True, exist_ok=True)
        log(f"[sweep] run {run.activation} seed {run.seed}: {' '.join(cmd)}")
        with open(run.output_dir.parent / f"seed{run.seed}.log", "a") as out:
            code = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        if code != 0 or not run.finished:
            failures.append((run, code))
            log(f"[sweep] FAILED {run.activation} seed {run.seed} (exit {code}); see {out.name}")

    # one worker per device slot; run i goes to slot i % len(slots)
    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        list(pool.map(work, enumerate(todo)))
    return failures


# ----------------------------------------------------------------------------- tables


def mean_std(values) -> tuple:
    """Mean and sample standard deviation (n - 1); std is 0 for a single value."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def run_row(run: Run) -> dict:
    m = json.loads((run.output_dir / "metrics.json").read_text())
    metric = PRIMARY_METRIC.get(m.get("task"), "loss")
    speed_key = next((k for k in m if k.endswith("_per_s")), None)
    return {
        "activation": run.activation,
        "seed": run.seed,
        "metric": metric,
        "final": m["final"][metric],
        "best": m["best"][metric],
        "throughput": m.get(speed_key),
        "throughput_unit": speed_key.replace("_per_s", "/s") if speed_key else "",
        "steps": m.get("steps"),
        "wall_time_s": m.get("wall_time_s"),
        "output_dir": str(run.output_dir),
    }


def summarize(rows: list, baseline: str = "gelu") -> list:
    """Per activation: mean/std of final and best, n, difference to the baseline with a simple
    significance flag (|diff| > 2 standard errors of the difference), rank, relative throughput."""
    if not rows:
        return []
    metric = rows[0]["metric"]
    higher = any(word in metric for word in HIGHER_IS_BETTER)
    groups = {}
    for row in rows:
        groups.setdefault(row["activation"], []).append(row)
    table = []
    for act, group in groups.items():
        finals = [r["final"] for r in group]
        bests = [r["best"] for r in group]
        speeds = [r["throughput"] for r in group if r["throughput"]]
        fm, fs = mean_std(finals)
        bm, bs = mean_std(bests)
        table.append({"activation": act, "n": len(group), "final_mean": fm, "final_std": fs, "best_mean": bm,
                      "best_std": bs, "throughput": sum(speeds) / len(speeds) if speeds else None})
    base = next((t for t in table if t["activation"] == baseline), None)
    for t in table:
        if base is None:
            t["diff"] = t["significant"] = t["speed_ratio"] = None
            continue
        t["diff"] = t["final_mean"] - base["final_mean"]
        se = math.sqrt(t["final_std"] ** 2 / t["n"] + base["final_std"] ** 2 / base["n"])
        t["significant"] = None if t is base or se == 0 else abs(t["diff"]) > 2 * se
        t["speed_ratio"] = (t["throughput"] / base["throughput"]) if t["throughput"] and base["throughput"] else None
    ordered = sorted(table, key=lambda t: -t["final_mean"] if higher else t["final_mean"])
    for rank, t in enumerate(ordered, start=1):
        t["rank"] = rank
    return ordered


def _fmt(value, digits=4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def write_tables(rows: list, out: Path, baseline: str = "gelu") -> tuple:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "results.csv", out / "results.md"
    fields = ["activation", "seed", "metric", "final", "best", "throughput", "throughput_unit", "steps",
              "wall_time_s", "output_dir"]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    table = summarize(rows, baseline)
    metric = rows[0]["metric"] if rows else "metric"
    lines = [
        f"Validation {metric}: final and best, mean +- std over seeds (sample std). diff = final mean minus "
        f"{baseline}'s; sig = |diff| > 2 standard errors of the difference (an indication, not a test). "
        f"speed = throughput relative to {baseline}.",
        "",
        f"| rank | activation | n | final {metric} | best {metric} | diff vs {baseline} | sig | speed |",
        "|---:|---|---:|---|---|---:|:---:|---:|",
    ]
    for t in table:
        sig = {True: "yes", False: "no", None: ""}[t["significant"]]
        lines.append(
            f"| {t['rank']} | {t['activation']} | {t['n']} | {_fmt(t['final_mean'])} +- {_fmt(t['final_std'])} | "
            f"{_fmt(t['best_mean'])} +- {_fmt(t['best_std'])} | {_fmt(t['diff'])} | {sig} | "
            f"{_fmt(t['speed_ratio'], 2)} |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


# ----------------------------------------------------------------------------- command line


def _script_path(task: str) -> Path:
    here = Path(__file__).resolve().parents[1] / "train_scripts"
    path = here / SCRIPTS.get(task, task)
    if not path.is_file():
        raise SystemExit(f"training script {path} not found: --task takes {', '.join(SCRIPTS)} or a script path")
    return path


def _cmd_sweep(args) -> int:
    out = Path(args.output_dir)
    script = _script_path(args.task)
    from .training.args import UsageError, check_activation

    try:
        for name in args.activations:
            check_activation(name)
    except UsageError as err:
        raise SystemExit(f"hf-gemact sweep: {err}") from None
    launcher = [sys.executable] if args.launcher == "python" else [sys.executable, "-m", "accelerate.commands.launch"]
    runs = plan(args.activations, args.seeds, out)
    start = time.time()
    failures = execute(runs, script, _strip_separator(args.script_args), launcher, devices=args.devices)
    rows = [run_row(r) for r in runs if r.finished]
    csv_path, md_path = write_tables(rows, out, args.baseline)
    print(md_path.read_text())
    print(f"[sweep] {len(rows)}/{len(runs)} runs finished in {time.time() - start:.0f}s; {csv_path}, {md_path}")
    if rows:
        from .plotting import plot_runs

        groups = {}
        for r in runs:
            if r.finished:
                groups.setdefault(r.activation, []).append(r.output_dir)
        print(plot_runs(groups, out / "curves.png", metric=rows[0]["metric"]))
    return 1 if failures else 0


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="run activations x seeds of one training script and tabulate the results",
        description="Arguments after `--` go to the training script unchanged.")
    p.add_argument("--task", required=True, help=f"{', '.join(SCRIPTS)} or a path to a training script")
    p.add_argument("--activations", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--baseline", default="gelu")
    p.add_argument("--launcher", choices=["python", "accelerate"], default="python")
    p.add_argument("--devices", nargs="+", help="GPU ids: runs go to them in parallel, one per device")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="-- then the training script's arguments")
    p.set_defaults(func=_cmd_sweep)


def _strip_separator(args: list) -> list:
    return args[1:] if args and args[0] == "--" else args
