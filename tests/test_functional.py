"""The math of the four families, checked against closed forms, float64 gradcheck and properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

import hf_gemact
from hf_gemact import functional as F

GEM_CASES = [  # (n, eps, a): GEM N=1,2,3, E-GEM small and large eps, SE-GEM
    (1, 1.0, 0.0), (2, 1.0, 0.0), (3, 1.0, 0.0), (2, 1e-2, 0.0), (1, 10.0, 0.0), (2, 0.3, 0.05), (1, 1e-4, 0.01),
]


def gem_reference(x: torch.Tensor, n: int, eps: float, a: float) -> torch.Tensor:
    """The textbook rational form, in float64: r^(2N+1)/(eps+r^(2N)), and a*x^(2N+1)/(eps+x^(2N)) below 0."""
    x = x.double()
    pos = x.clamp_min(0) ** (2 * n + 1) / (eps + x.clamp_min(0) ** (2 * n))
    neg = a * x.clamp_max(0) ** (2 * n + 1) / (eps + x.clamp_max(0) ** (2 * n))
    return pos + neg


def gem_reference_derivative(x: torch.Tensor, n: int, eps: float, a: float) -> torch.Tensor:
    """Quotient rule on the rational form: x^2N ((2N+1) eps + x^2N) / (eps + x^2N)^2."""
    x = x.double()
    p = x ** (2 * n)
    d = p * ((2 * n + 1) * eps + p) / (eps + p) ** 2
    return torch.where(x >= 0, d, a * d)


def gem_reference_second_derivative(x: torch.Tensor, n: int, eps: float, a: float) -> torch.Tensor:
    """The derivative above, differentiated: 2N x^(2N-1) eps ((2N+1) eps + (1-2N) x^2N) / (eps + x^2N)^3."""
    x = x.double()
    p = x ** (2 * n)
    d2 = 2 * n * x ** (2 * n - 1) * eps * ((2 * n + 1) * eps + (1 - 2 * n) * p) / (eps + p) ** 3
    return torch.where(x >= 0, d2, a * d2)


@pytest.mark.parametrize("n,eps,a", GEM_CASES)
def test_gem_matches_closed_form(n, eps, a):
    x = torch.linspace(-6, 6, 2001, dtype=torch.float64, requires_grad=True)
    y = hf_gemact.gem(x, n, eps, a)
    torch.testing.assert_close(y, gem_reference(x, n, eps, a), rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, gem_reference_derivative(x.detach(), n, eps, a), rtol=1e-12, atol=1e-14)


def test_gem_is_the_confirmed_formula_at_known_points():
    # GEM N=1 at x = 1, 2: 1/2 and 8/5; N=2 at x = 2: 32/17.
    x = torch.tensor([1.0, 2.0, -2.0], dtype=torch.float64)
    assert hf_gemact.gem(x, 1).tolist() == pytest.approx([0.5, 1.6, 0.0])
    assert hf_gemact.gem(x, 2)[1].item() == pytest.approx(32 / 17)


@pytest.mark.parametrize("n,eps,a", GEM_CASES)
def test_gem_gradcheck_and_gradgradcheck(n, eps, a):
    x = (torch.randn(64, dtype=torch.float64) * 2).requires_grad_()
    fn = lambda t: hf_gemact.gem(t, n, eps, a)  # noqa: E731
    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))


def _nth_derivatives(fn, x: torch.Tensor, order: int) -> list:
    """f', f'', ..., f^(order) at x by repeated autograd (through the closed-form backward)."""
    x = x.clone().requires_grad_()
    out, derivs = fn(x), []
    for _ in range(order):
        (out,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        derivs.append(out.detach())
    return derivs


@pytest.mark.parametrize("n,eps,a", [(1, 1.0, 0.0), (2, 1.0, 0.0), (2, 0.5, 0.0), (1, 0.5, 0.2), (2, 2.0, 0.05)])
def test_c2n_smooth_at_zero(n, eps, a):
    """Right and left derivatives of order 1..2N go to 0 at 0 like the Taylor term c*h^(2N+1-k);
    order 2N+1 tends to (2N+1)!/eps on the right and a*(2N+1)!/eps on the left: C^{2N}, not C^{2N+1}."""
    fn = lambda t: hf_gemact.gem(t, n, eps, a)  # noqa: E731
    top = 2 * n + 1
    lead = math.factorial(top) / eps
    for h in (1e-2, 1e-3):
        for side, scale in ((1.0, 1.0), (-1.0, a)):
            x = torch.tensor([side * h], dtype=torch.float64)
            derivs = _nth_derivatives(fn, x, top)
            for k, d in enumerate(derivs, start=1):
                taylor = scale * lead / math.factorial(top - k) * (side * h) ** (top - k)
                assert d.item() == pytest.approx(taylor, rel=1e-2, abs=1e-300), (side, h, k)
            assert derivs[-1].item() == pytest.approx(scale * lead, rel=1e-2)
    # and exactly at 0 every derivative of order <= 2N is 0
    for d in _nth_derivatives(fn, torch.zeros(1, dtype=torch.float64), 2 * n):
        assert d.item() == 0.0


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("p", [1, 2])
def test_egem_lp_gap_to_relu_shrinks_with_eps(n, p):
    """||E-GEM - ReLU||_p on [-8, 8]: matches the closed-form gap eps*r/(eps+r^2N) and goes to 0."""
    x = torch.linspace(-8, 8, 400001, dtype=torch.float64)
    dx = (x[1] - x[0]).item()
    gaps = []
    for eps in (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-6):
        diff = torch.relu(x) - hf_gemact.gem(x, n, eps)
        r = x.clamp_min(0)
        torch.testing.assert_close(diff, eps * r / (eps + r ** (2 * n)), rtol=1e-9, atol=1e-12)
        gaps.append((diff.abs() ** p).sum().item() * dx)
    assert all(b < a for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 1e-2 * gaps[0]


def test_segem_has_no_dead_neurons():
    x = -torch.logspace(-3, 4, 200, dtype=torch.float64)
    x.requires_grad_()
    hf_gemact.gem(x, 2, 1e-4, 0.01).sum().backward()
    assert (x.grad > 0).all()
    assert x.grad[-1].item() == pytest.approx(0.01, rel=1e-6)  # leak slope a at -inf
    x.grad = None
    hf_gemact.gem(x, 2, 1e-4, 0.0).sum().backward()
    assert (x.grad == 0).all()  # E-GEM: zero output and gradient below 0


# ----------------------------------------------------------------------------- NaN / inf rules

ALL_FAMILIES = [(1, 1.0, 0.0), (2, 1.0, 0.0), (4, 1e-6, 0.0), (2, 1e-4, 0.01)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _extremes(dtype):
    info = torch.finfo(dtype)
    vals = [0.0, info.tiny, -info.tiny, 1e-3, -1e-3, 1.0, -1.0, 15.9, 16.0, 17.0, 300.0, -300.0, info.max, -info.max,
            info.max / 2, -info.max / 2]
    return torch.tensor(vals, dtype=torch.float32).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,eps,a", ALL_FAMILIES)
def test_gem_finite_in_finite_out_every_dtype(dtype, n, eps, a):
    x = _extremes(dtype).requires_grad_()
    y = hf_gemact.gem(x, n, eps, a)
    y.backward(torch.ones_like(y))
    assert y.dtype == dtype and x.grad.dtype == dtype
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    big = x.detach() > 1
    # r^2N overflows (fp16 near r = 16 for N = 2) yet the gate is 1: GEM(x) ~ x and GEM'(x) ~ 1
    torch.testing.assert_close(y[big].float(), x.detach()[big].float(), rtol=2e-2, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,eps,a", ALL_FAMILIES)
def test_gem_nan_and_inf_rules(dtype, n, eps, a):
    x = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=dtype, requires_grad=True)
    y = hf_gemact.gem(x, n, eps, a)
    assert math.isnan(y[0].item())
    assert y[1].item() == float("inf")
    assert y[2].item() == (float("-inf") if a > 0 else 0.0)
    y.backward(torch.ones_like(y))
    assert math.isnan(x.grad[0].item())
    assert x.grad[1].item() == 1.0 and x.grad[2].item() == pytest.approx(a, rel=1e-2)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=16), min_size=1, max_size=32),
    dtype=st.sampled_from(DTYPES),
    family=st.sampled_from(ALL_FAMILIES),
)
def test_fuzz_finite_inputs_give_finite_outputs_and_gradients(values, dtype, family):
    x = torch.tensor(values, dtype=torch.float32).to(dtype)
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x)).requires_grad_()  # bf16 rounding of fp16 max
    y = hf_gemact.gem(x, *family)
    y.backward(torch.ones_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(st.floats(min_value=-1e30, max_value=1e30, allow_nan=False), min_size=2, max_size=24),
    dtype=st.sampled_from(DTYPES),
)
def test_fuzz_velu_finite(values, dtype):
    x = torch.tensor(values, dtype=torch.float32).to(dtype).reshape(2, -1) if len(values) % 2 == 0 else \
        torch.tensor(values, dtype=torch.float32).to(dtype)
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x)).requires_grad_()
    out = hf_gemact.VeLU(alpha=2.0, beta1=1.0, beta2=0.7)(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("module", [hf_gemact.GEM(2), hf_gemact.GEM(2, 1e-4, 0.01), hf_gemact.VeLU()],
                         ids=["gem", "segem", "velu"])
def test_backward_saves_at_most_one_input_sized_tensor(module):
    x = torch.randn(8, 125, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
        if isinstance(module, hf_gemact.VeLU):
            hf_gemact.auxiliary_loss(module)
    assert sum(n for n in saved if n > 1) <= x.numel()
    out.sum().backward()
    assert x.grad is not None


# ----------------------------------------------------------------------------- VeLU


def velu_reference(x, lam, alpha, beta1, beta2, gamma, mu, eps, dim):
    """Straight from the definition, float64, autograd-differentiable (away from |beta2 x| = 1)."""
    x = x.double()
    s = 1 + gamma * torch.tanh(mu / torch.sqrt((x**2).mean(dim, keepdim=True) + eps))
    g = torch.sigmoid(alpha * (torch.atan(beta1 * x) + torch.asin(torch.clamp(beta2 * x, -1, 1))))
    y = x * g * s
    return lam * y, y


VELU_CASES = [
    dict(alpha=0.1, beta1=0.1, beta2=0.1, gamma=0.1, mu=0.9, eps=1e-6, dim=-1),  # the code's defaults
    dict(alpha=2.0, beta1=1.0, beta2=0.7, gamma=0.1, mu=0.9, eps=1e-6, dim=-1),  # the repository's figure
    dict(alpha=1.0, beta1=0.5, beta2=0.3, gamma=0.5, mu=2.0, eps=1e-3, dim=1),  # NCHW
]


@pytest.mark.parametrize("params", VELU_CASES)
def test_velu_matches_independent_reference(params):
    torch.manual_seed(0)
    shape = (2, 5, 3, 3) if params["dim"] == 1 else (4, 7)
    x = (torch.randn(shape, dtype=torch.float64) * 1.3).requires_grad_()
    lam = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    lam_ref = lam.detach().clone().requires_grad_()

    out, mean, std = hf_gemact.velu(x, lam, **params, return_stats=True)
    ref, y_ref = velu_reference(x_ref, lam_ref, **params)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(mean, y_ref.mean())
    torch.testing.assert_close(std, y_ref.std(unbiased=False))

    w = torch.randn(shape, dtype=torch.float64)
    aux = F.wasserstein_aux_loss(mean, std, 0.1)
    aux_ref = 0.1 * (y_ref.mean() ** 2 + (y_ref.std(unbiased=False) - 1) ** 2)
    torch.testing.assert_close(aux, aux_ref)
    ((out * w).sum() + aux).backward()
    ((ref * w).sum() + aux_ref).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lam.grad, lam_ref.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("params", VELU_CASES)
def test_velu_gradcheck_and_gradgradcheck(params):
    shape = (2, 3, 2, 2) if params["dim"] == 1 else (3, 5)
    x = (torch.randn(shape, dtype=torch.float64)).requires_grad_()
    lam = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    fn = lambda t, l: hf_gemact.velu(t, l, **params, return_stats=True)  # noqa: E731
    assert gradcheck(fn, (x, lam))
    assert gradgradcheck(fn, (x, lam))


@pytest.mark.parametrize("n,eps,a", GEM_CASES)
def test_gem_under_torch_func_transforms_matches_the_closed_forms(n, eps, a):
    x = torch.linspace(-4, 4, 41, dtype=torch.float64)
    f = lambda t: hf_gemact.gem(t, n, eps, a)  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(f)(x), gem_reference(x, n, eps, a))
    jac = torch.func.jacrev(f)(x)
    torch.testing.assert_close(jac, torch.diag(gem_reference_derivative(x, n, eps, a)))
    second = torch.func.vmap(torch.func.grad(torch.func.grad(f)))(x)
    torch.testing.assert_close(second, gem_reference_second_derivative(x, n, eps, a))


@pytest.mark.parametrize("params", VELU_CASES)
def test_velu_per_sample_under_vmap_matches_the_reference_sample_by_sample(params):
    torch.manual_seed(0)
    shape = (3, 2, 5, 3, 3) if params["dim"] == 1 else (3, 4, 7)
    x = torch.randn(shape, dtype=torch.float64) * 1.3
    w = torch.randn(shape, dtype=torch.float64)
    lam = torch.tensor(1.7, dtype=torch.float64)

    def loss(t, w_t, velu):  # the output and the auxiliary loss of one sample
        out, mean, std = velu(t, lam, **params, return_stats=True)
        return (out * w_t).sum() + F.wasserstein_aux_loss(mean, std, 0.1)

    def reference(t, lam, return_stats, **params):
        out, y = velu_reference(t, lam, **params)
        return out, y.mean(), y.std(unbiased=False)

    outs = torch.func.vmap(lambda t: hf_gemact.velu(t, lam, **params))(x)
    grads = torch.func.vmap(torch.func.grad(lambda t, w_t: loss(t, w_t, hf_gemact.velu)))(x, w)
    for sample in range(shape[0]):
        t = x[sample].clone().requires_grad_()
        loss_ref = loss(t, w[sample], reference)
        loss_ref.backward()
        torch.testing.assert_close(outs[sample], velu_reference(t.detach(), lam, **params)[0])
        torch.testing.assert_close(grads[sample], t.grad, rtol=1e-10, atol=1e-12)


def test_velu_asin_edge_keeps_gradients_finite():
    # beta2 * x = +-1 exactly, and just inside, where asin' blows up
    x = torch.tensor([[-1 / 0.7, 1 / 0.7, 0.99999 / 0.7, 0.3]], requires_grad=True)
    out = hf_gemact.velu(x, alpha=2.0, beta1=1.0, beta2=0.7)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_velu_auxiliary_term_and_gradients_stay_finite_for_huge_finite_inputs(dtype):
    # Issue 17 item 11: above |x| ~ 4e19, y^2 overflowed float32 in the statistics and every gradient
    # became NaN. The term (squares of statistics near 1e30) is checked against float64.
    torch.manual_seed(5)
    x = torch.randn(4, 64)
    x[0] *= 1e20
    x[1, :8] = torch.tensor([3e37, -3e37, 1e30, -1e25, 5e19, 0.0, 1e-30, 1.0])
    x = x.to(dtype)
    lam = torch.tensor(1.3)
    params = dict(alpha=2.0, beta1=1.0, beta2=0.7, gamma=0.1, mu=0.9, eps=1e-6, dim=-1)
    xr, lr = x.clone().requires_grad_(), lam.clone().requires_grad_()
    out, mean, std = hf_gemact.velu(xr, lr, **params, return_stats=True)
    aux = F.wasserstein_aux_loss(mean, std, 0.1)
    (out.float().sum() * 1e-30 + aux).backward()

    x64, lam64 = x.double().requires_grad_(), lam.double().requires_grad_()
    ref, y_ref = velu_reference(x64, lam64, **params)
    aux_ref = 0.1 * (y_ref.mean() ** 2 + (y_ref.std(unbiased=False) - 1) ** 2)
    (ref.sum() * 1e-30 + aux_ref).backward()
    assert torch.isfinite(aux) and torch.isfinite(xr.grad).all() and torch.isfinite(lr.grad)
    torch.testing.assert_close(aux.double(), aux_ref, rtol=1e-5, atol=0)
    scale = x64.grad.abs().max()
    torch.testing.assert_close(xr.grad.double(), x64.grad, rtol=2e-2, atol=1e-5 * scale)
    # lam's gradient is a sum of grad_out * y: the 1e-30 reaching a bf16 output is rounded to bf16
    torch.testing.assert_close(lr.grad.double(), lam64.grad, rtol=1e-4 if dtype == torch.float32 else 1e-2, atol=0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool], ids=str)
def test_integer_and_bool_tensors_are_refused_not_truncated(dtype):
    # Issue 17 item 11: gem(torch.tensor(2)) returned 1 (integer math). torch's own activations
    # (F.gelu, F.silu) refuse such tensors; so do these, naming the dtype and the fix.
    x = torch.tensor([2, 0, 1]).to(dtype)
    calls = [lambda: hf_gemact.gem(x), lambda: hf_gemact.GEM(2, 1e-4, 0.01)(x), lambda: hf_gemact.velu(x),
             lambda: hf_gemact.VeLU()(x)]
    for call in calls:
        with pytest.raises(TypeError, match=rf"floating-point tensor, got dtype {dtype}.*x\.float\(\)"):
            call()
    torch.testing.assert_close(hf_gemact.gem(x.float()), gem_reference(x.float(), 2, 1.0, 0.0).float())


def test_velu_statistics_are_recomputed_in_eval():
    """No running statistics: train and eval agree, and the scale follows each new input."""
    m = hf_gemact.VeLU()
    x = torch.randn(3, 16)
    assert torch.equal(m.train()(x), m.eval()(x))
    ref, _ = velu_reference(x * 10, 1.0, 0.1, 0.1, 0.1, 0.1, 0.9, 1e-6, -1)
    torch.testing.assert_close(m(x * 10), ref.float())


def test_velu_defaults_are_nearly_linear_and_figure_params_swish_like():
    """PAPERS.md: with the defaults the gate stays within ~[0.42, 0.58]; the figure's parameters
    give a Swish-like curve with a minimum of about -0.09 near x = -0.4 (for s ~ 1)."""
    # the library's default VeLU with the row scale switched off (gamma = 0) is x * gate(x): read the
    # gate off its output, out to |x| = 1e6 where atan and asin both saturate
    x = torch.logspace(-3, 6, 2000, dtype=torch.float64)
    x = torch.cat([-x, x]).reshape(-1, 1)
    with torch.no_grad():
        gate = (hf_gemact.VeLU(gamma=0.0).double()(x) / x).flatten()
    assert 0.42 < gate.min() and gate.max() < 0.58
    assert gate.min() < 0.43 and gate.max() > 0.57  # the bounds are approached, not loose
    xs = torch.linspace(-3, 3, 6001, dtype=torch.float64).reshape(-1, 1)
    y = hf_gemact.velu(xs, alpha=2.0, beta1=1.0, beta2=0.7, gamma=0.0).flatten()
    assert y.min().item() == pytest.approx(-0.09, abs=0.02)
    assert xs.flatten()[y.argmin()].item() == pytest.approx(-0.4, abs=0.15)


def test_auxiliary_loss_sums_last_forward_and_is_zero_without_velu():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), hf_gemact.VeLU(), torch.nn.Linear(8, 8), hf_gemact.VeLU(lambda_ot=0.5))
    assert hf_gemact.auxiliary_loss(torch.nn.Linear(2, 2)).item() == 0.0
    x = torch.randn(4, 8)
    model(x)
    h = model[0](x)
    y1 = model[1](h) / model[1].lam
    y2 = model[3](model[2](model[1](h))) / model[3].lam
    expected = 0.1 * (y1.mean() ** 2 + (y1.std(unbiased=False) - 1) ** 2) + 0.5 * (
        y2.mean() ** 2 + (y2.std(unbiased=False) - 1) ** 2)
    model(x)
    aux = hf_gemact.auxiliary_loss(model)
    torch.testing.assert_close(aux, expected)
    aux.backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs", [dict(n=0), dict(n=-1), dict(n=1.5), dict(n=True), dict(eps=0.0), dict(eps=-1.0),
                                    dict(eps=float("inf")), dict(eps=float("nan")), dict(a=float("inf")), dict(a=-0.1)])
def test_gem_module_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        hf_gemact.GEM(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(eps=0.0), dict(alpha=float("nan")), dict(mu=float("inf")),
                                    dict(lambda_ot=-1.0), dict(dim=0.5)])
def test_velu_module_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        hf_gemact.VeLU(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    torch.manual_seed(0)
    x_cpu = (torch.randn(4096) * 4).to(dtype).requires_grad_()
    x_gpu = x_cpu.detach().cuda().requires_grad_()
    for module in (hf_gemact.GEM(2), hf_gemact.GEM(1, 1e-4, 0.01), hf_gemact.VeLU(alpha=2.0, beta1=1.0, beta2=0.7)):
        y_cpu, y_gpu = module(x_cpu.reshape(64, 64)), module.cuda()(x_gpu.reshape(64, 64))
        (g_cpu,) = torch.autograd.grad(y_cpu.sum(), x_cpu)
        (g_gpu,) = torch.autograd.grad(y_gpu.sum(), x_gpu)
        module.cpu()
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(y_gpu.cpu(), y_cpu, **tol)
        torch.testing.assert_close(g_gpu.cpu(), g_cpu, **tol)
