"""A fused fast path for the activations' forward and backward, compiled by TorchInductor.

The GEM family is purely rational, so one fused elementwise pass (Inductor: C++/OpenMP on CPU,
Triton on CUDA) reads x once and writes y once; the backward reads x and grad_out once and writes
grad_x once, recomputing the gate instead of saving anything but x. Eager PyTorch instead runs
about ten separate kernels, each a full pass over memory.

VeLU is compute-bound on CPU (atan, asin, sigmoid per element), so its CPU kernels trace the same
formulas with `approx=True`: polynomial atan/asin and, for |alpha| <= 0.11, sigmoid, all inline
(SLEEF calls inside a vectorised loop cost more in register spills than in arithmetic); the gate
is saved for backward (x and g: two input-sized tensors, instead of evaluating the gate twice
more); and the per-row scale has a kernel of its own so the main kernel is one loop per row.
On CUDA VeLU keeps the exact functions and recomputes the gate (memory-bound there).

How it is wired: `functional._GEMFunction` / `_VeLUFunction` ask this module first
(`gem_forward`, `gem_backward`, `velu_forward`, `velu_backward` here); each returns None when the
fast path does not apply, and the caller then runs its eager closed form. The compiled kernels
trace the very same formulas from `functional`, so the numerics agree within dtype rounding and
the NaN/inf rules are the same.

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
  * VeLU only: lam is not a 0-d tensor, or the reduced dim has a single element;
  * the arguments are outside a guard Inductor made while compiling (e.g. 32-bit indexing on
    CUDA): that call alone runs eager, and `fast_path_info` counts such calls;
  * compiling failed once for that kernel (no C++ compiler, no Triton, an Inductor error): a
    warning is given once and that kernel stays eager from then on.

Every kernel is compiled once per (activation parameters, dtype, device, layout, and on CPU the
thread count) for all shapes: traced with symbolic sizes (make_fx) and compiled by
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

__all__ = ["set_fast_path", "fast_path_enabled", "fast_path_info", "compile_times", "clear_cache"]

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


def _describe(key) -> str:
    kind, params, dtype, device = key[:4]
    extra = "".join(f",{part}" for part in key[4:])
    return f"{kind}{params}[{str(dtype).replace('torch.', '')},{device}{extra}]"


# ----------------------------------------------------------------------------- applicability


def _plain(t: torch.Tensor) -> bool:
    """A tensor with its own storage: not a subclass, nor functorch's wrapper (vmap, grad, jvp)."""
    return type(t) in _PLAIN and not torch._C._functorch.is_functorch_wrapped_tensor(t)


def _usable(x: torch.Tensor) -> bool:
    # is_compiling first: under Dynamo nothing below may be evaluated (a numel test would guard).
    if torch.compiler.is_compiling() or not _state["enabled"] or not _plain(x):
        return False
    if x.dtype not in _FAST_DTYPES:
        return False
    limit = _state["min_numel"].get(x.device.type)
    return limit is not None and x.numel() >= limit


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
                          approx={approx!r}, save_gate={save_gate!r}, row_scale=None if k is None else (k, t))
"""
_VELU_BWD_SRC = """
def velu_bwd_kernel(x, lam, grad_out, grad_mean, grad_std, mean, std, g, k, t):
    return F.velu_backward(x, lam, grad_out, grad_mean, grad_std, mean, std,
                           {alpha!r}, {beta1!r}, {beta2!r}, {gamma!r}, {mu!r}, {eps!r}, {dim!r},
                           g=g, row_scale=None if k is None else (k, t), approx={approx!r},
                           lam_needs_grad={lam_needs_grad!r})
"""


def _compile_options(device_type: str) -> dict:
    # Let the C++ compiler contract a*b+c into FMAs: about 15 % off the VeLU gate on CPU, and it only
    # ever rounds less. The option's name and type vary across torch versions, so only set it if known.
    import torch._inductor.config

    cpp = getattr(torch._inductor.config, "cpp", None)
    flag = getattr(cpp, "enable_floating_point_contract_flag", None)
    if device_type != "cpu" or flag is None:
        return {}
    return {"cpp.enable_floating_point_contract_flag": "fast" if isinstance(flag, str) else True}


def _make_kernel(src: str, name: str, params: dict, device_type: str, args: tuple):
    from . import functional

    namespace = {"F": functional}
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
            return _GraphKernel(fn, args, options)
        except Exception:  # a torch whose standalone_compile does not take this graph: torch.compile can
            pass
    return torch.compile(fn, dynamic=True, fullgraph=True, options=options)


def _standalone_compile():
    import torch._inductor

    return getattr(torch._inductor, "standalone_compile", None)  # torch >= 2.8


class _NotCovered(Exception):
    """The arguments fall outside what a compiled kernel was specialised for: run eager this once."""


class _GraphKernel:
    """`fn` compiled by Inductor for one argument layout, and called without Dynamo.

    A torch.compile'd function evaluates Dynamo's guards and runs Dynamo's and AOTAutograd's Python
    wrappers on every call, which costs about as much as the GEM kernel itself at 64K elements on
    CPU. Here `fn` is traced once with symbolic sizes (make_fx) and handed to Inductor directly
    (torch._inductor.standalone_compile); a call is then the compiled code's own thin wrapper.

    Nothing checks the arguments per call, so the callers keep the promise that guards would have
    checked: all calls under one kernel key pass contiguous tensors with the same dtypes, devices,
    ranks and None pattern, and a tensor's dim is 1 exactly where it was 1 when traced (see
    `_trace_examples`). Guards that Inductor itself adds (32-bit indexing on CUDA) are checked per
    call where there are any; arguments outside them raise _NotCovered.
    """

    def __init__(self, fn, args: tuple, options: dict):
        from torch.fx.experimental.proxy_tensor import make_fx

        present = [a is not None for a in args]
        returned = {}

        def traced(*tensors):
            it = iter(tensors)
            out = fn(*(next(it) if p else None for p in present))
            returned["single"] = not isinstance(out, tuple)
            outs = (out,) if returned["single"] else out
            returned["none"] = [o is None for o in outs]
            return tuple(o for o in outs if o is not None)

        examples = _trace_examples([a for a in args if a is not None])
        with torch.inference_mode(False), torch.no_grad(), torch.autocast(args[0].device.type, enabled=False):
            gm = make_fx(traced, tracing_mode="symbolic")(*examples)
            placeholders = [node.meta["val"] for node in gm.graph.nodes if node.op == "placeholder"]
            shape_env = placeholders[0].fake_mode.shape_env
            self._compiled = _standalone_compile()(gm, examples, dynamic_shapes="from_graph",
                                                   options={"config_patches": options})
        self._single, self._none = returned["single"], returned["none"]
        self._shape_env, self._guards = shape_env, None
        if shape_env.guards:
            self._guards = compile(shape_env.produce_guards_expression(placeholders), "<hf_gemact guards>", "eval")

    def __call__(self, *args):
        tensors = [a for a in args if a is not None]
        if self._guards is not None and not self._shape_env.evaluate_guards_expression(self._guards, tensors):
            raise _NotCovered
        outs = iter(self._compiled(*tensors))
        if self._single:
            return next(outs)
        return tuple(None if none else next(outs) for none in self._none)


def _trace_examples(tensors: list) -> list:
    """Stand-ins for `tensors` to trace with: the sizes of the first one's dims made >= 2 and distinct.

    Symbolic tracing treats a size of 1 as the constant 1 and equal sizes as one symbol; a kernel
    traced on the real sizes could then be wrong for the next shape (rows == width, say). The other
    tensors are 0-d, or of the first one's rank with each dim either its size there or 1 (broadcast).
    """
    first = tensors[0]
    sizes = []
    for size in first.shape:
        size = max(size, 2)
        while size in sizes:
            size += 1
        sizes.append(size)
    examples = []
    for t in tensors:
        if t.dim() == 0:
            shape = ()
        elif t.dim() == first.dim():
            shape = [s if n == m else 1 for n, m, s in zip(t.shape, first.shape, sizes)]
            if any(n != m and n != 1 for n, m in zip(t.shape, first.shape)):
                raise ValueError(f"cannot trace a kernel for shapes {tuple(first.shape)} and {tuple(t.shape)}")
        else:
            raise ValueError(f"cannot trace a kernel for ranks {first.dim()} and {t.dim()}")
        examples.append(torch.empty(shape, dtype=t.dtype, device=t.device))
    return examples


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


def _call(key, src, name, params, *args):
    """Run the compiled kernel for `key` (see _key), compiling it on first use; None if it cannot be had."""
    fn = _kernels.get(key, False)
    if fn is None:
        return None
    started = None
    if fn is False:
        started = time.perf_counter()
        fn = _compile(key, src, name, params, args)
        if fn is None:
            return None
    try:
        out = fn(*args)
    except _NotCovered:
        _uncovered_calls[key] = _uncovered_calls.get(key, 0) + 1
        return None
    except Exception as err:  # compiling lazily (torch.compile) failed, or an Inductor error: stay eager
        return _failed(key, err)
    if started is not None:
        _compile_times[key] = time.perf_counter() - started
    return out


def _compile(key, src, name, params, args):
    with _lock:
        if key not in _kernels:
            try:
                _kernels[key] = _make_kernel(src, name, params, key[3].type, args)
            except Exception as err:  # no compiler, unsupported platform, Inductor bug: stay eager
                return _failed(key, err)
        return _kernels[key]


# ----------------------------------------------------------------------------- GEM family


def gem_forward(x: torch.Tensor, n: int, eps: float, a: float):
    """Fused GEM forward of x (any shape), or None where the fast path does not apply."""
    if not _usable(x):
        return None
    flat = x.contiguous().view(-1)
    key = _key("gem_fwd", (n, eps, a), x)
    y = _call(key, _GEM_FWD_SRC, "gem_fwd_kernel", {"n": n, "eps": eps, "a": a}, flat)
    return None if y is None else y.view_as(x)


def gem_backward(x: torch.Tensor, grad_out: torch.Tensor, n: int, eps: float, a: float):
    """Fused grad_out * GEM'(x) in x's dtype, or None (eager) where the fast path does not apply."""
    if torch.is_grad_enabled() or not _usable(x) or not _plain(grad_out):
        return None
    if grad_out.shape != x.shape or grad_out.device != x.device:
        return None
    flat_x = x.contiguous().view(-1)
    flat_g = grad_out.contiguous().view(-1)
    key = _key("gem_bwd", (n, eps, a), x, grad_out.dtype)
    gx = _call(key, _GEM_BWD_SRC, "gem_bwd_kernel", {"n": n, "eps": eps, "a": a}, flat_x, flat_g)
    return None if gx is None else gx.view_as(x)


# ----------------------------------------------------------------------------- VeLU


def _velu_params(alpha, beta1, beta2, gamma, mu, eps, device_type):
    # On CPU the gate's atan/asin/sigmoid dominate (compute-bound): use the polynomial versions,
    # save the gate for backward instead of evaluating it twice more, and compute the per-row scale
    # in a kernel of its own, so that the main kernel is one loop per row (Inductor will not inline
    # a reused tanh into it). On CUDA the kernels are memory-bound: exact libdevice functions, one
    # kernel, and recomputing the gate costs less than reading a saved one.
    # dim is 1: the kernels see x as _velu_rows lays it out.
    cpu = device_type == "cpu"
    return {"alpha": alpha, "beta1": beta1, "beta2": beta2, "gamma": gamma, "mu": mu, "eps": eps, "dim": 1,
            "approx": cpu, "save_gate": cpu}


def _velu_rows(x, dim):
    """x as a contiguous (outer, D) or (outer, D, inner) view, D being `dim`; None if D < 2.

    Every shape and dim then meets one of two kernels per dtype. (A row of one element would trace
    with D as the constant 1, which the per-row tensors share: see _trace_examples.)
    """
    if not -x.dim() <= dim < x.dim():
        return None  # eager raises the usual IndexError
    dim %= x.dim()
    d, inner = x.shape[dim], math.prod(x.shape[dim + 1:])
    if d < 2:
        return None
    x = x.contiguous()
    return x.view(-1, d) if inner == 1 else x.view(-1, d, inner)


def _velu_row_scale(rows, mu, eps):
    key = _key("velu_scale", (mu, eps, 1), rows, rows.dim())
    return _call(key, _VELU_SCALE_SRC, "velu_scale_kernel", {"mu": mu, "eps": eps, "dim": 1}, rows)


def velu_forward(x, lam, alpha, beta1, beta2, gamma, mu, eps, dim, need_grad=True):
    """Fused (lam * y, mean(y), std(y), g, k, t), or None where the fast path does not apply.

    g (the gate) and k, t (velu_row_scale) are for backward, laid out as _velu_rows(x, dim); they
    are None on CUDA, and g is None where no gradient is needed.
    """
    if not _usable(x) or not _plain(lam) or lam.device != x.device or lam.dim() != 0:
        return None
    rows = _velu_rows(x, dim)
    if rows is None:
        return None
    params = _velu_params(alpha, beta1, beta2, gamma, mu, eps, x.device.type)
    k = t = None
    if params["approx"]:
        row_scale = _velu_row_scale(rows, mu, eps)
        if row_scale is None:
            return None
        k, t = row_scale
    key = _key("velu_fwd", tuple(params.values()), x, lam.dtype, rows.dim())
    res = _call(key, _VELU_FWD_SRC, "velu_fwd_kernel", params, rows, lam, k, t)
    if res is None:
        return None
    out, mean, std, *gate = res
    # The CPU kernel returns g even where no gradient will need it: Inductor schedules the kernel
    # without g as an output worse (it evaluates the gate twice), so it is cheaper to drop it here.
    return out.view(x.shape), mean, std, gate[0] if gate and need_grad else None, k, t


def velu_backward(x, lam, grad_out, grad_mean, grad_std, mean, std, g, row_scale, alpha, beta1, beta2, gamma, mu,
                  eps, dim):
    """Fused (grad_x, grad_lam), or None (eager) where the fast path does not apply.

    g and row_scale are velu_forward's (or None, to recompute them).
    """
    if torch.is_grad_enabled() or not _usable(x) or not _plain(lam) or lam.dim() != 0:
        return None
    k, t = (None, None) if row_scale is None else row_scale
    for tensor in (grad_out, grad_mean, grad_std, mean, std, g, k, t):
        if tensor is not None and (not _plain(tensor) or tensor.device != x.device):
            return None
    if grad_out is None or grad_out.shape != x.shape:
        return None
    rows = _velu_rows(x, dim)
    if rows is None or (g is not None and g.shape != rows.shape):
        return None
    params = _velu_params(alpha, beta1, beta2, gamma, mu, eps, x.device.type)
    params["lam_needs_grad"] = lam.requires_grad
    variant = (grad_mean is not None, grad_std is not None, g is not None, k is not None, grad_out.dtype, lam.dtype,
               rows.dim())
    key = _key("velu_bwd", tuple(params.values()), x, variant)
    res = _call(key, _VELU_BWD_SRC, "velu_bwd_kernel", params, rows, lam, _velu_rows(grad_out, dim), grad_mean,
                grad_std, mean, std, g, k, t)
    return None if res is None else (res[0].view(x.shape), res[1])
