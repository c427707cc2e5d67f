"""`hf-gemact sweep`: activations x seeds of one training task, then paper-style tables.

Each run goes to OUT/<activation>/seed<k>. A run whose folder holds a readable metrics.json is
done and skipped (a diverged one too: it is a result); any other run is (re)started, resuming from
its last complete checkpoint when it has one. An unreadable metrics.json (empty, truncated, missing
the metric) is named, kept beside as metrics.json.unreadable, and its run is done again. A run
folder that another process is writing into (its training holds OUTPUT_DIR/.lock) is reported,
never raced. After the grid, OUT/results.csv (one row per run) and OUT/results.md (one row per
activation; diverged runs shown as such and never ranked) are written, and OUT/curves.png drawn.

Every training run is started through `_child_guard.py`, which ties the run's whole process tree
to the sweep: stopping the sweep (Ctrl-C, SIGTERM, or `kill -9` on Linux) stops its runs too.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

from .sweep_runs import (GUARD, POLL_S, PRIMARY_METRIC, Run, SweepInterrupted, UnreadableResult, command_for, execute,
                         is_diverged, read_result, run_row, say)
from .training.task_table import TASKS as _TASK_TABLE

# built-in tasks: run as `python -m hf_gemact.train TASK`, so that an installed package needs no
# source tree; --task also takes the path of a training script of one's own
TASKS = tuple(_TASK_TABLE)
# the metrics of which higher is better (a script of one's own reporting another metric is compared by
# its name); each built-in task is compared by its PRIMARY_METRIC (sweep_runs.py)
HIGHER_IS_BETTER = tuple(dict.fromkeys([info.primary_metric for info in _TASK_TABLE.values() if info.higher_is_better]
                                       + ["acc", "f1"]))


class SweepUsageError(ValueError):
    """Bad sweep arguments, found before any run starts."""


# read from here too (as before sweep_runs.py held them): by tables.py, the tests and older callers
_ALSO_HERE = (GUARD, POLL_S, PRIMARY_METRIC, command_for)


def plan(activations, seeds, out: Path) -> list:
    return [Run(act, seed, out / act / f"seed{seed}") for act in activations for seed in seeds]


# ----------------------------------------------------------------------------- arguments


def canonical_activation(name: str) -> str:
    """The name a registry activation is known by (gem_n2 and gem are one); others as given."""
    from . import format_activation, parse_activation

    try:
        return format_activation(parse_activation(name))
    except (KeyError, ValueError):
        return name


def check_grid(activations, seeds) -> None:
    """Unknown or repeated activations (also under two spellings) and repeated seeds: a repeat
    would be run again into the same folder (or a twin one) and counted as another run."""
    from .training.args import UsageError, check_activation

    seen = {}
    for name in activations:
        try:
            check_activation(name)
        except UsageError:
            raise SweepUsageError(f"--activations: {name!r} is not a known activation (hf_gemact names such as "
                                  "gem, gem_n1, egem_eps10, segem, velu, or transformers' such as gelu)") from None
        key = canonical_activation(name)
        if key in seen:
            twice = (f"{name} twice" if seen[key] == name
                     else f"{key} twice ({seen[key]} and {name} are the same activation)")
            raise SweepUsageError(f"--activations lists {twice}; list each activation once")
        seen[key] = name
    repeated = sorted({s for s in seeds if list(seeds).count(s) > 1})
    if repeated:
        raise SweepUsageError(f"--seeds lists {', '.join(map(str, repeated))} more than once; "
                              "list each seed once (every seed is one run)")


def training_command(task: str, launcher: str) -> list:
    """The command that starts one run of `task` (its flags follow)."""
    if task in TASKS:
        target = ["-m", "hf_gemact.train", task]
    else:
        path = Path(task)
        if not path.is_file():
            raise SweepUsageError(f"--task {task}: not one of {', '.join(TASKS)} and no such script file")
        target = [str(path.resolve())]
    if launcher == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", *target]
    return [sys.executable, *target]


# ----------------------------------------------------------------------------- tables


def mean_std(values) -> tuple:
    """Mean and sample standard deviation (n - 1); std is 0 for a single value."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarize(rows: list, baseline: str = "gelu") -> list:
    """Per activation: mean/std of final and best, n, difference to the baseline with a simple
    significance flag (|diff| > 2 standard errors of the difference), rank, relative throughput.

    A run whose final or best metric is not finite diverged. An activation with a diverged run is
    never ranked nor compared (its mean would be a survivor's); it comes last with `rank` None,
    `diverged` counting those runs and the statistics of its finite runs (None if it has none)."""
    if not rows:
        return []
    metric = rows[0]["metric"]
    higher = any(word in metric for word in HIGHER_IS_BETTER)
    groups = {}
    for row in rows:
        groups.setdefault(row["activation"], []).append(row)
    table = []
    for act, group in groups.items():
        finite = [r for r in group if not is_diverged(r["final"], r["best"])]
        speeds = [r["throughput"] for r in group if r["throughput"]]
        zeros = [r["zero_fraction"] for r in group if r.get("zero_fraction") is not None]
        nears = [r["near_zero_fraction"] for r in group if r.get("near_zero_fraction") is not None]
        fm, fs = mean_std([r["final"] for r in finite]) if finite else (None, None)
        bm, bs = mean_std([r["best"] for r in finite]) if finite else (None, None)
        table.append({"activation": act, "n": len(group), "diverged": len(group) - len(finite), "final_mean": fm,
                      "final_std": fs, "best_mean": bm, "best_std": bs,
                      "throughput": sum(speeds) / len(speeds) if speeds else None,
                      "zero_fraction": sum(zeros) / len(zeros) if zeros else None,
                      "near_zero_fraction": sum(nears) / len(nears) if nears else None})
    ranked = [t for t in table if not t["diverged"]]
    base = next((t for t in table if t["activation"] == baseline), None)
    for t in table:
        t["diff"] = t["significant"] = t["speed_ratio"] = None
        if base is None:
            continue
        if t["throughput"] and base["throughput"]:
            t["speed_ratio"] = t["throughput"] / base["throughput"]
        if t["diverged"] or base["diverged"]:
            continue
        t["diff"] = t["final_mean"] - base["final_mean"]
        se = math.sqrt(t["final_std"] ** 2 / t["n"] + base["final_std"] ** 2 / base["n"])
        t["significant"] = None if t is base or se == 0 else abs(t["diff"]) > 2 * se
    ranked.sort(key=lambda t: -t["final_mean"] if higher else t["final_mean"])
    for rank, t in enumerate(ranked, start=1):
        t["rank"] = rank
    unranked = [t for t in table if t["diverged"]]
    for t in unranked:
        t["rank"] = None
    return ranked + unranked


def _fmt(value, digits=4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _mean_cell(mean, std) -> str:
    return "diverged" if mean is None else f"{_fmt(mean)} +- {_fmt(std)}"


def _sparsity_cell(t) -> str:
    if t.get("zero_fraction") is None or t.get("near_zero_fraction") is None:
        return ""
    return f"{t['zero_fraction']:.1%} / {t['near_zero_fraction']:.1%}"


CSV_FIELDS = ["activation", "seed", "metric", "status", "final", "best", "throughput", "throughput_unit", "steps",
              "wall_time_s", "zero_fraction", "near_zero_fraction", "near_zero_threshold", "output_dir"]


def write_csv(rows: list, path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_tables(rows: list, out: Path, baseline: str = "gelu") -> tuple:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = write_csv(rows, out / "results.csv"), out / "results.md"
    md_path.write_text(render_table(rows, baseline))
    return csv_path, md_path


def render_table(rows: list, baseline: str = "gelu", name: str = "activation") -> str:
    """results.md: one row per `name` (the activation, or whatever groups the runs)."""
    table = summarize(rows, baseline)
    metric = rows[0]["metric"] if rows else "metric"
    taus = sorted({r["near_zero_threshold"] for r in rows if r.get("near_zero_threshold") is not None})
    tau = "/".join(f"{t:g}" for t in taus) or "tau"
    lines = [
        f"Validation {metric}: final and best, mean +- std over seeds (sample std). diff = final mean minus "
        f"{baseline}'s; sig = |diff| > 2 standard errors of the difference (an indication, not a test). "
        f"speed = throughput relative to {baseline}. sparsity = fraction of MLP activation outputs that are "
        f"exactly 0 / have |y| <= {tau}, on the first validation batches at the end of training (mean over seeds).",
        "",
        f"| rank | {name} | n | final {metric} | best {metric} | diff vs {baseline} | sig | speed | sparsity 0 / near 0 |",
        "|---:|---|---:|---|---|---:|:---:|---:|---:|",
    ]
    for t in table:
        sig = {True: "yes", False: "no", None: ""}[t["significant"]]
        rank, n = (t["rank"], t["n"]) if t["rank"] is not None else ("diverged", f"{t['n']} ({t['diverged']} diverged)")
        lines.append(
            f"| {rank} | {t['activation']} | {n} | {_mean_cell(t['final_mean'], t['final_std'])} | "
            f"{_mean_cell(t['best_mean'], t['best_std'])} | {_fmt(t['diff'])} | {sig} | {_fmt(t['speed_ratio'], 2)} | "
            f"{_sparsity_cell(t)} |")
    if any(t["rank"] is None for t in table):
        lines += ["", "A run diverged when its final or best metric is not finite (nan or inf). An activation "
                  "with a diverged run is not ranked; its means are over its finite runs."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- command line


def _usage_error(message: str) -> int:
    print(f"hf-gemact sweep: error: {message}", file=sys.stderr)
    return 2


def _collect_rows(runs, log=say) -> list:
    rows = []
    for run in runs:
        try:
            metrics = read_result(run)
        except UnreadableResult as err:
            log(f"[sweep] not in the tables: {err}")
            continue
        if metrics is not None:
            rows.append(run_row(run, metrics))
    return rows


def curve_groups(rows: list) -> dict:
    """activation -> run folders whose validation curves are drawn."""
    groups = {}
    for row in rows:
        if row["status"] == "finished":  # a diverged curve would turn its activation's mean into nan
            groups.setdefault(row["activation"], []).append(Path(row["output_dir"]))
    return groups


def _plot(rows: list, out: Path) -> None:
    from .plotting import plot_runs

    groups = curve_groups(rows)
    if not groups:
        return
    try:
        print(plot_runs(groups, out / "curves.png", metric=rows[0]["metric"]))
    except (OSError, ValueError, KeyError) as err:
        print(f"[sweep] curves not drawn: {err}")


def _cmd_sweep(args) -> int:
    out = Path(args.output_dir)
    try:
        check_grid(args.activations, args.seeds)
        command = training_command(args.task, args.launcher)
    except SweepUsageError as err:
        return _usage_error(str(err))
    runs = plan(args.activations, args.seeds, out)
    start = time.time()
    try:
        failures = execute(runs, command, _strip_separator(args.script_args), devices=args.devices)
    except SweepInterrupted as stop:
        print(f"[sweep] {stop}; its runs were stopped and resume on the next sweep", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("[sweep] interrupted; its runs were stopped and resume on the next sweep", file=sys.stderr)
        return 130
    rows = _collect_rows(runs)
    csv_path, md_path = write_tables(rows, out, args.baseline)
    print(md_path.read_text())
    diverged = sum(row["status"] == "diverged" for row in rows)
    print(f"[sweep] {len(rows)}/{len(runs)} runs finished ({diverged} diverged) in {time.time() - start:.0f}s; "
          f"{csv_path}, {md_path}")
    for run, problem in failures:
        print(f"[sweep] not finished: {run.label}: {problem}")
    _plot(rows, out)
    return 1 if failures else 0


# ----------------------------------------------------------------------------- tables of a finished sweep


class TablesError(ValueError):
    """A folder whose raw data cannot give the tables; the message names the file and the problem."""


def tables(folder, baseline: str = "gelu", write: bool = True) -> str:
    """results.md of a finished sweep, rebuilt from its raw data alone: FOLDER/results.csv lists the
    runs, each run's numbers come from FOLDER/ACTIVATION/seedK/metrics.json (the csv must agree with
    it) and its curve from log.jsonl beside it. With `write`: FOLDER/results.md and curves.png too."""
    from .plotting import plot_runs

    folder = Path(folder)
    rows = rows_from_folder(folder)
    if baseline not in {row["activation"] for row in rows}:
        raise TablesError(f"--baseline {baseline}: {folder / 'results.csv'} has no run of it (it has "
                          f"{', '.join(dict.fromkeys(row['activation'] for row in rows))})")
    text = render_table(rows, baseline)
    if write:
        target = folder / "results.md"
        try:
            target.write_text(text)
            target = folder / "curves.png"
            plot_runs(curve_groups(rows), target, metric=rows[0]["metric"])
        except OSError as err:
            raise TablesError(f"{target}: cannot write it ({err.strerror or err})") from None
    return text


def rows_from_folder(folder: Path) -> list:
    if not folder.is_dir():
        what = "a file, not a folder" if folder.exists() else "no such folder"
        raise TablesError(f"{folder}: {what} (pass the --output_dir of a finished sweep, e.g. docs/results/clm)")
    index = folder / "results.csv"
    rows = []
    for line, entry in _read_index(index):
        run = Run(entry["activation"], entry["seed"], folder / entry["activation"] / f"seed{entry['seed']}")
        try:
            metrics = read_result(run)
        except UnreadableResult as err:
            raise TablesError(str(err)) from None
        if metrics is None:
            raise TablesError(f"{run.metrics_path}: not found ({index} line {line} lists {run.label})")
        row = run_row(run, metrics)
        for part in ("final", "best"):
            if not _same_number(entry.get(part), row[part]):
                raise TablesError(f"{index} line {line}: {part} {entry.get(part)!r} but {run.metrics_path} has "
                                  f"{row[part]!r}; the raw data disagree (rerun the sweep or restore the file)")
        _check_log(run.output_dir / "log.jsonl", row["metric"])
        rows.append(row)
    return rows


def _read_index(path: Path) -> list:
    """[(line number, {activation, seed, ...})] of a sweep's results.csv."""
    if not path.is_file():
        raise TablesError(f"{path}: not found (a sweep writes it into its --output_dir)")
    try:
        with open(path, newline="") as f:
            entries = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise TablesError(f"{path}: unreadable ({err})") from None
    if not entries:
        raise TablesError(f"{path}: lists no runs")
    listed = []
    for line, entry in enumerate(entries, start=2):  # line 1 is the header
        try:
            entry["seed"] = int(entry.get("seed") or "")
        except ValueError:
            raise TablesError(f"{path} line {line}: seed {entry.get('seed')!r} is not an integer") from None
        if not entry.get("activation"):
            raise TablesError(f"{path} line {line}: no activation")
        listed.append((line, entry))
    return listed


def _same_number(text, value: float) -> bool:
    try:
        listed = float(text)
    except (TypeError, ValueError):
        return False
    return listed == value or (math.isnan(listed) and math.isnan(value))


def _check_log(path: Path, metric: str) -> None:
    from .plotting import read_eval_curve

    try:
        read_eval_curve(path.parent, metric)
    except FileNotFoundError:
        raise TablesError(f"{path}: not found (each run's log.jsonl draws its curve)") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise TablesError(f"{path}: unreadable ({err})") from None


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="run activations x seeds of one training task and tabulate the results",
        description="Arguments after `--` go to the training script unchanged. Each run goes to "
                    "OUTPUT_DIR/ACTIVATION/seedK; finished runs are skipped, interrupted ones resumed.")
    p.add_argument("--task", required=True, help=f"{', '.join(TASKS)} (python -m hf_gemact.train TASK) or the "
                   "path of a training script of your own")
    p.add_argument("--activations", nargs="+", required=True, help="each once (gem and gem_n2 are one activation)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="each once")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--baseline", default="gelu")
    p.add_argument("--launcher", choices=["python", "accelerate"], default="python",
                   help="start each run with python or with `accelerate launch` (your accelerate config)")
    p.add_argument("--devices", nargs="+", help="GPU ids: runs go to them in parallel, one per device")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="-- then the training script's arguments")
    p.set_defaults(func=_cmd_sweep)


def _strip_separator(args: list) -> list:
    return args[1:] if args and args[0] == "--" else args
