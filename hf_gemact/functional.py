"""The formulas: GEM / E-GEM / SE-GEM and VeLU, each with a closed-form backward.

Everything here is pure tensor math; `modules.py` wraps it in nn.Modules and `registry.py` owns the
names. Half-precision inputs are computed in float32 and cast back, the way fused activation
kernels do, so that fp16/bf16 never see an intermediate overflow.

GEM family, with s = |x| and the log-logistic gate g(s) = s^2N / (eps + s^2N):

    E-GEM(x)  = x * g(x)            for x > 0, 0 otherwise      (GEM is eps = 1)
    SE-GEM(x) = x * g(|x|) * (1 if x >= 0 else a)
    d/dx      = g * (1 + 2N * (1 - g))  (times a on the negative side)

The derivative needs only the gate, so a backward saves the input alone and recomputes g.
"""

from __future__ import annotations

import torch

from . import fused as _fused

_HALF = (torch.float16, torch.bfloat16)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in _HALF else x


# ----------------------------------------------------------------------------- GEM family


def gem_gate(s: torch.Tensor, n: int, eps: float) -> torch.Tensor:
    """s^2N / (eps + s^2N) for s >= 0, written as 1 / (1 + eps / s^2N).

    That form gives exactly 1 when s^2N overflows to inf (no inf/inf) and exactly 0 at s = 0.
    s = 0 is routed through a dummy 1 so that differentiating this function (double backward)
    never meets eps / 0; NaN is not equal to 0, so NaN still propagates.
    """
    zero = s == 0
    p = torch.where(zero, torch.ones_like(s), s).pow(2 * n)
    return torch.where(zero, torch.zeros_like(s), torch.reciprocal(1 + eps / p))


def gem_forward(x: torch.Tensor, n: int, eps: float, a: float) -> torch.Tensor:
    """E-GEM (a == 0) or SE-GEM (a != 0) in closed form; GEM is eps = 1, a = 0."""
    xf = _upcast(x)
    if a == 0:
        r = torch.relu(xf)
        y = r * gem_gate(r, n, eps)
    else:
        y = xf * gem_gate(xf.abs(), n, eps)
        y = torch.where(xf < 0, a * y, y)
    return y.to(x.dtype)


def gem_derivative(x: torch.Tensor, n: int, eps: float, a: float) -> torch.Tensor:
    """d GEM / dx = g * (1 + 2N (1 - g)), times a for x < 0. Computed in float32 for half inputs."""
    xf = _upcast(x)
    g = gem_gate(torch.relu(xf) if a == 0 else xf.abs(), n, eps)
    d = g * (1 + 2 * n * (1 - g))
    if a != 0:
        d = torch.where(xf < 0, a * d, d)
    return d


class _GEMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, n, eps, a):
        ctx.save_for_backward(x)
        ctx.params = (n, eps, a)
        y = _fused.gem_forward(x, n, eps, a)  # compiled fast path, None where it does not apply
        return gem_forward(x, n, eps, a) if y is None else y

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        grad_x = _fused.gem_backward(x, grad_out, *ctx.params)
        if grad_x is None:
            grad_x = (grad_out * gem_derivative(x, *ctx.params)).to(x.dtype)
        return grad_x, None, None, None


def gem(x: torch.Tensor, n: int = 2, eps: float = 1.0, a: float = 0.0) -> torch.Tensor:
    """GEM / E-GEM / SE-GEM. Parameters are validated by the modules and the registry."""
    return _GEMFunction.apply(x, n, eps, a)


# ----------------------------------------------------------------------------- VeLU


def _velu_parts(x, alpha, beta1, beta2, gamma, mu, eps, dim):
    """The pieces both passes need: gate g, per-position scale s, and k = 1/sqrt(mean(x^2)+eps)."""
    c = (beta2 * x).clamp(-1.0, 1.0)
    g = torch.sigmoid(alpha * (torch.atan(beta1 * x) + torch.asin(c)))
    k = torch.rsqrt(x.square().mean(dim, keepdim=True) + eps)
    t = torch.tanh(mu * k)
    s = 1 + gamma * t
    return c, g, k, t, s


def velu_forward(x, lam, alpha, beta1, beta2, gamma, mu, eps, dim):
    """Returns (lam * y, mean(y), std(y)) with y = x * g * s; the stats feed the W2 auxiliary loss."""
    xf = _upcast(x)
    _, g, _, _, s = _velu_parts(xf, alpha, beta1, beta2, gamma, mu, eps, dim)
    y = xf * g * s
    mean = y.mean()
    std = (y - mean).square().mean().sqrt()
    return (lam.to(y.dtype) * y).to(x.dtype), mean, std


def velu_backward(x, lam, grad_out, grad_mean, grad_std, alpha, beta1, beta2, gamma, mu, eps, dim):
    """Closed-form gradients of velu_forward w.r.t. x and lam.

    asin'(c) = 1/sqrt(1 - c^2) is infinite at |beta2 x| = 1; it is taken as 0 outside the open
    interval (where the clamp is flat) and bounded inside it, so gradients stay finite.
    The scale's row term is written with z = k x (|z| <= sqrt(D)) so huge inputs give 0, not inf*0.
    """
    xf = _upcast(x)
    c, g, k, t, s = _velu_parts(xf, alpha, beta1, beta2, gamma, mu, eps, dim)
    h = xf * g
    y = h * s
    lam_f = lam.to(y.dtype)

    # Gradient reaching y: from the output (times lam) and from the two statistics.
    m = y.numel()
    grad_y = grad_out.to(y.dtype) * lam_f
    if grad_mean is not None:
        grad_y = grad_y + grad_mean / m
    if grad_std is not None:
        mean = y.mean()
        std = (y - mean).square().mean().sqrt()
        safe_std = torch.where(std > 0, std, torch.ones_like(std))
        grad_y = grad_y + torch.where(std > 0, grad_std / (m * safe_std), torch.zeros_like(std)) * (y - mean)

    floor = torch.finfo(xf.dtype).eps
    inside = c.abs() < 1
    dasin = torch.where(inside, beta2 * torch.rsqrt((1 - c.square()).clamp_min(floor)), torch.zeros_like(c))
    dgate = g * (1 - g) * alpha * (beta1 / (1 + (beta1 * xf).square()) + dasin)
    dh = g + xf * dgate

    d = xf.shape[dim]
    z = k * xf
    row = (grad_y * g * z).sum(dim, keepdim=True) * k  # = k^2 * sum(grad_y * h)
    ds_coeff = -gamma * (1 - t.square()) * mu / d
    grad_x = grad_y * dh * s + ds_coeff * row * z

    grad_lam = None
    if lam.requires_grad:
        grad_lam = (grad_out.to(y.dtype) * y).sum().to(lam.dtype).reshape(lam.shape)
    return grad_x.to(x.dtype), grad_lam


class _VeLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lam, alpha, beta1, beta2, gamma, mu, eps, dim):
        ctx.save_for_backward(x, lam)
        ctx.params = (alpha, beta1, beta2, gamma, mu, eps, dim)
        res = _fused.velu_forward(x, lam, *ctx.params)
        out, mean, std = velu_forward(x, lam, *ctx.params) if res is None else res
        return out, mean, std

    @staticmethod
    def backward(ctx, grad_out, grad_mean, grad_std):
        x, lam = ctx.saved_tensors
        res = _fused.velu_backward(x, lam, grad_out, grad_mean, grad_std, *ctx.params)
        grad_x, grad_lam = velu_backward(x, lam, grad_out, grad_mean, grad_std, *ctx.params) if res is None else res
        return grad_x, grad_lam, None, None, None, None, None, None, None


def velu(
    x: torch.Tensor,
    lam: torch.Tensor | None = None,
    alpha: float = 0.1,
    beta1: float = 0.1,
    beta2: float = 0.1,
    gamma: float = 0.1,
    mu: float = 0.9,
    eps: float = 1e-6,
    dim: int = -1,
    return_stats: bool = False,
):
    """VeLU as the official code computes it: lam * x * sigmoid(alpha (atan(b1 x) + asin(b2 x))) * s.

    With return_stats, also returns mean(y) and std(y) (biased) of y = output / lam, differentiable,
    from which `wasserstein_aux_loss` builds the auxiliary term.
    """
    if lam is None:
        lam = torch.ones((), dtype=x.dtype, device=x.device)
    out, mean, std = _VeLUFunction.apply(x, lam, alpha, beta1, beta2, gamma, mu, eps, dim)
    return (out, mean, std) if return_stats else out


def wasserstein_aux_loss(mean: torch.Tensor, std: torch.Tensor, lambda_ot: float) -> torch.Tensor:
    """lambda_ot * W2^2(N(mean, std^2), N(0, 1)) = lambda_ot * (mean^2 + (std - 1)^2)."""
    return lambda_ot * (mean.square() + (std - 1).square())

