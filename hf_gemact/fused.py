"""A fused fast path for the activations' forward and backward, compiled by TorchInductor.

The GEM family is purely rational, so one fused elementwise pass (Inductor: C++/OpenMP on CPU,
Triton on CUDA) reads x once and writes y once; the backward reads x and grad_out once and writes
grad_x once, recomputing the gate instead of saving anything but x. Eager PyTorch instead runs
about ten separate kernels, each a full pass over memory.

VeLU is compute-bound on CPU (atan, asin, sigmoid per element; polynomials in `formulas`, all
inline), so on CPU the gate is saved for backward (x and g: two input-sized tensors, instead of
evaluating the gate twice more), and the per-row scale has a kernel of its own so the main kernel
is one loop per row. On CUDA (memory-bound) one kernel does it all and backward recomputes the gate.

How it is wired: `functional._GEMFunction` / `_VeLUFunction` ask this module first
(`gem_forward`, `gem_backward`, `velu_forward`, `velu_backward` here); each returns None when the
fast path does not apply, and the caller then runs its eager closed form. The compiled kernels
trace the very same formulas from `formulas.py`, which use only operations that round alike on
every backend, and are built without FMA contraction (and, on CUDA, with Inductor's eager-numerics
settings: IEEE division, casts kept, no FP fusion). So an element gets bitwise the same output and
gradient from either route, whatever the size, layout or batch it comes in (checked on CPU by the
tests; CUDA has not been run), and the NaN/inf rules are the same. `record_routes()` shows which
route served each call. The compiled-kernel machinery is in `compiled_kernel.py`, the
route record in `routes.py`.

The fast path is skipped (None) when:
  * it is switched off: environment `HF_GEMACT_COMPILE=0` at import, or `set_fast_path(False)`;
  * Dynamo is already tracing (`torch.compile(model)`): the eager math is traced into the model's
    own graph instead, so whole-model compilation has no graph break;
  * grad mode is on inside backward (create_graph=True, double backward): the eager backward is
    differentiable, a compiled kernel is not;
  * the dtype is not float32/float16/bfloat16 (float64 stays exact eager), the device is not CPU or
    CUDA, or the tensor is a subclass (fake, functional, DTensor ...) or functorch's wrapper
    (torch.func.vmap, jacrev: the eager ops then run under the transform);
  * the tensor is smaller than `min_numel` (default: see `_DEFAULT_MIN_NUMEL`): a compiled call
    is still faster than the eager ops there, but the microseconds it saves are not worth seconds
    of compiling, so tiny models (tests, toy runs) never compile; under
    torch.compile (torch < 2.8) the call's own overhead also matches the eager ops about here;
  * VeLU only: lam is not a 0-d tensor (`functional.velu` makes it one), or the reduced dim has a
    single element;
  * the arguments are outside a guard Inductor made while compiling (e.g. 32-bit indexing on
    CUDA): that call alone runs eager, and `fast_path_info` counts such calls;
  * compiling failed once for that kernel (no C++ compiler, no Triton, an Inductor error): a
    warning is given once and that kernel stays eager from then on.

Every kernel is compiled once per (activation parameters, dtype, device, layout, VeLU's row
length, and on CPU the thread count) for all other sizes: traced with symbolic sizes (make_fx) and compiled by
torch._inductor.standalone_compile, then called directly, without the guard checks and wrappers that
torch.compile runs on every call (a fixed cost of the order of the whole GEM kernel at 64K elements
on CPU). Where torch has no standalone_compile (torch < 2.8) the same kernel functions go through
torch.compile(dynamic=True). VeLU's kernels see x as a contiguous (outer, D) or (outer, D, inner)
view, so that any shape and `dim` meet one of two layouts. Each kernel is generated as its own small
function with the parameters written in as literals: they are constants in the graph (N becomes an
unrolled product, not a generic pow), and under torch.compile each kernel keeps its own cache.
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings

import torch

from .compiled_kernel import _compile_options, _GraphKernel, _NotCovered
from .routes import Route, _note, _recorders, record_routes

__all__ = ["set_fast_path", "fast_path_enabled", "fast_path_info", "compile_times", "clear_cache", "record_routes",
           "Route"]

_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not subclasses: fake, functional, DTensor, ...
_DEFAULT_MIN_NUMEL = {"cpu": 4096, "cuda": 4096}


def _env_enabled() -> bool:
    return os.environ.get("HF_GEMACT_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")


_state = {"enabled": _env_enabled(), "min_numel": dict(_DEFAULT_MIN_NUMEL)}
_kernels: dict = {}  # key -> compiled callable, or None where compiling failed
_compile_times: dict = {}  # key -> seconds spent in the first call (tracing + compiling)
_uncovered_calls: dict = {}  # key -> calls that fell outside the kernel's guards and ran eager
_lock = threading.Lock()


def set_fast_path(enabled: bool = True, *, min_numel: int | None = None) -> None:
    """Switch the compiled fast path on or off for the whole process (off = eager closed form).

    `min_numel` sets the size below which eager is used (for CPU and CUDA alike). The environment
    variable HF_GEMACT_COMPILE=0 switches it off at import time.
    """
    _state["enabled"] = bool(enabled)
    if min_numel is not None:
        if int(min_numel) < 2:
            raise ValueError("min_numel must be >= 2 (sizes 0 and 1 would specialise the kernels)")
        _state["min_numel"] = {k: int(min_numel) for k in _DEFAULT_MIN_NUMEL}


def fast_path_enabled() -> bool:
    return _state["enabled"]


def fast_path_info() -> dict:
    """The switch, thresholds, compiled kernels (which failed, which ran some calls eager), for logs."""
    return {
        "enabled": _state["enabled"],
        "min_numel": dict(_state["min_numel"]),
        "kernels": {_describe(k): _kernel_state(k, v) for k, v in _kernels.items()},
    }


def _kernel_state(key, kernel) -> str:
    if kernel is None:
        return "failed (eager)"
    uncovered = _uncovered_calls.get(key)
    return f"ok; calls outside its guards that ran eager: {uncovered}" if uncovered else "ok"


def compile_times() -> dict:
    """Seconds each kernel's first call took (tracing plus Inductor compiling)."""
    return {_describe(k): t for k, t in _compile_times.items()}


def clear_cache() -> None:
    """Forget compiled kernels (and failures); the next call compiles again."""
    with _lock:
        _kernels.clear()
        _compile_times.clear()
        _uncovered_calls.clear()


def _eager(activation: str, pass_: str, x: torch.Tensor, reason: str):
    """Record an eager call (if recording) and return None, the callers' "run eager" answer."""
    if _recorders:
        _note(activation, pass_, x, "eager", reason)
    return None


def _describe(key) -> str:
    kind, params, dtype, device = key[:4]
    extra = "".join(f",{part}" for part in key[4:])
    return f"{kind}{params}[{str(dtype).replace('torch.', '')},{device}{extra}]"


# ----------------------------------------------------------------------------- applicability


def _plain(t: torch.Tensor) -> bool:
    """A tensor with its own storage: not a subclass, nor functorch's wrapper (vmap, grad, jvp)."""
    return type(t) in _PLAIN and not torch._C._functorch.is_functorch_wrapped_tensor(t)


def _eager_reason(x: torch.Tensor, backward: bool = False) -> str | None:
    """Why x's call runs eager, or None where the fast path applies. Callers test is_compiling first."""
    if not _state["enabled"]:
        return "fast path switched off"
    if backward and torch.is_grad_enabled():
        return "double backward (create_graph): the eager backward is differentiable"
    if not _plain(x):
        return "tensor subclass or torch.func transform"
    if x.dtype not in _FAST_DTYPES:
        return f"dtype {str(x.dtype).replace('torch.', '')} is not compiled"
    limit = _state["min_numel"].get(x.device.type)
    if limit is None:
        return f"device {x.device.type} is not compiled"
    if x.numel() < limit:
        return f"{x.numel()} elements, below min_numel {limit}"
    return None


# ----------------------------------------------------------------------------- kernel factory

# Each kernel is a tiny function whose source names the parameters as literals (repr of an int or
# float round-trips exactly), compiled into its own code object.
_GEM_FWD_SRC = """
def gem_fwd_kernel(x):
    return F.gem_forward(x, {n!r}, {eps!r}, {a!r})
"""
_GEM_BWD_SRC = """
def gem_bwd_kernel(x, grad_out):
    return (grad_out * F.gem_derivative(x, {n!r}, {eps!r}, {a!r})).to(x.dtype)
"""
_VELU_SCALE_SRC = """
def velu_scale_kernel(x):
    return F.velu_row_scale(x, {mu!r}, {eps!r}, {dim!r})
"""
_VELU_FWD_SRC = """
def velu_fwd_kernel(x, lam, k, t):
    return F.velu_forward(x, lam, {alpha!r}, {beta1!r}, {beta2!r}, {gamma!r}, {mu!r}, {eps!r}, {dim!r},
                          save_gate={save_gate!r}, row_scale=None if k is None else (k, t))
"""
_VELU_BWD_SRC = """
def velu_bwd_kernel(x, lam, grad_out, grad_mean, grad_std, mean, std, g, k, t):
    return F.velu_backward(x, lam, grad_out, grad_mean, grad_std, mean, std,
                           {alpha!r}, {beta1!r}, {beta2!r}, {gamma!r}, {mu!r}, {eps!r}, {dim!r},
                           g=g, row_scale=None if k is None else (k, t), lam_needs_grad={lam_needs_grad!r})
"""


def _make_kernel(src: str, name: str, params: dict, device_type: str, args: tuple, keep_dims: tuple = ()):
    from . import formulas

    namespace = {"F": formulas}
    # The code object is named after this file: Dynamo treats a "<string>"-like file as one to skip
    # and wraps such a function in a shared trampoline, whose one cache (recompile limit 8) all
    # kernels would then share (seen with torch 2.11). A real file keeps one cache per kernel.
    code = compile(src.format(**params), __file__, "exec")
    exec(code, namespace)
    fn = namespace[name]
    fn.__qualname__ = f"{name}_{abs(hash((src, tuple(params.items())))):x}"
    options = _compile_options(device_type)
    if _standalone_compile() is not None:
        try:
            return _GraphKernel(fn, args, options, keep_dims, _standalone_compile())
        except Exception:  # a torch whose standalone_compile does not take this graph: torch.compile can
            pass
    return torch.compile(fn, dynamic=True, fullgraph=True, options=options)


def _standalone_compile():
    import torch._inductor

    return getattr(torch._inductor, "standalone_compile", None)  # torch >= 2.8


def _key(kind: str, params: tuple, x: torch.Tensor, *layout) -> tuple:
    """A kernel's cache key: (kind, params, dtype, device, *layout[, threads]).

    The device keeps its index, because the compiled code allocates its outputs on the device it was
    compiled for (a model split over two GPUs). On CPU the key holds the thread count, as
    torch.compile's guards do: Inductor's C++ code is specialised to it (compiled for one thread it
    has no parallel region at all, and would stay serial after torch.set_num_threads(2)).
    """
    key = (kind, params, x.dtype, x.device, *layout)
    return (*key, f"threads={torch.get_num_threads()}") if x.device.type == "cpu" else key


def _failed(key, err: Exception):
    _kernels[key] = None
    first = (str(err).strip().splitlines() or [""])[0][:200]
    warnings.warn(
        f"hf_gemact: the compiled fast path for {_describe(key)} is unavailable ({type(err).__name__}: "
        f"{first}); using the eager implementation. HF_GEMACT_COMPILE=0 skips the attempt.",
        RuntimeWarning,
        stacklevel=5,
    )
    return None


_FAILED = "compiling failed (see the warning); this kernel runs eager"


def _call(key, src, name, params, *args, keep_dims: tuple = ()):
    """Run the compiled kernel for `key` (see _key), compiling it on first use.

    Returns (output, None), or (None, why) where the kernel cannot be had or does not cover the call.
    """
    fn = _kernels.get(key, False)
    if fn is None:
        return None, _FAILED
    started = None
    if fn is False:
        started = time.perf_counter()
        fn = _compile(key, src, name, params, args, keep_dims)
        if fn is None:
            return None, _FAILED
    try:
        out = fn(*args)
    except _NotCovered:
        _uncovered_calls[key] = _uncovered_calls.get(key, 0) + 1
        return None, "outside the guards of kernel " + _describe(key)
    except Exception as err:  # compiling lazily (torch.compile) failed, or an Inductor error: stay eager
        return _failed(key, err), _FAILED
    if started is not None:
        _compile_times[key] = time.perf_counter() - started
    return out, None


def _compile(key, src, name, params, args, keep_dims=()):
    with _lock:
        if key not in _kernels:
            try:
                _kernels[key] = _make_kernel(src, name, params, key[3].type, args, keep_dims)
            except Exception as err:  # no compiler, unsupported platform, Inductor bug: stay eager
                return _failed(key, err)
        return _kernels[key]


# ----------------------------------------------------------------------------- GEM family


def _served(activation: str, pass_: str, x: torch.Tensor, key, out, why):
    """The kernel's output, recorded as compiled; or None (eager), recorded with why."""
    if out is None:
        return _eager(activation, pass_, x, why)
    if _recorders:
        _note(activation, pass_, x, "compiled", _describe(key))
    return out


def gem_forward(x: torch.Tensor, n: int, eps: float, a: float):
    """Fused GEM forward of x (any shape), or None where the fast path does not apply."""
    # is_compiling first: under Dynamo nothing below may be evaluated (a numel test would guard).
    if torch.compiler.is_compiling():
        return None
    why = _eager_reason(x)
    if why is not None:
        return _eager("gem", "forward", x, why)
    flat = x.contiguous().view(-1)
    key = _key("gem_fwd", (n, eps, a), x)
    y, why = _call(key, _GEM_FWD_SRC, "gem_fwd_kernel", {"n": n, "eps": eps, "a": a}, flat)
    return _served("gem", "forward", x, key, None if y is None else y.view_as(x), why)


def gem_backward(x: torch.Tensor, grad_out: torch.Tensor, n: int, eps: float, a: float):
    """Fused grad_out * GEM'(x) in x's dtype, or None (eager) where the fast path does not apply."""
    if torch.compiler.is_compiling():
        return None
    why = _eager_reason(x, backward=True)
    if why is None and not _plain(grad_out):
        why = "grad_out is a tensor subclass"
    if why is None and (grad_out.shape != x.shape or grad_out.device != x.device):
        why = "grad_out's shape or device differs from the input's"
    if why is not None:
        return _eager("gem", "backward", x, why)
    flat_x = x.contiguous().view(-1)
    flat_g = grad_out.contiguous().view(-1)
    key = _key("gem_bwd", (n, eps, a), x, grad_out.dtype)
    gx, why = _call(key, _GEM_BWD_SRC, "gem_bwd_kernel", {"n": n, "eps": eps, "a": a}, flat_x, flat_g)
    return _served("gem", "backward", x, key, None if gx is None else gx.view_as(x), why)


# ----------------------------------------------------------------------------- VeLU


def _velu_params(alpha, beta1, beta2, gamma, mu, eps, device_type):
    # On CPU the gate's atan/asin/sigmoid polynomials dominate (compute-bound): save the gate for
    # backward instead of evaluating it twice more, and compute the per-row scale in a kernel of its
    # own, so that the main kernel is one loop per row (Inductor will not inline a reused tanh into
    # it). On CUDA the kernels are memory-bound: one kernel, and recomputing the gate costs less
    # than reading a saved one. The math is the same either way (a recomputed gate is rounded to
    # x's dtype, as a saved one is). dim is 1: the kernels see x as _velu_rows lays it out.
    cpu = device_type == "cpu"
    return {"alpha": alpha, "beta1": beta1, "beta2": beta2, "gamma": gamma, "mu": mu, "eps": eps, "dim": 1,
            "save_gate": cpu}


def _velu_rows(x, dim):
    """x as a contiguous (outer, D) or (outer, D, inner) view, D being `dim`; None if D < 2.

    Every shape and dim then meets one of two kernels per dtype and row length D. (A row of one
    element would trace with D as the constant 1, which the per-row tensors share: see
    _trace_examples.)
    """
    if not -x.dim() <= dim < x.dim():
        return None  # eager raises the usual IndexError
    dim %= x.dim()
    d, inner = x.shape[dim], math.prod(x.shape[dim + 1:])
    if d < 2:
        return None
    x = x.contiguous()
    return x.view(-1, d) if inner == 1 else x.view(-1, d, inner)


# The row length D is a constant in VeLU's kernels (formulas.tree_sum adds in an order set by it):
# it is traced at its real size and is part of every VeLU kernel's key.
_ROW_DIM = (1,)


def _velu_row_scale(rows, mu, eps):
    key = _key("velu_scale", (mu, eps, 1), rows, rows.dim(), f"D={rows.shape[1]}")
    return _call(key, _VELU_SCALE_SRC, "velu_scale_kernel", {"mu": mu, "eps": eps, "dim": 1}, rows,
                 keep_dims=_ROW_DIM)


def _velu_eager_reason(x, lam, backward=False):
    why = _eager_reason(x, backward)
    if why is None and (not _plain(lam) or lam.device != x.device or lam.dim() != 0):
        why = "lam is not a plain 0-d tensor on x's device"
    return why


def velu_forward(x, lam, alpha, beta1, beta2, gamma, mu, eps, dim, need_grad=True):
    """Fused (lam * y, mean(y), std(y), g, k, t), or None where the fast path does not apply.

    g (the gate) and k, t (velu_row_scale) are for backward, laid out as _velu_rows(x, dim); they
    are None on CUDA, and g is None where no gradient is needed.
    """
    if torch.compiler.is_compiling():
        return None
    why = _velu_eager_reason(x, lam)
    rows = None if why is not None else _velu_rows(x, dim)
    if why is None and rows is None:
        why = "the reduced dim has fewer than 2 elements (or is out of range)"
    if why is not None:
        return _eager("velu", "forward", x, why)
    params = _velu_params(alpha, beta1, beta2, gamma, mu, eps, x.device.type)
    k = t = None
    if params["save_gate"]:
        row_scale, why = _velu_row_scale(rows, mu, eps)
        if row_scale is None:
            return _eager("velu", "forward", x, why)
        k, t = row_scale
    key = _key("velu_fwd", tuple(params.values()), x, lam.dtype, rows.dim(), f"D={rows.shape[1]}")
    res, why = _call(key, _VELU_FWD_SRC, "velu_fwd_kernel", params, rows, lam, k, t, keep_dims=_ROW_DIM)
    if res is None:
        return _eager("velu", "forward", x, why)
    out, mean, std, *gate = res
    # The CPU kernel returns g even where no gradient will need it: Inductor schedules the kernel
    # without g as an output worse (it evaluates the gate twice), so it is cheaper to drop it here.
    return _served("velu", "forward", x, key, (out.view(x.shape), mean, std, gate[0] if gate and need_grad else None,
                                            k, t), None)


def velu_backward(x, lam, grad_out, grad_mean, grad_std, mean, std, g, row_scale, alpha, beta1, beta2, gamma, mu,
                  eps, dim):
    """Fused (grad_x, grad_lam), or None (eager) where the fast path does not apply.

    g and row_scale are velu_forward's (or None, to recompute them).
    """
    if torch.compiler.is_compiling():
        return None
    why = _velu_eager_reason(x, lam, backward=True)
    k, t = (None, None) if row_scale is None else row_scale
    if why is None and any(tensor is not None and (not _plain(tensor) or tensor.device != x.device)
                           for tensor in (grad_out, grad_mean, grad_std, mean, std, g, k, t)):
        why = "a gradient or saved tensor is a subclass or on another device"
    if why is None and (grad_out is None or grad_out.shape != x.shape):
        why = "grad_out's shape differs from the input's"
    rows = None if why is not None else _velu_rows(x, dim)
    if why is None and (rows is None or (g is not None and g.shape != rows.shape)):
        why = "the reduced dim has fewer than 2 elements, or the saved gate's layout differs"
    if why is not None:
        return _eager("velu", "backward", x, why)
    params = _velu_params(alpha, beta1, beta2, gamma, mu, eps, x.device.type)
    params["lam_needs_grad"] = lam.requires_grad
    variant = (grad_mean is not None, grad_std is not None, g is not None, k is not None, grad_out.dtype, lam.dtype,
               rows.dim())
    key = _key("velu_bwd", tuple(params.values()), x, variant, f"D={rows.shape[1]}")
    res, why = _call(key, _VELU_BWD_SRC, "velu_bwd_kernel", params, rows, lam, _velu_rows(grad_out, dim), grad_mean,
                     grad_std, mean, std, g, k, t, keep_dims=_ROW_DIM)
    return _served("velu", "backward", x, key, None if res is None else (res[0].view(x.shape), res[1]), why)
