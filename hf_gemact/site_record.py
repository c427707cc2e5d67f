"""What the activation recorder keeps for one site, in memory that does not grow with the data:
the accumulators (moments, a log-spaced histogram, a reservoir sample) and `SiteRecord`, which
feeds them one batch of a site's input and output at a time and reads the statistics off them.
`stats.py` holds the recorder over a whole model and the public entry points."""

from __future__ import annotations

import math

import torch

# Default near-zero threshold (see docs/SURGERY.md): an absolute bound on |output|. MLP inputs in
# transformers follow a LayerNorm, so activations are O(1); 1e-3 is below half a bfloat16 ulp of 1
# (2^-8 = 3.9e-3), i.e. such an output disappears when added to a unit-scale term in bf16.
NEAR_ZERO = 1e-3
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
DEFAULT_SAMPLE_SIZE = 65536

# Input histogram: bins in |x| spaced 10^(1/200) apart over [1e-6, 1e6], mirrored for x < 0, one
# central bin for |x| < 1e-6 and one overflow bin per sign for |x| >= 1e6.
HIST_LOW, HIST_HIGH, BINS_PER_DECADE = 1e-6, 1e6, 200
# A quantile read from a bin is the bin's geometric centre, so it is within this relative error of
# the exact order statistic (absolute error < HIST_LOW in the central bin). Bins are assigned with a
# float32 log10, which can move a value across an edge by a few 1e-6 relatively: negligible here.
QUANTILE_RELATIVE_ERROR = 10 ** (1 / (2 * BINS_PER_DECADE)) - 1  # 0.578 %
_LOG_LOW = math.log10(HIST_LOW)
_N_EDGES = round(math.log10(HIST_HIGH / HIST_LOW)) * BINS_PER_DECADE + 1


def _edge(i: int) -> float:
    return 10.0 ** (_LOG_LOW + i / BINS_PER_DECADE)


# --------------------------------------------------------------------------------- accumulators


class _Moments:
    """Count, mean, M2 (Chan et al.'s pairwise update, float64), exact min and max."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.min, self.max = math.inf, -math.inf

    def update(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """x: finite values; lo, hi: their min and max."""
        m = x.numel()
        if m == 0:
            return
        mean_b = x.sum(dtype=torch.float64).item() / m
        # squares about a float32 centre c, then shifted to the mean: sum (x-mean)^2 = S - m (mean-c)^2
        centre = float(torch.tensor(mean_b, dtype=x.dtype))
        m2_b = (x - centre).square().sum(dtype=torch.float64).item() - m * (mean_b - centre) ** 2
        n = self.n + m
        delta = mean_b - self.mean
        self.mean += delta * m / n
        self.m2 += m2_b + delta * delta * self.n * m / n
        self.n = n
        self.min = min(self.min, lo.item())
        self.max = max(self.max, hi.item())

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else math.nan


class _LogHistogram:
    """Signed log-spaced histogram of values (see HIST_*): quantiles to QUANTILE_RELATIVE_ERROR."""

    def __init__(self):
        self.n_edges = _N_EDGES
        self.counts = torch.zeros(2 * self.n_edges + 1, dtype=torch.int64)

    def update(self, x: torch.Tensor) -> None:
        """x: finite float32 values. Magnitude bin i in 1..n_edges-1 holds [edge(i-1), edge(i)),
        bin 0 holds |x| < HIST_LOW (zeros included), bin n_edges holds |x| >= HIST_HIGH."""
        if self.counts.device != x.device:
            self.counts = self.counts.to(x.device)
        position = (x.abs().log10() - _LOG_LOW) * BINS_PER_DECADE  # log10(0) = -inf lands in bin 0
        magnitude = position.floor_().clamp_(-1, self.n_edges - 1).long() + 1
        signed = torch.where(x < 0, self.n_edges - magnitude, self.n_edges + magnitude)
        self.counts += torch.bincount(signed, minlength=len(self.counts))

    def quantiles(self, qs, lo: float, hi: float) -> dict:
        """Lower order statistic at index floor(q * (n - 1)), read from its bin, clamped to [lo, hi]."""
        counts = self.counts.cpu()
        n = int(counts.sum())
        if n == 0:
            return {q: None for q in qs}
        cumulative = counts.cumsum(0)
        out = {}
        for q in qs:
            index = math.floor(q * (n - 1))
            b = int(torch.searchsorted(cumulative, torch.tensor(index), right=True))
            offset = b - self.n_edges
            magnitude = abs(offset)
            if magnitude == 0:
                value = 0.0
            elif magnitude == self.n_edges:
                value = HIST_HIGH
            else:
                value = math.sqrt(_edge(magnitude - 1) * _edge(magnitude))
            value = math.copysign(value, offset) if offset else value
            out[q] = min(max(value, lo), hi)
        return out


class _Reservoir:
    """A uniform sample without replacement of at most `capacity` values of a stream (Algorithm R,
    vectorised per batch; when several items of one batch land in one slot the last one wins, as
    in the sequential algorithm). Each value carries `width` companions (its row's mean square and
    the site's output for it)."""

    def __init__(self, capacity: int, seed: int, width: int = 2):
        self.capacity = capacity
        self.seed = seed
        self.generator = None
        self.values = torch.empty(capacity, dtype=torch.float32)
        self.companion = torch.empty(capacity, width, dtype=torch.float32)
        self.filled = 0
        self.seen = 0

    def _prepare(self, device) -> None:
        if self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
            self.values = self.values.to(device)
            self.companion = self.companion.to(device)

    def offer(self, values: torch.Tensor, companion_of) -> None:
        """values: 1-d float32; companion_of(index tensor) -> the (items, width) companions of those items."""
        m = values.numel()
        if self.capacity == 0 or m == 0:
            return
        self._prepare(values.device)
        take = min(self.capacity - self.filled, m)
        if take:
            head = torch.arange(take, device=values.device)
            self.values[self.filled:self.filled + take] = values[:take]
            self.companion[self.filled:self.filled + take] = companion_of(head)
            self.filled += take
        rest = m - take
        if rest:
            # item t (0-based over the stream) draws j uniform in [0, t] and replaces slot j if j < capacity
            t = torch.arange(self.seen + take, self.seen + m, device=values.device, dtype=torch.float64)
            u = torch.rand(rest, generator=self.generator, device=values.device, dtype=torch.float64)
            slot = torch.floor(u * (t + 1)).long()
            accepted = (slot < self.capacity).nonzero().flatten()
            if accepted.numel():
                winner = torch.full((self.capacity,), -1, dtype=torch.long, device=values.device)
                winner.scatter_reduce_(0, slot[accepted], accepted, reduce="amax")
                slots = (winner >= 0).nonzero().flatten()
                items = winner[slots] + take
                self.values[slots] = values[items]
                self.companion[slots] = companion_of(items)
        self.seen += m


# ----------------------------------------------------------------------------------- one site


class SiteRecord:
    """Everything recorded at one activation site (a `surgery.Site`). Sizes are fixed at the first
    call: the reservoir's capacity, the histogram's bins and n_units for the per-unit tensors."""

    def __init__(self, site, *, sample_size: int, near_zero: float, seed: int, unit_fns: dict):
        self.site = site
        self.near_zero = near_zero
        self._tau32 = _float32_at_most(near_zero)
        self.unit_fns = unit_fns  # shared with the recorder: functions added later are seen too
        self.calls = 0
        self.n_units = None
        self.input = _Moments()
        self.histogram = _LogHistogram()
        self.reservoir = _Reservoir(sample_size, seed)
        self.n_nonfinite_input = 0
        self.n_values = 0  # output values counted (non-padding positions x units)
        self.n_nan_output = 0
        self.n_zero = 0
        self.n_near_zero = 0
        self.fired = None  # int64 (n_units,)
        self.positions = 0  # rows (positions) seen, the denominator of the per-unit means
        self.unit_sums = {}  # name -> float64 (n_units,)

    # ---- recording

    def observe(self, x: torch.Tensor, y: torch.Tensor, mask) -> None:
        if x.shape[-1:] != y.shape[-1:] or x.dim() == 0:
            raise ValueError(f"activation site {self.site.path}: input {tuple(x.shape)} and output "
                             f"{tuple(y.shape)} do not share a last (unit) dimension; the recorder "
                             f"expects an elementwise activation over (..., units) tensors")
        units = x.shape[-1]
        if self.n_units is None:
            self.n_units = units
            self.fired = torch.zeros(units, dtype=torch.int64, device=x.device)
        elif units != self.n_units:
            raise ValueError(f"activation site {self.site.path}: {units} units in this call, "
                             f"{self.n_units} before; one recorder cannot mix models or layouts")
        x2, y2 = _rows(x, mask), _rows(y, mask)
        self.calls += 1
        self._observe_input(x2, y2)
        self._observe_output(y2)
        self._observe_units(x2)

    def _observe_input(self, rows: torch.Tensor, outputs: torch.Tensor) -> None:
        values = rows.float().flatten()
        if values.numel() == 0:
            return
        lo, hi = torch.aminmax(values)  # NaN or inf anywhere shows in them: no isfinite pass needed
        flat_of = None
        if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
            finite = torch.isfinite(values)
            self.n_nonfinite_input += values.numel() - int(finite.sum())
            values = values[finite]
            flat_of = finite.nonzero().flatten()
            if values.numel() == 0:
                return
            lo, hi = torch.aminmax(values)
        self.input.update(values, lo, hi)
        self.histogram.update(values)
        if self.reservoir.capacity:
            row_ms = rows.float().square().mean(-1)
            output = outputs.float().flatten()
            units = rows.shape[-1]

            def companion_of(items):
                flat = flat_of[items] if flat_of is not None else items
                return torch.stack([row_ms[torch.div(flat, units, rounding_mode="floor")], output[flat]], -1)

            self.reservoir.offer(values, companion_of)

    def _observe_output(self, rows: torch.Tensor) -> None:
        y = rows.float()
        magnitude = y.abs()
        tau = self._tau32.to(y.device)
        near = int((magnitude <= tau).sum())
        fired = (magnitude > tau).sum(0)
        self.n_values += y.numel()
        self.n_zero += int((y == 0).sum())
        self.n_near_zero += near
        self.n_nan_output += y.numel() - near - int(fired.sum())  # NaN is neither <= tau nor > tau
        self.fired += fired

    def _observe_units(self, rows: torch.Tensor) -> None:
        self.positions += rows.shape[0]
        self._add_unit_sum("input", rows)
        for name, fn in self.unit_fns.items():
            value = fn(self.site, rows)
            if not torch.is_tensor(value) or value.shape != rows.shape:
                raise ValueError(f"unit-mean function {name!r} at {self.site.path} must return a tensor "
                                 f"shaped like its input {tuple(rows.shape)}, got "
                                 f"{tuple(value.shape) if torch.is_tensor(value) else type(value).__name__}")
            self._add_unit_sum(name, value)

    def _add_unit_sum(self, name, rows) -> None:
        total = rows.sum(0, dtype=torch.float64)
        if name in self.unit_sums:
            self.unit_sums[name] += total
        else:
            self.unit_sums[name] = total

    # ---- reading

    def sample(self) -> torch.Tensor:
        """The reservoir: a uniform sample of the site's finite input values (float32, 1-d)."""
        return self.reservoir.values[: self.reservoir.filled]

    def sample_row_mean_square(self) -> torch.Tensor:
        """For each sampled value, mean(x^2) over the row (last dimension) it came from."""
        return self.reservoir.companion[: self.reservoir.filled, 0]

    def sample_output(self) -> torch.Tensor:
        """For each sampled value, the site's output for it (what calibrated surgery fits to)."""
        return self.reservoir.companion[: self.reservoir.filled, 1]

    def unit_mean(self, name: str = "input") -> torch.Tensor:
        """Per-unit mean over every recorded position of the input ("input") or of a function
        registered with `ActivationRecorder.add_unit_mean` (float64, shape (n_units,))."""
        if name not in self.unit_sums:
            known = ", ".join(sorted(self.unit_sums)) or "none yet: nothing was recorded"
            raise KeyError(f"no per-unit mean {name!r} at {self.site.path} (recorded: {known})")
        return self.unit_sums[name] / max(self.positions, 1)

    def unit_fire_counts(self) -> torch.Tensor:
        return self.fired if self.fired is not None else torch.zeros(0, dtype=torch.int64)

    def to_dict(self, quantiles=QUANTILES) -> dict:
        site, moments = self.site, self.input
        have_values = self.n_values > 0
        fired = self.unit_fire_counts()
        dead = (fired == 0).nonzero().flatten().tolist() if have_values else []
        have_input = moments.n > 0
        qs = self.histogram.quantiles(quantiles, moments.min, moments.max) if have_input else {q: None for q in quantiles}
        return {
            "path": site.path,
            "key": site.key,
            "role": site.role,
            "block": site.block,
            "module": type(site.module).__name__,
            "calls": self.calls,
            "n_units": self.n_units,
            "n_values": self.n_values,
            "n_zero": self.n_zero,
            "n_near_zero": self.n_near_zero,
            "zero_fraction": self.n_zero / self.n_values if have_values else None,
            "near_zero_fraction": self.n_near_zero / self.n_values if have_values else None,
            "near_zero_threshold": self.near_zero,
            "dead_units": dead,
            "n_dead_units": len(dead),
            "n_nan_output": self.n_nan_output,
            "input": {
                "n": moments.n,
                "n_nonfinite": self.n_nonfinite_input,
                "mean": moments.mean if have_input else None,
                "std": moments.std if have_input else None,
                "min": moments.min if have_input else None,
                "max": moments.max if have_input else None,
                "quantiles": {_qkey(q): v for q, v in qs.items()},
            },
        }


def _float32_at_most(tau: float) -> torch.Tensor:
    """The largest float32 <= tau: comparing float32 magnitudes with it is exact for the real tau
    (a plain `<= tau` would round tau to the nearest float32, possibly above it)."""
    t = torch.tensor(tau, dtype=torch.float32)
    if float(t) > tau:
        t = torch.nextafter(t, torch.tensor(-math.inf))
    return t


def _qkey(q: float) -> str:
    return f"{q:g}"


def _rows(t: torch.Tensor, mask) -> torch.Tensor:
    """(positions, units): padding positions dropped when `mask` matches the leading dims."""
    if mask is not None and t.dim() == mask.dim() + 1 and t.shape[:-1] == mask.shape:
        return t[mask.to(t.device).bool()]
    return t.reshape(-1, t.shape[-1])
