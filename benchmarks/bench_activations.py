"""Speed and memory of the hf_gemact activations against F.gelu and ReLU, in one table.

    python benchmarks/bench_activations.py            # full run
    python benchmarks/bench_activations.py --quick    # under a minute on 2 CPU cores
    python benchmarks/bench_activations.py --device cuda

Every activation is taken the way users get it: `transformers.activations.ACT2FN[name]`, eager
mode, default settings (so the hf_gemact names go through the compiled fast path when it is
available). Rows marked "(eager)" are the same activation with `hf_gemact.set_fast_path(False)`
(forward and backward).

Timing: all variants of one (size, dtype) are measured interleaved, round after round, and each
ratio is the median over rounds of (variant / F.gelu) measured in the same round, so a noisy,
shared machine shifts numerator and denominator alike. Forward is run without autograd; forward
+backward is `y = act(x); y.backward(g)` with x.requires_grad. "saved" is what autograd keeps for
backward (torch.autograd.graph.saved_tensors_hooks), in units of the input's size. "compile s" is
the first call's tracing+Inductor time of the kernels that configuration used (with whatever the
on-disk Inductor cache already held; `--cold-compile` also measures it in a fresh process with an
empty cache). On CUDA, "GB/s" counts the minimal traffic (forward: read x, write y; forward
+backward: that plus read x, read g, write grad) and "%peak" divides it by the device's peak.
Fast-path kernels that did not run compiled (compiling failed, or calls fell outside the guards
Inductor made) are listed after the table with a warning: those rows measured eager code.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as Fn
from transformers.activations import ACT2FN

import hf_gemact
from hf_gemact import fused

GEM_NAMES = ["gem_n2", "egem", "segem"]
PEAK_BW = {"H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H200": 4.8e12,
           "A100-SXM4-80GB": 2.04e12, "A100-SXM4-40GB": 1.56e12, "A100-PCIE": 1.56e12, "L4": 0.3e12}


def peak_bandwidth(device) -> float | None:
    name = torch.cuda.get_device_name(device)
    for key, bw in PEAK_BW.items():
        if key in name:
            return bw
    return None


class Variant:
    def __init__(self, label, make, fast=True):
        self.label, self.make, self.fast = label, make, fast
        self.module = make()

    def __call__(self, x):
        return self.module(x)

    @contextlib.contextmanager
    def active(self):
        """The fast path as this variant has it, for forward and backward alike."""
        if self.fast:
            yield
            return
        fused.set_fast_path(False)
        try:
            yield
        finally:
            fused.set_fast_path(True)


def variants(quick: bool):
    v = [Variant("relu", lambda: ACT2FN["relu"]), Variant("gelu", lambda: ACT2FN["gelu"]),
         Variant("gelu_tanh", lambda: ACT2FN["gelu_new"])]
    v += [Variant(name, lambda name=name: ACT2FN[name]) for name in GEM_NAMES]
    v.append(Variant("velu", lambda: ACT2FN["velu"]))
    v.append(Variant("gem_n2 (eager)", lambda: ACT2FN["gem_n2"], fast=False))
    if not quick:
        v.append(Variant("velu (eager)", lambda: ACT2FN["velu"], fast=False))
    return v


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, reps, device):
    """Median seconds per call over `reps` timed calls (CUDA: each call synchronised)."""
    ts = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def time_call_cuda(fn, reps, device):
    """Mean seconds per call of `reps` back-to-back calls between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1e3 / reps


def saved_bytes(fn, x):
    total = 0
    seen = set()

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    del y
    return total


def bench_activations(device, sizes, dtypes, quick, rounds):
    rows = []
    vs = variants(quick)
    peak = peak_bandwidth(device) if device.type == "cuda" else None
    for dtype in dtypes:
        for numel in sizes:
            shape = (numel // 1024, 1024)
            torch.manual_seed(0)
            x = torch.randn(shape, device=device, dtype=dtype) * 2
            xg = x.clone().requires_grad_()
            g = torch.randn_like(x)
            big = numel >= 1 << 20
            reps = (2 if quick else 5) if big else (20 if quick else 100)
            if device.type == "cuda":
                reps = 20 if big else 200

            compile_s = {}
            for v in vs:  # warm up (this compiles), recording each variant's first-call time
                before = dict(fused.compile_times())
                with v.active():
                    with torch.no_grad():
                        v(x)
                    v(xg).backward(g)
                xg.grad = None
                after = fused.compile_times()
                compile_s[v.label] = sum(t for k, t in after.items() if k not in before)

            def fwd(v):
                with v.active(), torch.no_grad():
                    v(x)

            def fwdbwd(v):
                with v.active():
                    v(xg).backward(g)
                xg.grad = None

            for mode, body in (("fwd", fwd), ("fwd+bwd", fwdbwd)):
                times = {v.label: [] for v in vs}
                for _ in range(rounds):
                    for v in vs:
                        if device.type == "cuda":
                            times[v.label].append(time_call_cuda(lambda: body(v), reps, device))
                        else:
                            times[v.label].append(time_call(lambda: body(v), reps, device))
                for v in vs:
                    t = times[v.label]
                    r_gelu = statistics.median(a / b for a, b in zip(t, times["gelu"]))
                    r_relu = statistics.median(a / b for a, b in zip(t, times["relu"]))
                    row = dict(act=v.label, numel=numel, dtype=str(dtype).replace("torch.", ""), mode=mode,
                               vs_gelu=r_gelu, vs_relu=r_relu, compile_s=compile_s[v.label])
                    with v.active():
                        row["saved"] = saved_bytes(v, xg) / (x.numel() * x.element_size())
                    if device.type == "cuda":
                        traffic = (2 if mode == "fwd" else 5) * x.numel() * x.element_size()
                        row["gbps"] = traffic / statistics.median(t) / 1e9
                        row["peak"] = (row["gbps"] * 1e9 / peak) if peak else None
                    rows.append(row)
    return rows


def gpt2_step_ratios(device, quick, rounds):
    """Training-step time of a small GPT-2 with each activation, relative to gelu (same process)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    acts = ["gelu", "gem_n2", "velu"]
    batch, seq = 8, 256
    models, opts = {}, {}
    for act in acts:
        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=seq, vocab_size=8192,
                         activation_function=act, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        models[act] = GPT2LMHeadModel(cfg).to(device).train()
        opts[act] = torch.optim.AdamW(models[act].parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8192, (batch, seq), generator=gen).to(device)

    def step(act):
        loss = models[act](input_ids=ids, labels=ids).loss
        loss.backward()
        opts[act].step()
        opts[act].zero_grad(set_to_none=True)

    first = {}
    for act in acts:  # warm-up step (compiles the fast-path kernels for these shapes and dtypes)
        sync(device)
        t0 = time.perf_counter()
        step(act)
        sync(device)
        first[act] = time.perf_counter() - t0
    times = {a: [] for a in acts}
    reps = (1 if quick else 2) if device.type == "cpu" else 10
    for _ in range(rounds):
        for act in acts:
            times[act].append(time_call(lambda: step(act), reps, device))
    ratios = {a: statistics.median(t / g for t, g in zip(times[a], times["gelu"])) for a in acts}
    return ratios, first, statistics.median(times["gelu"])


def cold_compile_seconds(device, act: str) -> float:
    """First-call time of `act`'s forward+backward (fp32) in a fresh process with an empty Inductor cache."""
    code = (
        "import time, torch, hf_gemact\n"
        "from transformers.activations import ACT2FN\n"
        f"x = torch.randn(64, 1024, device='{device}', requires_grad=True)\n"
        f"t0 = time.perf_counter(); ACT2FN['{act}'](x).sum().backward()\n"
        f"{'torch.cuda.synchronize()' if device.type == 'cuda' else ''}\n"
        "print(time.perf_counter() - t0)\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tmp, TRITON_CACHE_DIR=os.path.join(tmp, "triton"))
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes, repeats and rounds (under a minute)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per measurement")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-gpt2", action="store_true", help="skip the training-step comparison")
    p.add_argument("--cold-compile", action="store_true", help="also time compiling in a fresh process, empty cache")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 7)
    if device.type == "cuda":
        sizes = [1 << 16, 1 << 22, 1 << 26]
        name = torch.cuda.get_device_name(device)
        peak = peak_bandwidth(device)
        print(f"device: {name}; peak memory bandwidth used for %peak: "
              f"{peak / 1e12 if peak else float('nan'):.2f} TB/s")
    else:
        sizes = [1 << 16, 1 << 22]
        print(f"device: cpu, torch threads {torch.get_num_threads()}")
    print(f"torch {torch.__version__}, hf_gemact {hf_gemact.__version__}, fast path "
          f"{'on' if fused.fast_path_enabled() else 'OFF'}, quick={args.quick}, rounds={rounds}")

    t0 = time.perf_counter()
    rows = bench_activations(device, sizes, [torch.float32, torch.bfloat16], args.quick, rounds)
    cuda = device.type == "cuda"
    head = f"| activation | elements | dtype | pass | vs gelu | vs relu | saved (x input) | compile s |"
    sep = "|---|---:|---|---|---:|---:|---:|---:|"
    if cuda:
        head += " GB/s | %peak |"
        sep += "---:|---:|"
    print()
    print(head)
    print(sep)
    for r in rows:
        size = f"{r['numel'] // 1024}K" if r["numel"] < 1 << 20 else f"{r['numel'] >> 20}M"
        saved = f"{r['saved']:.2f}" if r["mode"] == "fwd+bwd" else "-"
        line = (f"| {r['act']} | {size} | {r['dtype']} | {r['mode']} | {r['vs_gelu']:.2f} | {r['vs_relu']:.2f} "
                f"| {saved} | {r['compile_s']:.1f} |")
        if cuda:
            line += f" {r['gbps']:.0f} | {100 * r['peak']:.0f}% |" if r["peak"] else f" {r['gbps']:.0f} | - |"
        print(line)
    print(f"\n(activation table took {time.perf_counter() - t0:.0f} s)")

    if not args.no_gpt2:
        ratios, first, gelu_s = gpt2_step_ratios(device, args.quick, 2 if args.quick else 5)
        print("\nGPT-2 training step (4 layers, 256 wide, 4 heads, vocab 8192, batch 8x256, AdamW), "
              f"time relative to gelu (gelu step {gelu_s * 1e3:.0f} ms):")
        for act, r in ratios.items():
            print(f"  {act:7s} {r:.3f}x   (first step incl. compile {first[act]:.1f} s)")

    # A kernel that failed to compile, or calls outside its guards, run eager: those rows are not the fast path.
    not_fused = {k: state for k, state in fused.fast_path_info()["kernels"].items() if state != "ok"}
    if not_fused:
        print("\nWARNING: these fast-path kernels ran (some calls) eager; their activations' rows above are "
              "not the fast path's numbers:")
        for kernel, state in not_fused.items():
            print(f"  {kernel}: {state}")
    total_compile = sum(fused.compile_times().values())
    print(f"\nfast-path kernels compiled in this run: {len(fused.compile_times())}, "
          f"total first-call time {total_compile:.1f} s, slowest {max(fused.compile_times().values(), default=0):.1f} s")
    if args.cold_compile:
        for act in ("gem_n2", "velu"):
            print(f"cold compile (fresh process, empty Inductor cache), {act} fwd+bwd fp32: "
                  f"{cold_compile_seconds(device, act):.1f} s")


if __name__ == "__main__":
    main()
