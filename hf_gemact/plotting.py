"""`hf-gemact plot`: activation shapes and derivatives, and validation curves of training runs."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

DEFAULT_CURVES = ("gelu", "relu", "gem_n1", "gem_n2", "egem_n2_eps1e-2", "segem_n1_eps1e-2_a0.1",
                  "velu", "velu_alpha2_beta11_beta20.7")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out) -> Path:
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def activation_curves(name: str, x: torch.Tensor) -> tuple:
    """(f(x), f'(x)) of a registry or built-in activation; VeLU's per-position scale is taken with
    each x alone in its row (mean(x^2) = x^2), i.e. the curve a scalar input sees."""
    from .registry import make_activation

    module = make_activation(name)
    x = x.detach().clone().reshape(-1, 1).requires_grad_()
    with torch.enable_grad():
        y = module(x)
        (dy,) = torch.autograd.grad(y.sum(), x)
    return y.detach().flatten(), dy.flatten()


def plot_activations(names=DEFAULT_CURVES, out: str | Path = "docs/activations.png", lo=-3.0, hi=3.0) -> Path:
    plt = _pyplot()
    x = torch.linspace(lo, hi, 1201, dtype=torch.float64)
    fig, (ax_f, ax_d) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name in names:
        y, dy = activation_curves(name, x)
        style = "--" if name in ("gelu", "relu") else "-"
        ax_f.plot(x, y, style, label=name, linewidth=1.6)
        ax_d.plot(x, dy, style, label=name, linewidth=1.6)
    for ax, title in ((ax_f, "activation f(x)"), (ax_d, "derivative f'(x)")):
        ax.set_title(title)
        ax.axhline(0, color="0.7", linewidth=0.8)
        ax.axvline(0, color="0.7", linewidth=0.8)
        ax.grid(alpha=0.3)
        ax.set_xlabel("x")
    ax_f.set_ylim(lo * 0.4, hi)
    ax_d.legend(fontsize=8, loc="upper left")
    return _save(plt, fig, out)


def read_eval_curve(run_dir: str | Path, metric: str = "loss") -> list:
    """[(step, value)] of the evaluation events in RUN_DIR/log.jsonl."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} an output_dir of a training script?")
    points = []
    for line in path.read_text().splitlines():
        if line.strip():
            event = json.loads(line)
            if event.get("split") == "eval" and metric in event:
                points.append((event["step"], event[metric]))
    return points


def plot_runs(groups: dict, out: str | Path, metric: str = "loss", title: str | None = None,
              references: dict | None = None) -> Path:
    """One line per group (e.g. activation): the mean over its runs (seeds) with a min-max band;
    `references` (label -> value) are drawn as dashed horizontal lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for (label, value), style in zip((references or {}).items(), ("--", ":", "-.")):
        ax.axhline(value, color="0.35", linestyle=style, linewidth=1.1, label=label)
    for label, run_dirs in sorted(groups.items()):
        by_step = defaultdict(list)
        for run_dir in run_dirs:
            for step, value in read_eval_curve(run_dir, metric):
                by_step[step].append(value)
        if not by_step:
            continue
        steps = sorted(by_step)
        mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
        line, = ax.plot(steps, mean, marker="o", markersize=3, label=f"{label} (n={len(run_dirs)})")
        if any(len(by_step[s]) > 1 for s in steps):
            ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                            color=line.get_color(), alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(title or f"validation {metric} (mean over seeds, band = min..max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, out)


def _group_runs_by_activation(run_dirs) -> dict:
    groups = defaultdict(list)
    for run_dir in run_dirs:
        metrics = Path(run_dir) / "metrics.json"
        label = json.loads(metrics.read_text()).get("activation", Path(run_dir).name) if metrics.is_file() \
            else Path(run_dir).name
        groups[str(label)].append(run_dir)
    return groups


def _cmd_plot(args) -> int:
    if args.what == "activations":
        names = args.names or DEFAULT_CURVES
        print(plot_activations(names, args.out or "docs/activations.png"))
    else:
        if not args.runs:
            raise SystemExit("hf-gemact plot runs: give one or more run output folders (each with log.jsonl)")
        print(plot_runs(_group_runs_by_activation(args.runs), args.out or "curves.png", metric=args.metric))
    return 0


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser("plot", help="plot activation shapes/derivatives, or validation curves of runs")
    p.add_argument("what", choices=["activations", "runs"])
    p.add_argument("runs", nargs="*", help="with 'runs': output folders of training runs")
    p.add_argument("--names", nargs="+", help="with 'activations': names to draw (registry or built-in)")
    p.add_argument("--metric", default="loss", help="with 'runs': the eval metric in log.jsonl")
    p.add_argument("--out", help="PNG path (default docs/activations.png or curves.png)")
    p.set_defaults(func=_cmd_plot)


def is_png(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


__all__ = ["plot_activations", "plot_runs", "read_eval_curve", "activation_curves", "is_png"]
