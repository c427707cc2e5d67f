"""Fitting the free parameters of an activation family to what a site computes now (calibrated
surgery): least squares over a sample of the site's inputs, in float64.

    E-GEM   eps            a 1-d search over log(eps) (grid, then golden section)
    SE-GEM  eps, a         the same search; for each eps the best a >= 0 is linear least squares
    VeLU    alpha, beta1, beta2, gamma, mu and the module's scale lam: L-BFGS from two starts
    GEM     (none: eps = 1 is what makes it GEM), and transformers' own activations: nothing to fit

Fitted values are rounded to 3 significant digits before they go into the name (a name like
`egem_n2_eps0.0412` is what the config records), and every error is measured with the rounded values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..registry import ActivationSpec, format_activation, parse_activation

# The family's parameters that calibration fits; the others (N, VeLU's eps, dim, lambda_ot) stay as named.
FREE_PARAMETERS = {"gem": (), "egem": ("eps",), "segem": ("eps", "a"),
                   "velu": ("alpha", "beta1", "beta2", "gamma", "mu")}

# log10(eps) searched: E-GEM's gap to ReLU scales with eps^(1/2N), so the useful range is wide.
_LOG_EPS_RANGE = (-8.0, 4.0)
_GRID_POINTS = 121
_GOLDEN_TOL = 1e-4
# The second start of the VeLU fit: the Swish-like curve of the authors' repository.
_VELU_SWISH_START = {"alpha": 2.0, "beta1": 1.0, "beta2": 0.7}
# L-BFGS on VeLU's six parameters costs about a second per thousand values and 100 iterations on
# one CPU core; the reservoir is a uniform sample already, so its head is one too.
_VELU_FIT_VALUES = 8192
_VELU_ITERATIONS = 100


@dataclass
class Fit:
    name: str  # the activation with its fitted parameters
    lam: float | None  # VeLU's fitted scale (a module parameter, not part of the name); None otherwise
    note: str  # what was fitted, or why nothing was


def _round(value: float) -> float:
    return float(f"{value:.3g}")


def _mse(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred - target).square().mean())


def _minimise_log_eps(objective) -> float:
    """argmin over log10(eps) of objective(eps): the best grid point, then golden section between
    its neighbours (the objective is smooth in log eps, and one grid step brackets its minimum)."""
    lo, hi = _LOG_EPS_RANGE
    grid = [lo + (hi - lo) * i / (_GRID_POINTS - 1) for i in range(_GRID_POINTS)]
    values = [objective(10.0 ** g) for g in grid]
    best = min(range(len(grid)), key=values.__getitem__)
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = objective(10.0 ** c), objective(10.0 ** d)
    while b - a > _GOLDEN_TOL:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = objective(10.0 ** c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = objective(10.0 ** d)
    return 10.0 ** ((a + b) / 2)


class _GemSearch:
    """E-GEM / SE-GEM on a fixed sample as a function of eps alone: |x|^2N and x are computed once,
    so each step of the search is a handful of vector operations (the gate is formulas.gem_gate's
    s^2N / (eps + s^2N), in float64)."""

    def __init__(self, x, target, n):
        self.target = target
        self.positive = x > 0
        self.negative = x < 0
        self.x = x
        self.power = x.abs() ** (2 * n)

    def branch(self, eps):
        """x * gate: E-GEM where x > 0, and SE-GEM's negative branch with a = 1 where x < 0."""
        return self.x * (self.power / (eps + self.power))

    def slope(self, y) -> float:
        """The a >= 0 that minimises the squared error on x < 0, where SE-GEM is a * y."""
        h = y[self.negative]
        denominator = float(h.square().sum())
        if denominator == 0:
            return 0.0
        return max(float((h * self.target[self.negative]).sum()) / denominator, 0.0)

    def predict(self, eps, a=None):
        y = self.branch(eps)
        if a is None:  # SE-GEM with its best slope for this eps
            a = self.slope(y)
        return torch.where(self.positive, y, torch.where(self.negative, a * y, torch.zeros_like(y))), a


def _fit_gem_family(spec: ActivationSpec, x, target) -> Fit:
    params = spec.kwargs
    search = _GemSearch(x, target, params["n"])
    if spec.family == "egem":
        eps = _round(_minimise_log_eps(lambda e: _mse(search.predict(e, 0.0)[0], target)))
        fitted = {**params, "eps": eps}
        note = f"fitted eps = {eps:g}"
    else:  # segem
        eps = _round(_minimise_log_eps(lambda e: _mse(search.predict(e)[0], target)))
        a = _round(search.predict(eps)[1])
        fitted = {**params, "eps": eps, "a": a}
        note = f"fitted eps = {eps:g}, a = {a:g}"
    name = format_activation(ActivationSpec(spec.family, tuple(fitted.items())))
    return Fit(name, None, note)


def velu_unscaled(x, row_mean_square, alpha, beta1, beta2, gamma, mu, eps):
    """VeLU before lam, in float64, for values whose row statistic mean(x^2) is given with them."""
    # asin is evaluated just inside [-1, 1]: its derivative in beta2 is infinite at the ends
    u = (beta2 * x).clamp(-1.0 + 1e-12, 1.0 - 1e-12)
    gate = torch.sigmoid(alpha * (torch.atan(beta1 * x) + torch.asin(u)))
    scale = 1 + gamma * torch.tanh(mu / torch.sqrt(row_mean_square + eps))
    return x * gate * scale


def _best_lam(u, target) -> float:
    denominator = float(u.square().sum())
    return float((u * target).sum()) / denominator if denominator > 0 else 1.0


def _fit_velu(spec: ActivationSpec, x, target, row_mean_square) -> Fit:
    params = spec.kwargs
    free = FREE_PARAMETERS["velu"]
    x_all, target_all, ms_all = x, target, row_mean_square
    x, target, row_mean_square = x[:_VELU_FIT_VALUES], target[:_VELU_FIT_VALUES], row_mean_square[:_VELU_FIT_VALUES]
    best = None
    for start in (params, {**params, **_VELU_SWISH_START}):
        theta = torch.tensor([float(start[k]) for k in free] + [1.0], dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=_VELU_ITERATIONS, tolerance_grad=1e-12, tolerance_change=1e-14,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = (theta[-1] * velu_unscaled(x, row_mean_square, *theta[:-1], params["eps"]) - target).square().mean()
            loss.backward()
            return loss

        optimizer.step(closure)
        values = [_round(v) for v in theta[:-1].tolist()]
        if not all(math.isfinite(v) for v in values):
            continue
        u = velu_unscaled(x_all, ms_all, *values, params["eps"])
        lam = _best_lam(u, target_all)
        error = _mse(lam * u, target_all)
        if best is None or error < best[0]:
            best = (error, values, lam)
    if best is None:
        return Fit(spec.name, 1.0, "the VeLU fit did not converge: the named parameters are kept")
    _, values, lam = best
    fitted = {**params, **dict(zip(free, values))}
    name = format_activation(ActivationSpec("velu", tuple(fitted.items())))
    return Fit(name, lam, "fitted " + ", ".join(f"{k} = {v:g}" for k, v in zip(free, values)) + f", lam = {lam:.4g}")


def fit_activation(name: str, x: torch.Tensor, target: torch.Tensor, row_mean_square: torch.Tensor | None = None) -> Fit:
    """Fit `name`'s free parameters so that it maps the sample `x` closest to `target` (mean squared
    error); `row_mean_square` is each value's row statistic mean(x^2) (VeLU's scale depends on it).
    Names without free parameters (GEM, transformers' activations) come back unchanged."""
    try:
        spec = parse_activation(name)
    except (KeyError, ValueError):
        return Fit(name, None, f"{name} has no free parameter to fit")
    if not FREE_PARAMETERS[spec.family]:
        return Fit(name, None, f"{name} has no free parameter to fit (GEM is E-GEM with eps = 1)")
    x, target = x.double(), target.double()
    if x.numel() == 0:
        return Fit(name, None, "no calibration input was recorded at this site: nothing fitted")
    if spec.family == "velu":
        if row_mean_square is None:
            raise ValueError("fitting VeLU needs each value's row statistic (row_mean_square)")
        return _fit_velu(spec, x, target, row_mean_square.double())
    return _fit_gem_family(spec, x, target)
