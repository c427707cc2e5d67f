"""A kernel compiled by Inductor for one argument layout and called without Dynamo (`_GraphKernel`),
the stand-in tensors it is traced on, the shape guards it checks, and the Inductor options every
hf_gemact kernel is compiled with. `fused.py` builds its kernels with these."""

from __future__ import annotations

import re

import torch


def _compile_options(device_type: str) -> dict:
    """Inductor settings for these kernels: round as the eager ops do, and compile in seconds.

    Both: emulate_precision_casts, which keeps an explicit round trip through a half dtype (a gate
    recomputed in backward is rounded to x's dtype, as a saved one is) and on CUDA turns Triton's FP
    fusion off. CPU: no FMA contraction (Inductor's default; said explicitly, since a*b+c contracted
    rounds once where eager rounds twice). CUDA: IEEE division, no flushing of subnormals. And an
    intermediate of more than 32 operations that has several users is computed once (into a
    buffer, row-local or fused away) rather than inlined into each: the Newton steps and
    polynomials read their inputs several times, and inlining nests exponentially. Measured on
    VeLU's CPU kernels: Inductor's CPU default, 50, compiles in 3x the time; 24 compiles fastest but
    stores so many intermediates that the forward is 1.5x slower; 32 runs as fast as 50.
    Options this torch lacks are left out.
    """
    import torch._inductor.config as config

    wanted = {"realize_opcount_threshold": 32, "emulate_precision_casts": True}
    if device_type == "cpu":
        wanted["cpp.enable_floating_point_contract_flag"] = "off"
    elif device_type == "cuda":
        wanted.update({"eager_numerics.division_rounding": True, "eager_numerics.disable_ftz": True})
    options = {}
    for name, value in wanted.items():
        owner = config
        *path, leaf = name.split(".")
        for part in path:
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, leaf):
            continue
        current = getattr(owner, leaf)
        if isinstance(current, bool) and value == "off":  # older torch: a bool flag
            value = False
        options[name] = value
    return options


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
    `_trace_examples`). `keep_dims` are dims of the first argument that `fn` makes concrete (VeLU's
    row length): traced at their real size and checked on every call, as are guards that Inductor
    itself makes (32-bit indexing on CUDA); arguments outside them raise _NotCovered.
    """

    def __init__(self, fn, args: tuple, options: dict, keep_dims: tuple = (), standalone_compile=None):
        from torch.fx.experimental.proxy_tensor import make_fx

        if standalone_compile is None:  # fused.py passes its own (tests replace it there)
            import torch._inductor as inductor

            standalone_compile = inductor.standalone_compile

        present = [a is not None for a in args]
        returned = {}

        def traced(*tensors):
            it = iter(tensors)
            out = fn(*(next(it) if p else None for p in present))
            returned["single"] = not isinstance(out, tuple)
            outs = (out,) if returned["single"] else out
            returned["none"] = [o is None for o in outs]
            return tuple(o for o in outs if o is not None)

        examples = _trace_examples([a for a in args if a is not None], keep_dims)
        with torch.inference_mode(False), torch.no_grad(), torch.autocast(args[0].device.type, enabled=False):
            gm = make_fx(traced, tracing_mode="symbolic")(*examples)
            placeholders = [node.meta["val"] for node in gm.graph.nodes if node.op == "placeholder"]
            shape_env = placeholders[0].fake_mode.shape_env
            self._compiled = standalone_compile(gm, examples, dynamic_shapes="from_graph",
                                                   options={"config_patches": options})
        self._single, self._none = returned["single"], returned["none"]
        self._kept = [(d, args[0].shape[d]) for d in keep_dims]
        self._shape_env, self._guards = shape_env, None
        if shape_env.guards:
            expression = _guard_expression(shape_env, placeholders)
            self._guards = None if expression is None else compile(expression, "<hf_gemact guards>", "eval")

    def __call__(self, *args):
        tensors = [a for a in args if a is not None]
        if any(tensors[0].shape[d] != size for d, size in self._kept):
            raise _NotCovered
        if self._guards is not None and not self._shape_env.evaluate_guards_expression(self._guards, tensors):
            raise _NotCovered
        outs = iter(self._compiled(*tensors))
        if self._single:
            return next(outs)
        return tuple(None if none else next(outs) for none in self._none)


def _guard_expression(shape_env, placeholders) -> str | None:
    """The shape guards of a traced kernel as one Python expression over t0, t1, ..., or None.

    Symbolic tracing assumes every size it keeps symbolic is >= 2 (0 and 1 would be specialised),
    and the expression would repeat that; but the kernels are traced on stand-ins of such sizes
    (_trace_examples) precisely so that they serve size-1 dims as well, so those terms are left out.
    """
    from torch._dynamo.source import LocalSource

    terms = shape_env.produce_guards(placeholders, [LocalSource(f"t{i}") for i in range(len(placeholders))])
    terms = [term for term in terms if not re.fullmatch(r"2 <= L\['t\d+'\]\.size\(\)\[\d+\]", term)]
    return " and ".join(terms) or None


def _trace_examples(tensors: list, keep_dims: tuple = ()) -> list:
    """Stand-ins for `tensors` to trace with: the sizes of the first one's dims made >= 2 and distinct.

    Symbolic tracing treats a size of 1 as the constant 1 and equal sizes as one symbol; a kernel
    traced on the real sizes could then be wrong for the next shape (rows == width, say). The dims
    in `keep_dims` keep their real size (>= 2; the kernel specialises them) and the others avoid it.
    The other tensors are 0-d, or of the first one's rank with each dim either its size there or 1
    (broadcast).
    """
    first = tensors[0]
    sizes = [first.shape[d] if d in keep_dims else None for d in range(first.dim())]
    for d, size in enumerate(first.shape):
        if sizes[d] is not None:
            continue
        size = max(size, 2)
        while size in sizes:
            size += 1
        sizes[d] = size
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
