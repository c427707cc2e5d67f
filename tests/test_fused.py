"""The compiled fast path (hf_gemact.fused) against the eager closed form, and its switches.

Compiling is slow on CPU, so few kernels are compiled (they are reused across tests) and the
inputs are just above the fast path's size threshold. No timing assertions here: see
benchmarks/bench_activations.py.
"""

import os
import subprocess
import sys

import pytest
import torch

import hf_gemact
from hf_gemact import functional as F
from hf_gemact import fused

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
N = 8192  # above the default threshold (4096)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
       torch.float16: dict(rtol=1e-3, atol=1e-6)}


@pytest.fixture(autouse=True)
def _fast_path_on():
    fused.set_fast_path(True)
    yield
    fused.set_fast_path(True)


def _input(dtype, device, special=True):
    torch.manual_seed(0)
    x = torch.randn(N, device=device) * 3
    x[:64] = torch.logspace(-30, 30, 64) if dtype == torch.float32 else torch.logspace(-8, 4, 64)
    x[64:128] = -x[:64]
    x = x.to(dtype)
    if special:
        info = torch.finfo(dtype)
        vals = [0.0, -0.0, float("nan"), float("inf"), float("-inf"), info.max, -info.max, info.tiny, -info.tiny]
        x[128:128 + len(vals)] = torch.tensor(vals, dtype=dtype)
    return x.reshape(8, N // 8)


def _run(fn, x, g, fast):
    fused.set_fast_path(fast)
    try:
        xr = x.detach().clone().requires_grad_()
        y = fn(xr)
        y.backward(g)
        return y.detach(), xr.grad
    finally:
        fused.set_fast_path(True)


GEM_CASES = [  # (n, eps, a, dtype): every dtype for GEM, one each for E-GEM and SE-GEM
    (2, 1.0, 0.0, torch.float32), (2, 1.0, 0.0, torch.bfloat16), (2, 1.0, 0.0, torch.float16),
    (2, 1e-4, 0.0, torch.bfloat16), (2, 1e-4, 0.01, torch.float32), (1, 1e-4, 0.05, torch.float16),
]


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a kernel falling back to eager fails the test
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,eps,a,dtype", GEM_CASES)
def test_gem_fast_path_matches_eager_with_the_same_nan_inf_rules(n, eps, a, dtype, device):
    x = _input(dtype, device)
    g = torch.randn(x.shape, device=device).to(dtype)
    fn = lambda t: hf_gemact.gem(t, n, eps, a)  # noqa: E731
    y_fast, gx_fast = _run(fn, x, g, True)
    assert fused._describe(fused._key("gem_fwd", (n, eps, a), x)) in fused.compile_times(), "fast path not taken"
    y_eager, gx_eager = _run(fn, x, g, False)
    assert y_fast.dtype == gx_fast.dtype == dtype
    torch.testing.assert_close(y_fast, y_eager, equal_nan=True, **TOL[dtype])
    torch.testing.assert_close(gx_fast, gx_eager, equal_nan=True, **TOL[dtype])

    flat_x, flat_y, flat_g = x.reshape(-1), y_fast.reshape(-1), gx_fast.reshape(-1)
    finite = torch.isfinite(flat_x)
    assert torch.isfinite(flat_y[finite]).all() and torch.isfinite(flat_g[finite]).all()
    assert torch.isnan(flat_y[torch.isnan(flat_x)]).all()
    assert (flat_y[flat_x == float("inf")] == float("inf")).all()
    neg_inf = flat_y[flat_x == float("-inf")]
    assert (neg_inf == (float("-inf") if a else 0.0)).all()


def _run_velu(x, lam, g, fast, **params):
    """Output, statistics and the gradients of x and lam (loss reaches both statistics)."""
    fused.set_fast_path(fast)
    try:
        xr, lr = x.detach().clone().requires_grad_(), lam.detach().clone().requires_grad_()
        out, mean, std = F.velu(xr, lr, **params, return_stats=True)
        ((out.float() * g.float()).sum() + 0.3 * mean + 0.7 * std).backward()
        return out.detach(), mean.detach(), std.detach(), xr.grad, lr.grad
    finally:
        fused.set_fast_path(True)


VELU_FAST_CASES = [  # (params, dtype, shape): defaults in both dtypes, the repo figure's gate, NCHW
    (dict(), torch.float32, (8, N // 8)),
    (dict(), torch.bfloat16, (8, N // 8)),
    (dict(alpha=2.0, beta1=1.0, beta2=0.7), torch.float32, (8, N // 8)),  # outside sigmoid_small's range
    (dict(alpha=1.0, beta1=0.5, beta2=0.3, gamma=0.5, mu=2.0, eps=1e-3, dim=1), torch.float32, (4, 8, 16, 16)),
]


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params,dtype,shape", VELU_FAST_CASES)
def test_velu_fast_path_matches_eager(params, dtype, shape, device):
    x = _input(dtype, device, special=False).reshape(shape)
    lam = torch.tensor(1.3, device=device, requires_grad=True)
    g = torch.randn(x.shape, device=device).to(dtype)

    fast, eager = _run_velu(x, lam, g, True, **params), _run_velu(x, lam, g, False, **params)
    assert any(k.startswith("velu_bwd") and f",{x.device}," in k for k in fused.compile_times())
    tol = TOL[dtype]
    for a, b in zip(fast, eager):
        torch.testing.assert_close(a, b, rtol=max(tol["rtol"], 1e-4), atol=max(tol["atol"], 1e-4))


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a kernel falling back to eager fails the test
@pytest.mark.parametrize("dim,shapes", [
    # The first shape is the one traced: sizes that coincide, or are 1, must not be baked in.
    (-1, [(1024, 1024), (8, 1024), (1, 8192), (4096, 2), (2, 3, 1024)]),
    (1, [(1, 16, 16, 16), (4, 8, 16, 16), (2, 3, 32, 32), (4, 4, 32, 8)]),
])
def test_one_velu_kernel_serves_every_shape(dim, shapes):
    # The kernels are traced once with symbolic sizes and then called without guards: every later
    # shape, including ones whose sizes coincide or are 1, must still give the eager result.
    params = dict(alpha=0.3, beta1=0.2, beta2=0.1, dim=dim)  # parameters no other test compiles
    lam = torch.tensor(1.1)
    for shape in shapes:
        torch.manual_seed(len(shape) + shape[0])
        x = torch.randn(shape) * 2
        g = torch.randn(shape)
        fast, eager = _run_velu(x, lam, g, True, **params), _run_velu(x, lam, g, False, **params)
        for a, b in zip(fast, eager):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert any(k.startswith("velu_bwd(0.3, 0.2") for k in fused.compile_times()), "fast path not taken"
    if fused._standalone_compile() is not None:  # this torch takes the route without Dynamo
        velu_kernels = [fn for key, fn in fused._kernels.items()
                        if key[0].startswith("velu") and key[1][:2] == (0.3, 0.2)]
        assert velu_kernels and all(isinstance(fn, fused._GraphKernel) for fn in velu_kernels)



@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_gem_kernel_serves_every_size_and_layout():
    y = hf_gemact.gem(torch.randn(N), 3, 1.0, 0.5)  # compiles for this size
    for x in (torch.randn(4097), torch.randn(300, 200), torch.randn(200, 300).t(), torch.randn(64, 2, 64)[:, 0]):
        torch.testing.assert_close(hf_gemact.gem(x, 3, 1.0, 0.5), F.gem_forward(x, 3, 1.0, 0.5))
    key = fused._key("gem_fwd", (3, 1.0, 0.5), y)
    assert fused.fast_path_info()["kernels"][fused._describe(key)] == "ok" and y.shape == (N,)
    if fused._standalone_compile() is not None:  # this torch takes the route without Dynamo
        assert isinstance(fused._kernels[key], fused._GraphKernel)


def test_cpu_kernels_are_compiled_for_the_thread_count_they_run_with():
    # Inductor's C++ code compiled for one thread has no parallel region: after set_num_threads(2)
    # it would stay serial. torch.compile guards on the thread count; the kernel key holds it.
    threads = torch.get_num_threads()
    x = torch.randn(N)
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.testing.assert_close(hf_gemact.gem(x, 6, 1.0, 0.0), F.gem_forward(x, 6, 1.0, 0.0))
    finally:
        torch.set_num_threads(threads)
    kernels = set(fused.fast_path_info()["kernels"])
    assert {f"gem_fwd(6, 1.0, 0.0)[float32,cpu,threads={n}]" for n in (1, 2)} <= kernels


def test_kernel_guards_made_while_compiling_are_checked_on_every_call():
    # Inductor can make guards of its own (32-bit indexing on CUDA); outside them the call runs eager.
    def branchy(x):
        return x * 2 if x.shape[0] > 5000 else x * 3

    kernel = fused._GraphKernel(branchy, (torch.randn(N),), {})
    torch.testing.assert_close(kernel(torch.ones(6000)), torch.full((6000,), 2.0))
    with pytest.raises(fused._NotCovered):
        kernel(torch.ones(4100))

    # Through the dispatcher, such a call runs eager (None) and is counted where users can see it.
    key = ("branchy", (), torch.float32, torch.device("cpu"))
    counted = "ok; calls outside its guards that ran eager: 1"
    fused._kernels[key] = kernel
    try:
        assert fused._call(key, None, None, None, torch.ones(4100)) is None
        assert fused.fast_path_info()["kernels"]["branchy()[float32,cpu]"] == counted
        assert fused._call(key, None, None, None, torch.ones(6000)) is not None
        assert fused.fast_path_info()["kernels"]["branchy()[float32,cpu]"] == counted
    finally:
        fused._kernels.pop(key)
        fused._uncovered_calls.pop(key)


def test_without_standalone_compile_the_kernels_go_through_torch_compile(monkeypatch):
    # torch < 2.8 has no torch._inductor.standalone_compile: the same kernels then run under torch.compile.
    monkeypatch.setattr(fused, "_standalone_compile", lambda: None)
    x = _input(torch.float32, "cpu")
    g = torch.randn(x.shape)
    fn = lambda t: hf_gemact.gem(t, 5, 1.0, 0.0)  # noqa: E731
    (y_fast, gx_fast), (y_eager, gx_eager) = _run(fn, x, g, True), _run(fn, x, g, False)
    kernel = fused._kernels[fused._key("gem_fwd", (5, 1.0, 0.0), x)]
    assert kernel is not None and not isinstance(kernel, fused._GraphKernel)
    torch.testing.assert_close(y_fast, y_eager, equal_nan=True, **TOL[torch.float32])
    torch.testing.assert_close(gx_fast, gx_eager, equal_nan=True, **TOL[torch.float32])


def test_velu_fast_path_keeps_the_eager_nan_inf_rules():
    torch.manual_seed(0)
    x = torch.randn(16, 1024) * 2
    x[3, 5], x[7, 9], x[9, 1] = float("nan"), float("inf"), float("-inf")
    x[11] = 0.0  # an all-zero row: k = 1/sqrt(eps)
    x[13] *= 1e20

    def run(fast):
        fused.set_fast_path(fast)
        try:
            xr = x.clone().requires_grad_()
            out, mean, std = F.velu(xr, return_stats=True)
            out.backward(torch.ones_like(out))
            return out.detach(), xr.grad
        finally:
            fused.set_fast_path(True)

    (out_f, grad_f), (out_e, grad_e) = run(True), run(False)
    for fast, eager in ((out_f, out_e), (grad_f, grad_e)):
        assert torch.equal(torch.isnan(fast), torch.isnan(eager)) and torch.equal(torch.isinf(fast), torch.isinf(eager))
        torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-4, equal_nan=True)
    assert torch.isfinite(out_f[11]).all() and (grad_f[11] != 0).all()


def test_velu_cuda_kernel_policy_matches_eager_when_run_on_cpu(monkeypatch):
    # The CUDA policy (exact math, one kernel, gate recomputed in backward) is code CI cannot reach
    # on a GPU; run the very same kernels through Inductor's CPU backend instead.
    cpu_params = fused._velu_params
    monkeypatch.setattr(fused, "_velu_params", lambda *a: {**cpu_params(*a), "approx": False, "save_gate": False})
    x = _input(torch.float32, "cpu", special=False)
    g = torch.randn(x.shape)

    lam = torch.tensor(0.9)
    fast, eager = _run_velu(x, lam, g, True), _run_velu(x, lam, g, False)
    assert any(k.startswith("velu_fwd") and "False, False)" in k for k in fused.compile_times())
    for a, b in zip(fast, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_velu_fast_path_on_cpu_saves_the_input_and_the_gate():
    x = torch.randn(16, 1024, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = hf_gemact.VeLU()(x)
    assert any(k.startswith("velu_fwd") and ",cpu," in k for k in fused.compile_times())
    big = sorted(n for n in saved if n > 16)
    assert big == [x.numel(), x.numel()]  # x and g; the rest is per-row (k, t) and scalars
    out.sum().backward()
    with torch.no_grad():
        assert fused.velu_forward(x, torch.ones(()), 0.1, 0.1, 0.1, 0.1, 0.9, 1e-6, -1, need_grad=False)[3] is None


def test_polynomial_atan_asin_sigmoid_match_float64_to_float32_precision():
    t = torch.cat([torch.linspace(-1e4, 1e4, 200_001), torch.randn(100_000) * 3, torch.logspace(-30, 30, 601)])
    c = torch.cat([torch.linspace(-1, 1, 200_001), torch.tensor([0.5, -0.5, 0.4999999, 0.5000001])])
    v = torch.linspace(-0.35, 0.35, 100_001)
    for fn, ref, arg, bound in [(F.atan_approx, torch.atan, t, 2.5e-7), (F.asin_approx, torch.asin, c, 4e-7),
                                (F.sigmoid_small, torch.sigmoid, v, 2.5e-7)]:
        exact = ref(arg.double())
        rel = ((fn(arg).double() - exact).abs() / exact.abs().clamp_min(1e-300))[exact != 0]
        assert rel.max().item() < bound, fn.__name__
    limits = torch.tensor([float("inf"), -float("inf"), 0.0, float("nan")])
    torch.testing.assert_close(F.atan_approx(limits), torch.atan(limits), rtol=0, atol=1.2e-7, equal_nan=True)
    edges = torch.tensor([1.0, -1.0, 0.0, float("nan")])
    torch.testing.assert_close(F.asin_approx(edges), torch.asin(edges), rtol=0, atol=1.2e-7, equal_nan=True)


@pytest.mark.parametrize("alpha,beta1,beta2", [(0.1, 0.1, 0.1), (2.0, 1.0, 0.7), (-0.05, 3.0, 0.01)])
def test_polynomial_gate_matches_the_exact_gate(alpha, beta1, beta2):
    infs = torch.tensor([float("inf"), -float("inf")])
    x = torch.cat([torch.randn(100_000) * 5, torch.linspace(-50, 50, 10_001), infs])
    exact = F.velu_gate(x.double(), alpha, beta1, beta2)
    rel = lambda g: ((g.double() - exact).abs() / exact).max().item()  # noqa: E731
    # alpha amplifies any float32 rounding of the sigmoid's argument: compare with torch's float32 math
    torch_float32 = rel(F.velu_gate(x, alpha, beta1, beta2))
    assert rel(F.velu_gate(x, alpha, beta1, beta2, approx=True)) <= 1.5 * torch_float32 + 1e-7


def test_switch_off_by_api_uses_eager_and_compiles_nothing():
    fused.set_fast_path(False)
    assert not fused.fast_path_enabled()
    x = torch.randn(N).requires_grad_()
    before = set(fused.compile_times())
    hf_gemact.gem(x, 3, 0.5, 0.0).sum().backward()  # parameters no other test compiles
    assert set(fused.compile_times()) == before
    assert fused.gem_forward(x.detach(), 3, 0.5, 0.0) is None


def test_switch_off_by_environment():
    code = ("import torch, hf_gemact; from hf_gemact import fused; "
            "x = torch.randn(8192, requires_grad=True); hf_gemact.gem(x).sum().backward(); "
            "print(fused.fast_path_enabled(), len(fused.compile_times()))")
    env = dict(os.environ, HF_GEMACT_COMPILE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "0"]


def test_small_tensors_stay_eager():
    x = torch.randn(16)
    assert fused.gem_forward(x, 2, 1.0, 0.0) is None


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(fused, "_make_kernel", broken)
    x = torch.randn(N, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="unavailable"):
        y = hf_gemact.gem(x, 4, 2.0, 0.0)
    torch.testing.assert_close(y, F.gem_forward(x.detach(), 4, 2.0, 0.0))
    y.sum().backward()  # backward kernel fails too (one warning), eager takes over
    torch.testing.assert_close(x.grad, F.gem_derivative(x.detach(), 4, 2.0, 0.0))
    assert "failed" in str(fused.fast_path_info()["kernels"])


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a kernel handed a wrapped tensor would fail to compile
def test_torch_func_transforms_over_large_samples_run_eager_and_leave_the_kernels_working():
    # Under vmap the activation sees functorch's wrapped tensors, which have no storage of their
    # own: the fast path must step aside for them (per-sample sizes here are above min_numel).
    torch.manual_seed(0)
    x = torch.randn(3, 4, N // 4)
    gem = lambda t: hf_gemact.gem(t, 2, 0.5, 0.0)  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(gem)(x), F.gem_forward(x, 2, 0.5, 0.0))
    per_sample = torch.func.vmap(torch.func.grad(lambda t: hf_gemact.velu(t).square().sum()))(x)
    for sample, grad in zip(x, per_sample):
        t = sample.clone().requires_grad_()
        hf_gemact.velu(t).square().sum().backward()
        torch.testing.assert_close(grad, t.grad, rtol=1e-5, atol=1e-6)
    v = x[0].reshape(-1)[:N // 2]  # jacrev at the threshold's size: forward on the fast path, backward vmapped
    torch.testing.assert_close(torch.func.jacrev(gem)(v).diagonal(), F.gem_derivative(v, 2, 0.5, 0.0))
    kernels = fused.fast_path_info()["kernels"]
    used = {state for kernel, state in kernels.items() if kernel.startswith(("gem_fwd(2, 0.5,", "velu"))}
    assert used == {"ok"}
    # Outside torch.func the twin in forward(ctx, ...) style runs: Function.apply then skips binding
    # a setup_context-style forward's arguments, a per-call cost about a tenth of GEM's at 64K.
    xr = x.requires_grad_()
    assert type(gem(xr).grad_fn).__name__ == "_GEMFunctionCombinedBackward"
    assert type(hf_gemact.velu(xr).grad_fn).__name__ == "_VeLUFunctionCombinedBackward"


def test_double_backward_uses_the_differentiable_eager_backward():
    x = _input(torch.float32, "cpu", special=False).reshape(-1).requires_grad_()
    y = hf_gemact.gem(x, 2, 1.0, 0.0)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    assert g.requires_grad
    (gg,) = torch.autograd.grad(g.sum(), x)
    with torch.no_grad():  # numerical second derivative from the first derivative
        h = 1e-3
        xd = x.detach().double()
        num = (F.gem_derivative(xd + h, 2, 1.0, 0.0) - F.gem_derivative(xd - h, 2, 1.0, 0.0)) / (2 * h)
    ok = (xd.abs() < 1e3) & (xd.abs() > 1e-2)  # second order in fp32 is only checked in a sane range
    torch.testing.assert_close(gg.double()[ok], num[ok], rtol=1e-3, atol=1e-3)


def test_gradgradcheck_still_passes():
    from torch.autograd import gradgradcheck

    x = (torch.randn(64, dtype=torch.float64) * 2).requires_grad_()
    assert gradgradcheck(lambda t: hf_gemact.gem(t, 2, 1e-4, 0.01), (x,))


def test_whole_model_compiles_fullgraph_through_the_activation():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=64, activation_function="gem_n2",
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 64, (4, 64))  # MLP activation: 4*64*128 = 32768 elements (fast path in eager)
    loss_fn = lambda m: m(input_ids=ids).logits.float().square().mean()  # noqa: E731 (HF's loss logs: graph break)
    loss_eager = loss_fn(model)
    loss_eager.backward()
    grads_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # Dynamo + AOT autograd tracing
    loss = loss_fn(compiled)
    loss.backward()
    torch.testing.assert_close(loss, loss_eager, rtol=1e-5, atol=1e-6)
    for p, ge in zip(model.parameters(), grads_eager):
        torch.testing.assert_close(p.grad, ge, rtol=1e-3, atol=5e-5)  # fp32 reductions reorder
