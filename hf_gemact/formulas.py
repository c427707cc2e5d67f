"""The formulas: GEM / E-GEM / SE-GEM and VeLU, forward and closed-form backward, as plain tensor
math (no autograd). `functional.py` wraps them in autograd Functions, `fused.py` compiles kernels
from them; both import this module, which imports neither.

Half-precision inputs are computed in float32 and cast back, the way fused activation
kernels do, so that fp16/bf16 never see an intermediate overflow.

GEM family, with s = |x| and the log-logistic gate g(s) = s^2N / (eps + s^2N):

    E-GEM(x)  = x * g(x)            for x > 0, 0 otherwise      (GEM is eps = 1)
    SE-GEM(x) = x * g(|x|) * (1 if x >= 0 else a)
    d/dx      = g * (1 + 2N * (1 - g))  (times a on the negative side)

The derivative needs only the gate, so a backward saves the input alone and recomputes g.

Every route rounds alike. The compiled fast path (`fused.py`) traces these very functions, and an
element must get bitwise the same output and gradient whichever route serves it and whatever
tensor it arrives in (batch size, padding, layout). So the float32 math (half inputs are computed
in float32) uses only operations that every backend rounds the same way: + - * /, sqrt,
comparisons, where, clamp, round and integer bit operations. Library pow, sqrt, exp, tanh, atan,
asin and sigmoid are not used (SLEEF, MKL, libm and libdevice each round their own way: eager CPU
pow uses one for a vector body and another for the scalar tail, and eager CPU sqrt is not the
correctly rounded one Inductor emits): they are polynomials and Newton steps here. No
library reduction feeds a per-element value either (VeLU's row statistic and its backward's row
term): `tree_sum` adds in an order set by the row length alone. The compiled kernels are built
without FMA contraction. float64 keeps torch's exact functions.
"""

from __future__ import annotations

import math

import torch

# Every parameter's default, written once: functional's `gem` / `velu` and the modules' constructors
# take theirs from here, the registry's families from the modules. N = 2 and eps = 1 make GEM; the
# VeLU values are those of the authors' official code.
GEM_DEFAULTS = {"n": 2, "eps": 1.0, "a": 0.0}
VELU_DEFAULTS = {"alpha": 0.1, "beta1": 0.1, "beta2": 0.1, "gamma": 0.1, "mu": 0.9, "eps": 1e-6, "dim": -1}

_HALF = (torch.float16, torch.bfloat16)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in _HALF else x


def _require_floating(x, fn: str) -> None:
    # Integer math would truncate (gem(2) gave 1); torch's own activations (F.gelu, F.silu) refuse
    # integer and bool tensors too, rather than promote them.
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"hf_gemact.{fn} expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"hf_gemact.{fn} expects a floating-point tensor, got dtype {x.dtype}; convert it first, "
                        f"e.g. x.float() (as F.gelu and F.silu, it does not take integer, bool or complex tensors)")


# ----------------------------------------------------------------------------- GEM family



def gem_gate(s: torch.Tensor, n: int, eps: float) -> torch.Tensor:
    """s^2N / (eps + s^2N) for s >= 0, written as 1 / (1 + eps / s^2N).

    That form gives exactly 1 when s^2N overflows to inf (no inf/inf) and exactly 0 at s = 0.
    s = 0 is routed through a dummy 1 so that differentiating this function (double backward)
    never meets eps / 0; NaN is not equal to 0, so NaN still propagates.
    """
    zero = s == 0
    p = _even_power(torch.where(zero, torch.ones_like(s), s), n)
    return torch.where(zero, torch.zeros_like(s), torch.reciprocal(1 + eps / p))


def _even_power(s: torch.Tensor, n: int) -> torch.Tensor:
    """s^(2N) as (s*s) * (s*s) * ..., left to right: plain products round alike on every route.

    Not pow: eager CPU evaluates pow(s, 4) with SLEEF in the vector body and libm in the tail, and
    Inductor unrolls it into products of its own order.
    """
    s2 = s * s
    p = s2
    for _ in range(n - 1):
        p = p * s2
    return p


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


# ----------------------------------------------------------------------------- VeLU



_HALF_PI = 1.5707963267948966


_QUARTER_PI = 0.7853981633974483


_TAN_3PI_8 = 2.414213562373095


_TAN_PI_8 = 0.41421356237309503


def _polynomial(xf: torch.Tensor) -> bool:
    """Whether the float32-accurate polynomials serve this computation (float32; float64 stays exact)."""
    return xf.dtype != torch.float64


def _with_sign_of(magnitude, t):
    # Not torch.copysign: Inductor's CPU code calls SLEEF for it, and a call inside a vectorised
    # loop spills every register. The sign of zero is not kept (atan(-0.0) = +0.0 here).
    return torch.where(t < 0, -magnitude, magnitude)


_RSQRT_MAGIC = 0x5F375A86  # Lomont's first guess for 1/sqrt from the exponent and mantissa bits


def rsqrt_approx(w: torch.Tensor) -> torch.Tensor:
    """1/sqrt(w) in float32 to within 1.1 ulp for normal w > 0: a bit-level first guess and three
    Newton steps, the last written y + y (1/2 - w/2 y^2) so that its own rounding stays small.

    Not torch.rsqrt / torch.sqrt: eager CPU float32 sqrt (MKL here) is not correctly rounded, and
    Inductor's is, so the two routes would differ. Callers keep w away from 0 (the steps would
    overflow), inf and subnormals. NaN stays NaN.
    """
    y = (_RSQRT_MAGIC - (w.view(torch.int32) >> 1)).view(torch.float32)
    h = 0.5 * w
    for _ in range(2):
        y = y * (1.5 - h * y.square())
    return y + y * (0.5 - h * y.square())


def _rsqrt_row(w: torch.Tensor) -> torch.Tensor:
    """1/sqrt(w) for any w >= 0 (per-row values, so the extra cases cost nothing): inf gives 0, and
    tiny w is scaled by 2^100 first, where the bit-level guess is good."""
    if not _polynomial(w):
        return torch.rsqrt(w)
    tiny = w < 2.0 ** -100
    y = rsqrt_approx(torch.where(tiny, w * 2.0 ** 100, w))
    y = torch.where(tiny, y * 2.0 ** 50, y)
    return torch.where(w == float("inf"), torch.zeros_like(w), y)


def atan_approx(t: torch.Tensor) -> torch.Tensor:
    """atan in float32 to within 2 ulp, from one division and a degree-9 odd polynomial.

    The argument is reduced to |r| <= tan(pi/8) (Cephes' atanf: r = -1/|t| above tan(3pi/8),
    (|t|-1)/(|t|+1) in between), with the three branches written as one quotient so a vectorised
    kernel pays for a single division. Limits are exact (+-pi/2 at +-inf), NaN stays NaN. SLEEF's
    atan would also cost about twice as much in the fused CPU kernels.
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
    """asin on [-1, 1] in float32 to within 4 ulp: Cephes' asinf (one square root, no division).

    Above |c| = 1/2 it uses asin(c) = pi/2 - 2 asin(sqrt((1 - |c|) / 2)), so the polynomial only
    ever sees |r| <= 1/2; the square root is z * rsqrt_approx(z) (z is 0 or at least 2^-25).
    Exact at 0 and +-1; NaN stays NaN.
    """
    a = c.abs()
    high = a > 0.5
    z = torch.where(high, 0.5 * (1.0 - a), a * a)
    r = torch.where(high, z * rsqrt_approx(z.clamp_min(2.0 ** -26)), a)  # z = 0: r = 0 * finite
    p = ((((4.2163199048e-2 * z + 2.4181311049e-2) * z + 4.5470025998e-2) * z + 7.4953002686e-2) * z
         + 1.6666752422e-1) * z * r + r
    return _with_sign_of(torch.where(high, _HALF_PI - 2.0 * p, p), c)


_LOG2_E = 1.4426950408889634


_LN2_HIGH = 0.693359375  # ln 2 in two parts (Cephes): k * _LN2_HIGH is exact for the k used here


_LN2_LOW = -2.12194440e-4


def _power_of_two(k: torch.Tensor) -> torch.Tensor:
    """2^k for integer-valued float32 k in [-126, 127], built from its exponent bits (exact)."""
    return ((k.to(torch.int32) + 127) << 23).view(torch.float32)


def exp_approx(w: torch.Tensor) -> torch.Tensor:
    """e^w in float32 to within 2 ulp (Cephes' expf), from products, sums and exponent bits.

    w = k ln2 + r with |r| <= ln2/2, e^r by a degree-7 polynomial, times 2^k in two exact halves
    so that every k from clamping w to [-104, 89] stays a normal float (e^w is then 0 or inf
    beyond, as float32 rounds it). NaN stays NaN.
    """
    w = w.clamp(-104.0, 89.0)
    k = torch.round(w * _LOG2_E)
    r = (w - k * _LN2_HIGH) - k * _LN2_LOW
    p = (((((1.9875691500e-4 * r + 1.3981999507e-3) * r + 8.3334519073e-3) * r + 4.1665795894e-2) * r
          + 1.6666665459e-1) * r + 5.0000001201e-1) * (r * r) + r + 1.0
    half = torch.floor(k * 0.5)
    return p * _power_of_two(half) * _power_of_two(k - half)


def tanh_approx(v: torch.Tensor) -> torch.Tensor:
    """tanh in float32 to within 2 ulp (Cephes' tanhf): an odd polynomial below |v| = 0.625, and
    (1 - e) / (1 + e) with e = e^(-2|v|) above, where 1 - e loses nothing. Exact +-1 at +-inf."""
    a = v.abs()
    z = v * v
    small = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
             - 3.33332819422e-1) * z * v + v
    e = exp_approx(-2.0 * a)
    large = _with_sign_of((1.0 - e) / (1.0 + e), v)
    return torch.where(a < 0.625, small, large)


# Largest |v| for which sigmoid_small's odd polynomial is float32-accurate (the first term left out,
# 31 v^9 / 1451520, is 3e-9 there); the gate's argument is bounded by |alpha| * pi.
_SMALL_SIGMOID_RANGE = 0.35


def sigmoid_small(v: torch.Tensor) -> torch.Tensor:
    """1 / (1 + e^-v) for |v| <= 0.35 to within 0.8 ulp: 1/2 + v/4 - v^3/48 + v^5/480 - 17 v^7/80640.

    (sigmoid - 1/2 is odd: tanh(v/2)/2.) Nine multiplications and additions, no division and no
    library call: in a vectorised CPU kernel a call to SLEEF's exp spills every live register.
    """
    w = v * v
    return 0.5 + v * (0.25 + w * (-1 / 48 + w * (1 / 480 + w * (-17 / 80640))))


def sigmoid_approx(v: torch.Tensor) -> torch.Tensor:
    """1 / (1 + e^-v) for any v, with exp_approx (0 below v = -89, 1 above about 17)."""
    return 1.0 / (1.0 + exp_approx(-v))


def velu_gate(x, alpha, beta1, beta2, approx=False):
    """sigmoid(alpha (atan(beta1 x) + asin(clamp(beta2 x, -1, 1)))); `approx` uses the polynomials."""
    atan, asin, sigmoid = torch.atan, torch.asin, torch.sigmoid
    if approx:
        atan, asin = atan_approx, asin_approx
        # |atan| < pi/2 and |asin| <= pi/2
        sigmoid = sigmoid_small if abs(alpha) * math.pi <= _SMALL_SIGMOID_RANGE else sigmoid_approx
    return sigmoid(alpha * (atan(beta1 * x) + asin((beta2 * x).clamp(-1.0, 1.0))))


def tree_sum(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over `dim` (kept, size 1) by pairwise halving, in an order set by that dim's size alone.

    A library reduction picks its order by shape: a single row is split across threads, an outer
    reduction is vectorised across outputs, Inductor tiles by its own rules. A row's sum would then
    change with the batch it arrives in. Here the tail beyond the largest power of two is first
    added onto the head, then halves are added until one element is left: the same additions for
    a row wherever it is. The size is made concrete (a symbolic size is specialised), so compiled
    kernels are per row length.
    """
    d = int(t.shape[dim])
    if d == 0:
        return t.sum(dim, keepdim=True)
    width = 1 << (d.bit_length() - 1)
    if width < d:
        extra = d - width
        head = t.narrow(dim, 0, extra) + t.narrow(dim, width, extra)
        t = torch.cat([head, t.narrow(dim, extra, width - extra)], dim)
    while width > 1:
        width //= 2
        t = t.narrow(dim, 0, width) + t.narrow(dim, width, width)
    return t


def velu_row_scale(x, mu, eps, dim):
    """Per row (along `dim`, kept): k = 1 / sqrt(mean(x^2) + eps) and t = tanh(mu k); s = 1 + gamma t.

    mean(x^2) overflowing (|x| above about 1e19 in float32) gives k = 0 and s = 1, the limit.
    """
    xf = _upcast(x)
    mean_square = tree_sum(xf * xf, dim) * (1.0 / int(xf.shape[dim]))
    k = _rsqrt_row(mean_square + eps)
    return k, (tanh_approx if _polynomial(xf) else torch.tanh)(mu * k)


def _row_sum(t, dim):
    # Row sums, then their sum: the structure that lets Inductor fold a global reduction into the
    # per-row loop that already runs, instead of a separate pass over the whole tensor.
    return t.sum(dim).sum()


def _statistics_dtype(y: torch.Tensor) -> torch.dtype:
    # float64 wherever the device has it: y^2 and sums of y cannot overflow there, for any finite
    # float32 y, nor can mean^2 and std^2 in the auxiliary term.
    return y.dtype if y.device.type == "mps" else torch.float64


def _mean_std(y, dim):
    """Mean and (biased) standard deviation of all of y in float64, without E[y^2] - mean^2 cancellation.

    Each row (along `dim`) is centred on its own mean while it is still in cache, and the rows are
    combined exactly (Chan et al.): M2 = sum(M2_row) + n * sum((mean_row - mean)^2). These are
    statistics of the whole tensor, so they (and the auxiliary term's gradient) depend on the
    batch by definition; the per-element output does not use them.
    """
    y = y.to(_statistics_dtype(y))
    n = y.shape[dim]
    row_mean = y.mean(dim, keepdim=True)
    row_m2 = (y - row_mean).square().sum(dim, keepdim=True)
    mean = row_mean.mean()
    m2 = row_m2.sum() + n * (row_mean - mean).square().sum()
    return mean, (m2 / y.numel()).sqrt()


def _tied_to_row(xf, s):
    """xf + 0 * s: the same values (s is finite; a NaN row stays NaN; -0 becomes +0, which the gate
    treats alike), but now depending on the row, so that Inductor computes everything made from it
    inside the one per-row loop over x, where a reused intermediate (the gate's argument, say)
    stays in registers, instead of in a separate pass over memory that stores and reloads it."""
    return xf + 0.0 * s if _polynomial(xf) else xf


def velu_forward(x, lam, alpha, beta1, beta2, gamma, mu, eps, dim, save_gate=False, row_scale=None):
    """(lam * y, mean(y), std(y)) with y = x * g * s; the stats (float64) feed the W2 auxiliary loss.

    `row_scale` is velu_row_scale(x, mu, eps, dim), computed here when not given. With save_gate,
    also returns the gate g (in x's dtype), which lets `velu_backward` skip the transcendental
    part. lam is a 0-d tensor.
    """
    xf = _upcast(x)
    _, t = velu_row_scale(xf, mu, eps, dim) if row_scale is None else row_scale
    s = 1 + gamma * t
    g = velu_gate(_tied_to_row(xf, s), alpha, beta1, beta2, _polynomial(xf))
    y = xf * g * s
    mean, std = _mean_std(y, dim)
    out = (lam.to(y.dtype) * y).to(x.dtype)
    return (out, mean, std, g.to(x.dtype)) if save_gate else (out, mean, std)


def _split_factor(c: torch.Tensor, dtype: torch.dtype):
    """A float64 scalar c as two `dtype` factors, each within float32 range, whose product is c."""
    high = c.abs().sqrt()
    low = torch.where(high > 0, c / torch.where(high > 0, high, torch.ones_like(high)), torch.zeros_like(c))
    return high.to(dtype), low.to(dtype)


def _statistics_gradient(y, grad_mean, grad_std, mean, std):
    """d(grad_mean * mean + grad_std * std) / dy = grad_mean / m + grad_std / (m std) * (y - mean).

    The scalars are float64 (mean and std are); the per-element part is float32 and never overflows
    for finite y: y - mean is taken as y/2 - mean/2, and its float64 factor is applied in two
    halves, each within float32 range even where std is tiny.
    """
    m = y.numel()
    term = None
    if grad_std is not None:
        positive = std > 0
        factor = torch.where(positive, 2 * grad_std / (m * torch.where(positive, std, torch.ones_like(std))),
                             torch.zeros_like(std))
        high, low = _split_factor(factor, y.dtype)
        term = ((0.5 * y - (0.5 * mean).to(y.dtype)) * high) * low
    if grad_mean is not None:
        shift = (grad_mean / m).to(y.dtype)
        term = shift if term is None else term + shift
    return term


def velu_backward(x, lam, grad_out, grad_mean, grad_std, mean, std, alpha, beta1, beta2, gamma, mu, eps, dim,
                  g=None, row_scale=None, lam_needs_grad=None):
    """Closed-form gradients of velu_forward w.r.t. x and lam, given its saved mean and std.

    g (from velu_forward's save_gate, in x's dtype) and row_scale are recomputed when not given; a
    recomputed g is rounded to x's dtype too, so the result is the same either way. lam's gradient
    is None unless lam_needs_grad (default: lam.requires_grad).
    asin'(c) = 1/sqrt(1 - c^2) is infinite at |beta2 x| = 1; it is taken as 0 outside the open
    interval (where the clamp is flat) and bounded inside it, so gradients stay finite.
    The scale's row term is written with z = k x (|z| <= sqrt(D)) so huge inputs give 0, not inf*0.
    """
    xf = _upcast(x)
    if g is None:
        g = velu_gate(xf, alpha, beta1, beta2, _polynomial(xf)).to(x.dtype)
    g = _upcast(g)
    k, t = velu_row_scale(xf, mu, eps, dim) if row_scale is None else row_scale
    s = 1 + gamma * t
    y = xf * g * s
    lam_f = lam.to(y.dtype)

    # Gradient reaching y: from the output (times lam) and from the two statistics.
    grad_y = grad_out.to(y.dtype) * lam_f
    from_statistics = _statistics_gradient(y, grad_mean, grad_std, mean, std)
    if from_statistics is not None:
        grad_y = grad_y + from_statistics

    c = (beta2 * xf).clamp(-1.0, 1.0)
    floor = torch.finfo(xf.dtype).eps
    one_minus_c2 = (1 - c * c).clamp_min(floor)
    dasin = torch.where(c.abs() < 1, beta2 * (rsqrt_approx(one_minus_c2) if _polynomial(xf) else
                                              torch.rsqrt(one_minus_c2)), torch.zeros_like(c))
    b1x = beta1 * xf
    dgate = g * (1 - g) * alpha * (beta1 / (1 + b1x * b1x) + dasin)
    dh = g + xf * dgate

    z = k * xf
    row = tree_sum(grad_y * g * z, dim) * k  # = k^2 * sum(grad_y * h)
    ds_coeff = -gamma * (1 - t * t) * mu * (1.0 / int(xf.shape[dim]))
    grad_x = grad_y * dh * s + ds_coeff * row * z

    grad_lam = None
    if lam.requires_grad if lam_needs_grad is None else lam_needs_grad:
        grad_lam = _row_sum(grad_out.to(y.dtype) * y, dim).to(lam.dtype).reshape(lam.shape)
    return grad_x.to(x.dtype), grad_lam


def _scalar_lam(lam, x: torch.Tensor) -> torch.Tensor:
    """lam as a 0-d tensor: None gives 1, a number or a one-element tensor (shape (1,), as a
    parameter FSDP can shard) its value, differentiably."""
    if lam is None:
        return torch.ones((), dtype=x.dtype, device=x.device)
    if not isinstance(lam, torch.Tensor):
        return torch.tensor(float(lam), dtype=x.dtype, device=x.device)
    if not lam.is_floating_point():
        raise TypeError(f"hf_gemact.velu: lam must be a floating-point tensor, got dtype {lam.dtype}")
    if lam.dim() == 0:
        return lam
    if lam.numel() != 1:
        raise ValueError(f"hf_gemact.velu: lam must hold one value (shape () or (1,)), got shape {tuple(lam.shape)}")
    return lam.reshape(())


def wasserstein_aux_loss(mean: torch.Tensor, std: torch.Tensor, lambda_ot: float) -> torch.Tensor:
    """lambda_ot * W2^2(N(mean, std^2), N(0, 1)) = lambda_ot * (mean^2 + (std - 1)^2).

    In the statistics' dtype (float64 from `velu`), where it stays finite for every finite input.
    """
    return lambda_ot * (mean.square() + (std - 1).square())
