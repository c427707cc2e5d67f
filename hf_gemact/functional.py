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

import math

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


def _apply(fn_cls, *args):
    """fn_cls.apply(*args), through its combined-style twin outside torch.func transforms and Dynamo.

    Function.apply binds a setup_context-style forward's arguments with inspect.signature on every
    call (GEM's fused forward+backward at 64K elements, one CPU thread: 0.16 ms instead of 0.12);
    the combined forward(ctx, ...) style skips that, but torch.func (vmap, grad, jacrev) needs
    setup_context.
    """
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():  # Dynamo traces fn_cls
        return fn_cls.apply(*args)
    return fn_cls.combined.apply(*args)


def _with_combined_twin(fn_cls):
    """Give a setup_context-style Function `.combined`: the same steps as forward(ctx, *inputs)."""

    def forward(ctx, *inputs):
        output = fn_cls.forward(*inputs)
        fn_cls.setup_context(ctx, inputs, output)
        return output

    fn_cls.combined = type(f"{fn_cls.__name__}Combined", (torch.autograd.Function,),
                           {"forward": staticmethod(forward), "backward": staticmethod(fn_cls.backward)})
    return fn_cls


@_with_combined_twin
class _GEMFunction(torch.autograd.Function):
    # forward and backward are plain tensor ops under functorch (the fast path steps aside for its
    # wrapped tensors), so vmap can run them as they are: torch.func.vmap, grad, jacrev. No custom
    # jvp (forward mode, jacfwd): Dynamo cannot trace a Function that has one, and whole-model
    # torch.compile must keep tracing this one; a Hessian is jacrev(jacrev(f)).
    generate_vmap_rule = True

    @staticmethod
    def forward(x, n, eps, a):
        y = _fused.gem_forward(x, n, eps, a)  # compiled fast path, None where it does not apply
        return gem_forward(x, n, eps, a) if y is None else y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, *ctx.params = inputs
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        grad_x = _fused.gem_backward(x, grad_out, *ctx.params)
        if grad_x is None:
            grad_x = (grad_out * gem_derivative(x, *ctx.params)).to(x.dtype)
        return grad_x, None, None, None


def gem(x: torch.Tensor, n: int = 2, eps: float = 1.0, a: float = 0.0) -> torch.Tensor:
    """GEM / E-GEM / SE-GEM. Parameters are validated by the modules and the registry."""
    return _apply(_GEMFunction, x, n, eps, a)


# ----------------------------------------------------------------------------- VeLU


_HALF_PI = 1.5707963267948966
_QUARTER_PI = 0.7853981633974483
_TAN_3PI_8 = 2.414213562373095
_TAN_PI_8 = 0.41421356237309503


def _with_sign_of(magnitude, t):
    # Not torch.copysign: Inductor's CPU code calls SLEEF for it, and a call inside a vectorised
    # loop spills every register. The sign of zero is not kept (atan(-0.0) = +0.0 here).
    return torch.where(t < 0, -magnitude, magnitude)


def atan_approx(t: torch.Tensor) -> torch.Tensor:
    """atan in float32 to within 2 ulp, from one division and a degree-9 odd polynomial.

    The argument is reduced to |r| <= tan(pi/8) (Cephes' atanf: r = -1/|t| above tan(3pi/8),
    (|t|-1)/(|t|+1) in between), with the three branches written as one quotient so a vectorised
    kernel pays for a single division. Limits are exact (+-pi/2 at +-inf), NaN stays NaN. The
    fused CPU kernels use it; SLEEF's atan costs about twice as much there.
    """
    a = t.abs()
    big = a > _TAN_3PI_8
    mid = a > _TAN_PI_8
    num = torch.where(big, -1.0, torch.where(mid, a - 1.0, a))
    den = torch.where(big, a, torch.where(mid, a + 1.0, 1.0))
    r = num / den
    z = r * r
    p = (((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z - 3.33329491539e-1) * z * r + r
    offset = torch.where(big, _HALF_PI, torch.where(mid, _QUARTER_PI, 0.0))
    return _with_sign_of(offset + p, t)


def asin_approx(c: torch.Tensor) -> torch.Tensor:
    """asin on [-1, 1] in float32 to within 3 ulp: Cephes' asinf (one square root, no division).

    Above |c| = 1/2 it uses asin(c) = pi/2 - 2 asin(sqrt((1 - |c|) / 2)), so the polynomial only
    ever sees |r| <= 1/2. Exact at 0 and +-1; NaN stays NaN.
    """
    a = c.abs()
    high = a > 0.5
    z = torch.where(high, 0.5 * (1.0 - a), a * a)
    r = torch.where(high, z.sqrt(), a)
    p = ((((4.2163199048e-2 * z + 2.4181311049e-2) * z + 4.5470025998e-2) * z + 7.4953002686e-2) * z
         + 1.6666752422e-1) * z * r + r
    return _with_sign_of(torch.where(high, _HALF_PI - 2.0 * p, p), c)


# Largest |v| for which sigmoid_small's degree-7 Taylor series of e^-v is float32-exact (the
# truncation term 0.35^8 / 8! is 6e-9); the gate's argument is bounded by |alpha| * pi.
_SMALL_SIGMOID_RANGE = 0.35


def sigmoid_small(v: torch.Tensor) -> torch.Tensor:
    """1 / (1 + e^-v) for |v| <= 0.35, with e^-v as a polynomial: no range reduction, no library call.

    In a vectorised CPU kernel a call to SLEEF's exp forces every live register to be spilled,
    which costs more than the exp itself; eight FMAs do not.
    """
    w = -v
    e = 1 + w * (1 + w * (1 / 2 + w * (1 / 6 + w * (1 / 24 + w * (1 / 120 + w * (1 / 720 + w * (1 / 5040)))))))
    return 1.0 / (1.0 + e)


def velu_gate(x, alpha, beta1, beta2, approx=False):
    """sigmoid(alpha (atan(beta1 x) + asin(clamp(beta2 x, -1, 1)))); `approx` uses the polynomials."""
    atan, asin, sigmoid = torch.atan, torch.asin, torch.sigmoid
    if approx:
        atan, asin = atan_approx, asin_approx
        if abs(alpha) * math.pi <= _SMALL_SIGMOID_RANGE:  # |atan| < pi/2 and |asin| <= pi/2
            sigmoid = sigmoid_small
    return sigmoid(alpha * (atan(beta1 * x) + asin((beta2 * x).clamp(-1.0, 1.0))))


def velu_row_scale(x, mu, eps, dim):
    """Per row (along `dim`, kept): k = 1 / sqrt(mean(x^2) + eps) and t = tanh(mu k); s = 1 + gamma t."""
    k = torch.rsqrt(_upcast(x).square().mean(dim, keepdim=True) + eps)
    return k, torch.tanh(mu * k)


def _row_sum(t, dim):
    # Row sums, then their sum: the structure that lets Inductor fold a global reduction into the
    # per-row loop that already runs, instead of a separate pass over the whole tensor.
    return t.sum(dim).sum()


def _mean_std(y, dim):
    """Mean and (biased) standard deviation of all of y, without E[y^2] - mean^2 cancellation.

    Each row (along `dim`) is centred on its own mean while it is still in cache, and the rows are
    combined exactly (Chan et al.): M2 = sum(M2_row) + n * sum((mean_row - mean)^2).
    """
    n = y.shape[dim]
    row_mean = y.mean(dim, keepdim=True)
    row_m2 = (y - row_mean).square().sum(dim, keepdim=True)
    mean = row_mean.mean()
    m2 = row_m2.sum() + n * (row_mean - mean).square().sum()
    return mean, (m2 / y.numel()).sqrt()


def velu_forward(x, lam, alpha, beta1, beta2, gamma, mu, eps, dim, approx=False, save_gate=False, row_scale=None):
    """(lam * y, mean(y), std(y)) with y = x * g * s; the stats feed the W2 auxiliary loss.

    `row_scale` is velu_row_scale(x, mu, eps, dim), computed here when not given. With save_gate,
    also returns the gate g (in x's dtype), which lets `velu_backward` skip the transcendental
    part. `approx` selects the polynomial atan/asin/sigmoid of the compiled CPU kernels.
    """
    xf = _upcast(x)
    _, t = velu_row_scale(xf, mu, eps, dim) if row_scale is None else row_scale
    s = 1 + gamma * t
    g = velu_gate(xf, alpha, beta1, beta2, approx)
    if approx:
        # Adding 0 * s (s is finite; a NaN row stays NaN) ties g to its row: Inductor then computes
        # g inside the one per-row loop over x, instead of in a separate pass over memory.
        g = g + 0.0 * s
    y = xf * g * s
    mean, std = _mean_std(y, dim)
    out = (lam.to(y.dtype) * y).to(x.dtype)
    return (out, mean, std, g.to(x.dtype)) if save_gate else (out, mean, std)


def velu_backward(x, lam, grad_out, grad_mean, grad_std, mean, std, alpha, beta1, beta2, gamma, mu, eps, dim,
                  g=None, row_scale=None, approx=False, lam_needs_grad=None):
    """Closed-form gradients of velu_forward w.r.t. x and lam, given its saved mean and std.

    g (from velu_forward's save_gate) and row_scale are recomputed when not given. lam's gradient
    is None unless lam_needs_grad (default: lam.requires_grad).
    asin'(c) = 1/sqrt(1 - c^2) is infinite at |beta2 x| = 1; it is taken as 0 outside the open
    interval (where the clamp is flat) and bounded inside it, so gradients stay finite.
    The scale's row term is written with z = k x (|z| <= sqrt(D)) so huge inputs give 0, not inf*0.
    """
    xf = _upcast(x)
    g = velu_gate(xf, alpha, beta1, beta2, approx) if g is None else _upcast(g)
    k, t = velu_row_scale(xf, mu, eps, dim) if row_scale is None else row_scale
    s = 1 + gamma * t
    y = xf * g * s
    lam_f = lam.to(y.dtype)

    # Gradient reaching y: from the output (times lam) and from the two statistics.
    m = y.numel()
    grad_y = grad_out.to(y.dtype) * lam_f
    if grad_mean is not None:
        grad_y = grad_y + grad_mean / m
    if grad_std is not None:
        safe_std = torch.where(std > 0, std, torch.ones_like(std))
        grad_y = grad_y + torch.where(std > 0, grad_std / (m * safe_std), torch.zeros_like(std)) * (y - mean)

    c = (beta2 * xf).clamp(-1.0, 1.0)
    floor = torch.finfo(xf.dtype).eps
    dasin = torch.where(c.abs() < 1, beta2 * torch.rsqrt((1 - c.square()).clamp_min(floor)), torch.zeros_like(c))
    dgate = g * (1 - g) * alpha * (beta1 / (1 + (beta1 * xf).square()) + dasin)
    dh = g + xf * dgate

    d = xf.shape[dim]
    z = k * xf
    row = (grad_y * g * z).sum(dim, keepdim=True) * k  # = k^2 * sum(grad_y * h)
    ds_coeff = -gamma * (1 - t.square()) * mu / d
    grad_x = grad_y * dh * s + ds_coeff * row * z

    grad_lam = None
    if lam.requires_grad if lam_needs_grad is None else lam_needs_grad:
        grad_lam = _row_sum(grad_out.to(y.dtype) * y, dim).to(lam.dtype).reshape(lam.shape)
    return grad_x.to(x.dtype), grad_lam


@_with_combined_twin
class _VeLUFunction(torch.autograd.Function):
    # As for GEM: plain tensor ops under functorch, so vmap can run forward and backward as they
    # are. The fast path's gate g and row scale (k, t) are returned as non-differentiable extra
    # outputs, the way setup_context-style functions keep intermediates for backward.
    generate_vmap_rule = True

    @staticmethod
    def forward(x, lam, alpha, beta1, beta2, gamma, mu, eps, dim):
        params = (alpha, beta1, beta2, gamma, mu, eps, dim)
        res = _fused.velu_forward(x, lam, *params, need_grad=x.requires_grad or lam.requires_grad)
        return (*velu_forward(x, lam, *params), None, None, None) if res is None else res

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, lam, *ctx.params = inputs
        _, mean, std, g, k, t = output
        ctx.mark_non_differentiable(*(saved for saved in (g, k, t) if saved is not None))
        ctx.set_materialize_grads(False)  # unused statistics get no zero-filled gradient
        ctx.save_for_backward(x, lam, mean, std, g, k, t)

    @staticmethod
    def backward(ctx, grad_out, grad_mean, grad_std, *_):
        x, lam, mean, std, g, k, t = ctx.saved_tensors
        if grad_out is None:  # only the statistics were used (the auxiliary loss alone)
            grad_out = torch.zeros_like(x)
        row_scale = None if k is None else (k, t)
        res = _fused.velu_backward(x, lam, grad_out, grad_mean, grad_std, mean, std, g, row_scale, *ctx.params)
        if res is None:
            res = velu_backward(x, lam, grad_out, grad_mean, grad_std, mean, std, *ctx.params)
        grad_x, grad_lam = res
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
    out, mean, std, *_ = _apply(_VeLUFunction, x, lam, alpha, beta1, beta2, gamma, mu, eps, dim)
    return (out, mean, std) if return_stats else out


def wasserstein_aux_loss(mean: torch.Tensor, std: torch.Tensor, lambda_ot: float) -> torch.Tensor:
    """lambda_ot * W2^2(N(mean, std^2), N(0, 1)) = lambda_ot * (mean^2 + (std - 1)^2)."""
    return lambda_ot * (mean.square() + (std - 1).square())

