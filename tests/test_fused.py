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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,eps,a,dtype", GEM_CASES)
def test_gem_fast_path_matches_eager_with_the_same_nan_inf_rules(n, eps, a, dtype, device):
    x = _input(dtype, device)
    g = torch.randn(x.shape, device=device).to(dtype)
    fn = lambda t: hf_gemact.gem(t, n, eps, a)  # noqa: E731
    y_fast, gx_fast = _run(fn, x, g, True)
    assert f"gem_fwd{(n, eps, a)}[{str(dtype)[6:]},{device}]" in fused.compile_times(), "fast path not taken"
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_velu_fast_path_matches_eager(dtype, device):
    x = _input(dtype, device, special=False)
    lam = torch.tensor(1.3, device=device, requires_grad=True)
    g = torch.randn(x.shape, device=device).to(dtype)

    def run(fast):
        fused.set_fast_path(fast)
        try:
            xr, lr = x.detach().clone().requires_grad_(), lam.detach().clone().requires_grad_()
            out, mean, std = F.velu(xr, lr, return_stats=True)
            ((out.float() * g.float()).sum() + 0.3 * mean + 0.7 * std).backward()
            return out.detach(), mean.detach(), std.detach(), xr.grad, lr.grad
        finally:
            fused.set_fast_path(True)

    fast, eager = run(True), run(False)
    assert any(k.startswith("velu_bwd") and f",{device}," in k for k in fused.compile_times())
    tol = TOL[dtype]
    for a, b in zip(fast, eager):
        torch.testing.assert_close(a, b, rtol=max(tol["rtol"], 1e-4), atol=max(tol["atol"], 1e-4))


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
