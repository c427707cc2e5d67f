"""Activation statistics and the bounded-memory recorder behind them (one `SiteRecord` per site,
site_record.py).

    stats = hf_gemact.activation_stats(model, batches)        # {site path: record}, plain dicts
    plot_activation_stats(stats, "sparsity.png")

    recorder = ActivationRecorder(model, sample_size=65536)    # what calibration builds on
    recorder.add_unit_mean("err", lambda site, x: old(x) - new(x))
    recorder.run(batches)
    recorder[path].sample()                                    # reservoir of the site's inputs
    recorder[path].unit_mean("err")                            # per hidden unit, over the data

Per site the recorder keeps, whatever the number of batches (nothing in it grows with the data):
  * a uniform reservoir sample of the site's input values (Algorithm R, seeded generator), each
    value with the mean of x^2 over its row (the last dimension), which VeLU's scale needs;
  * count, mean, std (population), exact min and max of the input, and a signed log-spaced
    histogram of it (2 x 2400 bins, 200 per decade over |x| in [1e-6, 1e6]) for quantiles;
  * of the output: exact zeros, near-zeros |y| <= tau, and per unit (last dimension) how often
    it fired (|y| > tau);
  * per unit sums of the input and of any function of it registered with `add_unit_mean`.

Positions where the batch's `attention_mask` is 0 (padding) are left out when the site's input is
shaped (batch, sequence, units) like that mask; otherwise every position counts.
See docs/SURGERY.md, "Activation statistics", for the definitions and the choice of tau.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
from collections.abc import Mapping

import torch
from torch import nn

from .site_record import DEFAULT_SAMPLE_SIZE, NEAR_ZERO, QUANTILE_RELATIVE_ERROR, QUANTILES, SiteRecord
# ------------------------------------------------------------------------------------ recorder


def _select_sites(model, sites):
    from .surgery.errors import NoActivationError
    from .surgery.sites import find_sites

    found = find_sites(model)
    what = f"{type(model).__name__}"
    if sites == "mlp":
        chosen = [s for s in found if s.role == "mlp"]
        if not chosen:
            roles = ", ".join(f"{s.path} ({s.role})" for s in found[:6]) or "none"
            raise NoActivationError(f"{what} has no MLP activation site to record (sites found: {roles}); "
                                    f"pass sites='all' to record every activation site")
        return chosen
    if sites == "all":
        if not found:
            raise NoActivationError(f"{what} has no activation site (no ACT2FN / hf_gemact module) to record")
        return found
    if isinstance(sites, str) or not hasattr(sites, "__iter__"):
        raise ValueError(f"sites must be 'mlp', 'all' or an iterable of site paths, got {sites!r}")
    by_path = {s.path: s for s in found}
    wanted = list(sites)
    unknown = [p for p in wanted if p not in by_path]
    if unknown:
        raise ValueError(f"unknown activation site(s) {unknown}; the sites of {what} are: {list(by_path)}")
    if not wanted:
        raise ValueError("sites is empty: name at least one site path, or use 'mlp' / 'all'")
    return [by_path[p] for p in wanted]


def _check_count(name, value, *, minimum) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_threshold(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"near_zero must be a finite number >= 0 (a bound on |output|), got {value!r}")
    return float(value)


def _model_device(model):
    for p in itertools.chain(model.parameters(), model.buffers()):
        return p.device
    return torch.device("cpu")


def _first_tensor(args, kwargs):
    for value in itertools.chain(args, kwargs.values()):
        if torch.is_tensor(value):
            return value
    return None


class ActivationRecorder:
    """Hooks the activation sites of `model` and records their inputs and outputs in fixed memory.

    sites: "mlp" (the feed-forward activations of the blocks, default), "all" (heads and other
        block activations too) or an iterable of site paths (`surgery.find_sites(model)`).
    sample_size: reservoir capacity per site (0: no sample). near_zero: tau for near-zero outputs
        and for "fired" (|y| > tau). seed: the reservoirs' generators use seed + site index.
    Records accumulate over calls to `run` (or forward passes inside `attached()`).
    """

    def __init__(self, model: nn.Module, *, sites="mlp", sample_size: int = DEFAULT_SAMPLE_SIZE,
                 near_zero: float = NEAR_ZERO, seed: int = 0):
        self.model = model
        self.near_zero = _check_threshold(near_zero)
        sample_size = _check_count("sample_size", sample_size, minimum=0)
        self.unit_fns = {}
        self.records = {}
        shared = {}
        for index, site in enumerate(_select_sites(model, sites)):
            if id(site.module) in shared:  # one module object at two paths: one hook, one record
                continue
            shared[id(site.module)] = site.path
            self.records[site.path] = SiteRecord(site, sample_size=sample_size, near_zero=self.near_zero,
                                                 seed=seed + index, unit_fns=self.unit_fns)
        self.n_batches = 0
        self._mask = None
        self._busy = False

    def __getitem__(self, path: str) -> SiteRecord:
        return self.records[path]

    def __iter__(self):
        return iter(self.records)

    def __len__(self):
        return len(self.records)

    def add_unit_mean(self, name: str, fn) -> None:
        """Also accumulate the per-unit mean of fn(site, x) over the data, x being the site's input
        as (positions, units) (padding dropped); fn returns a tensor of the same shape. Read it with
        `recorder[path].unit_mean(name)`. Bias correction uses fn = old(x) - new(x)."""
        if not isinstance(name, str) or not name or name == "input":
            raise ValueError(f"unit-mean name must be a non-empty string other than 'input', got {name!r}")
        if not callable(fn):
            raise TypeError(f"add_unit_mean({name!r}, fn): fn must be callable as fn(site, x), got {fn!r}")
        self.unit_fns[name] = fn

    @contextlib.contextmanager
    def attached(self, attention_mask=None):
        """Hooks on while the block runs (always removed after it, also on error)."""
        handles = []
        self._mask = attention_mask
        try:
            for record in self.records.values():
                handles.append(record.site.module.register_forward_hook(self._hook(record), with_kwargs=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._mask = None

    def _hook(self, record: SiteRecord):
        def hook(module, args, kwargs, output):
            if self._busy:  # a unit-mean function calling the site module itself is not data
                return
            x = _first_tensor(args, kwargs)
            if x is None or not torch.is_tensor(output):
                raise TypeError(f"activation site {record.site.path}: expected a tensor in and out, got "
                                f"{type(x).__name__} -> {type(output).__name__}")
            self._busy = True
            try:
                with torch.no_grad():
                    record.observe(x.detach(), output.detach(), self._mask)
            finally:
                self._busy = False

        return hook

    def run(self, batches, max_batches: int | None = None, forward: nn.Module | None = None) -> "ActivationRecorder":
        """model(**batch) for each batch (tensors moved to the model's device) in eval mode without
        gradients; every module's train/eval mode is restored afterwards, also on error.
        forward: a wrapper to call instead of the model (DDP / FSDP / accelerate-prepared), holding
        the same site modules."""
        if max_batches is not None:
            max_batches = _check_count("max_batches", max_batches, minimum=1)
        model = forward if forward is not None else self.model
        modes = [(m, m.training) for m in model.modules()]
        device = _model_device(self.model)
        model.eval()
        try:
            with torch.no_grad():
                for batch in itertools.islice(batches, max_batches):
                    if not isinstance(batch, Mapping):
                        raise TypeError(f"each batch must be a dict of model inputs (model(**batch)), got "
                                        f"{type(batch).__name__}")
                    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    with self.attached(inputs.get("attention_mask")):
                        model(**inputs)
                    self.n_batches += 1
        finally:
            for module, training in modes:
                module.training = training
        return self

    def to_dict(self, quantiles=QUANTILES) -> dict:
        """{site path: record} as plain JSON-serialisable values (see `activation_stats`)."""
        return {path: record.to_dict(quantiles) for path, record in self.records.items()}


    def overall(self, reduce=None) -> dict:
        """Zero and near-zero fractions over every recorded value of all sites together, and the
        units that never fired summed over sites. reduce: sums an int64 tensor over processes
        (e.g. `lambda t: accelerator.reduce(t, "sum")`) when each process recorded its own share."""
        records = [r for r in self.records.values() if r.n_units is not None]
        if len(records) != len(self.records):
            missing = [p for p, r in self.records.items() if r.n_units is None]
            raise ValueError(f"no value was recorded at {missing}: run the model on some batches first")
        counts = torch.tensor([sum(r.n_values for r in records), sum(r.n_zero for r in records),
                               sum(r.n_near_zero for r in records)], dtype=torch.int64)
        fired = torch.cat([r.fired.cpu() for r in records])
        both = torch.cat([counts, fired])
        if reduce is not None:
            device = records[0].fired.device
            both = reduce(both.to(device)).cpu()
        n_values, n_zero, n_near = (int(v) for v in both[:3])
        return {"zero_fraction": n_zero / n_values, "near_zero_fraction": n_near / n_values,
                "near_zero_threshold": self.near_zero, "dead_units": int((both[3:] == 0).sum()),
                "units": int(fired.numel()), "sites": len(records), "values": n_values}


# -------------------------------------------------------------------------------- public entry


# Batches of the validation loader that the training loop's end-of-run sparsity uses (per process).
SPARSITY_EVAL_BATCHES = 8


def sparsity_summary(model: nn.Module, batches, *, forward: nn.Module | None = None, reduce=None,
                     max_batches: int = SPARSITY_EVAL_BATCHES, near_zero: float = NEAR_ZERO) -> dict:
    """`ActivationRecorder.overall` of the MLP sites on the first `max_batches` batches: what the
    training loop writes into metrics.json ("activation_sparsity") and `hf-gemact sweep` tabulates.
    A model without MLP activation site gets {"skipped": why}."""
    from .surgery.errors import NoActivationError

    try:
        recorder = ActivationRecorder(model, sample_size=0, near_zero=near_zero)
    except NoActivationError as err:
        return {"skipped": str(err)}
    recorder.run(batches, max_batches=max_batches, forward=forward)
    return {**recorder.overall(reduce), "batches": recorder.n_batches}


def activation_stats(model: nn.Module, batches, *, near_zero: float = NEAR_ZERO, sites="mlp",
                     max_batches: int | None = None) -> dict:
    """Run `model` on `batches` (an iterable of dicts, `model(**batch)`) and return, per activation
    site path, a plain-dict record: zero_fraction, near_zero_fraction (|y| <= near_zero, exact zeros
    included), near_zero_threshold, dead_units (indices of units with |y| <= near_zero everywhere),
    n_units, n_values and input {mean, std, min, max, quantiles}. See docs/SURGERY.md."""
    recorder = ActivationRecorder(model, sites=sites, sample_size=0, near_zero=near_zero)
    recorder.run(batches, max_batches=max_batches)
    if recorder.n_batches == 0:
        raise ValueError("activation_stats: `batches` yielded no batch; pass an iterable of dicts of "
                         "model inputs (e.g. a DataLoader or a list of tokenizer outputs)")
    return recorder.to_dict()


def format_activation_stats(stats: dict) -> str:
    """One line per site: zero / near-zero fractions, dead units and the input's range."""
    if not stats:
        return "no activation sites recorded"
    width = max(len(path) for path in stats)
    tau = next(iter(stats.values()))["near_zero_threshold"]
    head = (f"{'site':<{width}}  {'zero':>7} {f'|y|<={tau:g}':>10} {'dead':>9}  "
            f"{'input mean':>10} {'std':>8} {'q01':>8} {'q50':>8} {'q99':>8}")
    lines = [head]
    for path, r in stats.items():
        if not r["n_values"]:
            lines.append(f"{path:<{width}}  (not called)")
            continue
        inp = r["input"]
        q = inp["quantiles"]
        dead = f"{r['n_dead_units']}/{r['n_units']}"
        lines.append(f"{path:<{width}}  {r['zero_fraction']:>7.2%} {r['near_zero_fraction']:>10.2%} {dead:>9}  "
                     f"{_num(inp['mean']):>10} {_num(inp['std']):>8} {_num(q.get('0.01')):>8} "
                     f"{_num(q.get('0.5')):>8} {_num(q.get('0.99')):>8}")
    return "\n".join(lines)


def _num(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def plot_activation_stats(stats: dict, path, title: str | None = None):
    """PNG with one row per site: the zero and near-zero fractions of the output, labelled, with
    the dead units (left), and the input's quantiles (right: 1-99 % line, 5-95 % bar, 25-75 % box,
    median tick, mean dot)."""
    from .plotting import _pyplot, _save

    plt = _pyplot()
    from matplotlib.lines import Line2D

    records = [r for r in stats.values() if r["n_values"]]
    if not records:
        raise ValueError("plot_activation_stats: no site was called, nothing to plot")
    ys = list(range(len(records)))
    fig, (ax_s, ax_q) = plt.subplots(1, 2, figsize=(13, max(3.2, 0.5 * len(records) + 1.8)), sharey=True,
                                     gridspec_kw={"width_ratios": [1, 1.25]})
    _sparsity_panel(ax_s, records, ys)
    _input_panel(ax_q, records, ys, Line2D)
    if title:
        fig.suptitle(title)
    return _save(plt, fig, path)


def _sparsity_panel(ax, records, ys) -> None:
    tau = records[0]["near_zero_threshold"]
    for offset, field, color, label in ((-0.2, "zero_fraction", "tab:blue", "exact zero"),
                                        (0.2, "near_zero_fraction", "tab:orange", f"|y| <= {tau:g}")):
        values = [r[field] for r in records]
        ax.barh([y + offset for y in ys], values, height=0.38, color=color, label=label)
        for y, v in zip(ys, values):
            text = f"{v:.1%}" if v >= 0.01 else f"{v:.2%}"
            inside = v > 0.2  # long bars carry their number inside, short ones just after
            ax.text(v - 0.01 if inside else v + 0.01, y + offset, text, va="center", fontsize=7,
                    ha="right" if inside else "left", color="white" if inside else "black")
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of output values")
    ax.set_title("output sparsity")
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{r.get('key') or r['path']}\ndead units {r['n_dead_units']}/{r['n_units']}" for r in records],
                       fontsize=8)
    ax.invert_yaxis()
    ax.legend(loc="lower center", fontsize=8, ncol=2, bbox_to_anchor=(0.5, 1.06), frameon=False)
    ax.grid(axis="x", alpha=0.3)


def _input_panel(ax, records, ys, Line2D) -> None:
    for y, r in zip(ys, records):
        q = r["input"]["quantiles"]
        if q.get("0.5") is None:
            continue
        ax.plot([q["0.01"], q["0.99"]], [y, y], color="0.35", linewidth=1)
        ax.plot([q["0.05"], q["0.95"]], [y, y], color="tab:green", linewidth=4, solid_capstyle="butt")
        ax.plot([q["0.25"], q["0.75"]], [y, y], color="tab:green", alpha=0.55, linewidth=11, solid_capstyle="butt")
        ax.plot([q["0.5"]], [y], marker="|", color="black", markersize=13, markeredgewidth=2)
        ax.plot([r["input"]["mean"]], [y], marker="o", color="tab:red", markersize=4, linestyle="none")
    ax.axvline(0, color="0.6", linewidth=0.8)
    ax.set_xlabel("activation input x")
    ax.set_title("input quantiles")
    ax.grid(axis="x", alpha=0.3)
    handles = [Line2D([], [], color="0.35", linewidth=1, label="1-99 %"),
               Line2D([], [], color="tab:green", linewidth=4, label="5-95 %"),
               Line2D([], [], color="tab:green", alpha=0.55, linewidth=9, label="25-75 %"),
               Line2D([], [], color="black", marker="|", markersize=10, linestyle="none", label="median"),
               Line2D([], [], color="tab:red", marker="o", markersize=4, linestyle="none", label="mean")]
    ax.legend(handles=handles, loc="lower center", fontsize=8, ncol=5, bbox_to_anchor=(0.5, 1.06), frameon=False)


__all__ = ["ActivationRecorder", "NEAR_ZERO", "QUANTILES", "QUANTILE_RELATIVE_ERROR", "SPARSITY_EVAL_BATCHES",
           "SiteRecord", "activation_stats", "format_activation_stats", "plot_activation_stats",
           "sparsity_summary"]
