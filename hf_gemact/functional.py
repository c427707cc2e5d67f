"""The activations as autograd functions: `gem`, `velu` (and `wasserstein_aux_loss`), each asking the
compiled fast path (`fused.py`) first and falling back to the closed forms of `formulas.py`, whose
public names are importable from here too. `modules.py` wraps these in nn.Modules and `registry.py`
owns the names.
"""

from __future__ import annotations

import torch

from . import fused as _fused
from .formulas import (GEM_DEFAULTS, VELU_DEFAULTS, _require_floating, _scalar_lam, asin_approx,
                       atan_approx, exp_approx, gem_derivative, gem_forward, gem_gate, rsqrt_approx,
                       sigmoid_approx, sigmoid_small, tanh_approx, tree_sum, velu_backward, velu_forward,
                       velu_gate, velu_row_scale, wasserstein_aux_loss)


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


def gem(x: torch.Tensor, n: int = GEM_DEFAULTS["n"], eps: float = GEM_DEFAULTS["eps"],
        a: float = GEM_DEFAULTS["a"]) -> torch.Tensor:
    """GEM / E-GEM / SE-GEM of a floating-point tensor. Parameters are validated by the modules and
    the registry; an integer or bool tensor raises TypeError."""
    _require_floating(x, "gem")
    return _apply(_GEMFunction, x, n, eps, a)


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
    alpha: float = VELU_DEFAULTS["alpha"],
    beta1: float = VELU_DEFAULTS["beta1"],
    beta2: float = VELU_DEFAULTS["beta2"],
    gamma: float = VELU_DEFAULTS["gamma"],
    mu: float = VELU_DEFAULTS["mu"],
    eps: float = VELU_DEFAULTS["eps"],
    dim: int = VELU_DEFAULTS["dim"],
    return_stats: bool = False,
):
    """VeLU as the official code computes it: lam * x * sigmoid(alpha (atan(b1 x) + asin(b2 x))) * s.

    x is a floating-point tensor (integer and bool tensors raise TypeError); lam one value (None: 1).
    With return_stats, also returns mean(y) and std(y) (biased, float64) of y = output / lam,
    differentiable, from which `wasserstein_aux_loss` builds the auxiliary term.
    """
    _require_floating(x, "velu")
    lam = _scalar_lam(lam, x)
    out, mean, std, *_ = _apply(_VeLUFunction, x, lam, alpha, beta1, beta2, gamma, mu, eps, dim)
    return (out, mean, std) if return_stats else out


__all__ = ["asin_approx", "atan_approx", "exp_approx", "gem", "gem_derivative", "gem_forward", "gem_gate", "rsqrt_approx", "sigmoid_approx", "sigmoid_small", "tanh_approx", "tree_sum", "velu", "velu_backward", "velu_forward", "velu_gate", "velu_row_scale", "wasserstein_aux_loss"]
