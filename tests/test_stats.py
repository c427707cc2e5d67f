"""Activation statistics (issue 13, item 3) and the bounded-memory recorder behind them.

Every statistic is checked against the full tensors collected by hooks of the test's own, computed
in float64 here: exact and near-zero counts, dead units, mean/std/min/max, quantiles within the
documented accuracy, per-unit means. The reservoir is checked for uniformity on a known stream and
for memory that does not grow with the number of batches.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import hf_gemact
from hf_gemact.stats import ActivationRecorder, activation_stats, format_activation_stats, plot_activation_stats
from hf_gemact.surgery import NoActivationError, find_sites

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel  # noqa: E402

QUANTILE_KEYS = ("0.01", "0.05", "0.25", "0.5", "0.75", "0.95", "0.99")
# docs/SURGERY.md: a quantile is within 0.58 % (relative) of the exact order statistic, or within
# 1e-6 absolute when that statistic is below 1e-6 in magnitude.
QUANTILE_REL, QUANTILE_ABS = 0.0058, 1e-6


@pytest.fixture(autouse=True, scope="module")
def eager_activations():
    """The statistics do not depend on the kernel; skip the compile of the fast path."""
    was = hf_gemact.fast_path_enabled()
    hf_gemact.set_fast_path(False)
    yield
    hf_gemact.set_fast_path(was)


# ----------------------------------------------------------------------------------------- models


def tiny_gpt2(act: str, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=97, activation_function=act,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def tiny_bert(act: str, seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                        vocab_size=97, max_position_embeddings=32, hidden_act=act)
    return BertModel(config)


def text_batches(n: int, seed: int = 1, batch: int = 3, length: int = 12, pad: bool = True) -> list[dict]:
    """Token batches; with pad=True the second row ends in padding (attention_mask 0)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 97, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        if pad:
            mask[1, length // 2:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def collect(model, batches, paths):
    """Run the model with hooks of the test's own; per path the (input, output) values of every
    non-padding position as float64 (positions, units)."""
    modules = dict(model.named_modules())
    seen = {p: ([], []) for p in paths}
    state = {}

    def hook_for(path):
        def hook(module, args, output):
            x, y = args[0].detach(), output.detach()
            mask = state["mask"]
            keep = mask.bool() if mask is not None else torch.ones(x.shape[:-1], dtype=torch.bool)
            seen[path][0].append(x[keep].double())
            seen[path][1].append(y[keep].double())
        return hook

    handles = [modules[p].register_forward_hook(hook_for(p)) for p in paths]
    model.eval()
    try:
        with torch.no_grad():
            for b in batches:
                state["mask"] = b.get("attention_mask")
                model(**b)
    finally:
        for h in handles:
            h.remove()
    return {p: (torch.cat(xs), torch.cat(ys)) for p, (xs, ys) in seen.items()}


def lower_quantile(values: torch.Tensor, q: float) -> float:
    ordered = values.flatten().sort().values
    return float(ordered[math.floor(q * (len(ordered) - 1))])


def mlp_paths(model):
    return [s.path for s in find_sites(model) if s.role == "mlp"]


# ------------------------------------------------------------------------------ counts and moments


@pytest.mark.parametrize("family,act", [("gpt2", "relu"), ("gpt2", "gem"), ("bert", "velu"), ("gpt2", "egem_n1_eps1e-2")])
def test_statistics_match_full_tensors(family, act):
    model = tiny_gpt2(act) if family == "gpt2" else tiny_bert(act)
    batches = text_batches(4)
    tau = 1e-3
    stats = activation_stats(model, batches, near_zero=tau)
    paths = mlp_paths(model)
    assert list(stats) == paths
    full = collect(model, batches, paths)
    for path in paths:
        x, y = full[path]
        r = stats[path]
        assert r["n_units"] == x.shape[1]
        assert r["n_values"] == y.numel()
        assert r["n_zero"] == int((y == 0).sum())
        assert r["zero_fraction"] == pytest.approx(int((y == 0).sum()) / y.numel(), abs=0)
        assert r["n_near_zero"] == int((y.abs() <= tau).sum())
        assert r["near_zero_fraction"] == int((y.abs() <= tau).sum()) / y.numel()
        assert r["near_zero_threshold"] == tau
        never = ((y.abs() > tau).sum(0) == 0).nonzero().flatten().tolist()
        assert r["dead_units"] == never and r["n_dead_units"] == len(never)
        inp = r["input"]
        assert inp["n"] == x.numel()
        assert inp["mean"] == pytest.approx(float(x.mean()), rel=1e-9, abs=1e-12)
        assert inp["std"] == pytest.approx(float(x.std(unbiased=False)), rel=1e-9)
        assert inp["min"] == float(x.min()) and inp["max"] == float(x.max())
        for key in QUANTILE_KEYS:
            exact = lower_quantile(x, float(key))
            got = inp["quantiles"][key]
            assert abs(got - exact) <= QUANTILE_REL * abs(exact) + QUANTILE_ABS, (path, key, got, exact)
    if act == "relu":  # the case has to exercise the counts: relu gives exact zeros
        assert all(0.2 < stats[p]["zero_fraction"] < 0.8 for p in paths)
    if act == "velu":  # smooth and signed: no exact zeros but some near-zeros
        assert all(stats[p]["zero_fraction"] == 0 for p in paths)


def test_near_zero_threshold_is_exact_at_float32_boundaries():
    """Outputs equal to tau count as near-zero, the next float32 above does not (the recorder
    compares in float32 without rounding tau up)."""
    tau = 1e-3
    below = torch.tensor(tau, dtype=torch.float32)
    if float(below) > tau:
        below = torch.nextafter(below, torch.tensor(0.0))
    above = torch.nextafter(below, torch.tensor(1.0))
    values = torch.stack([below, above, -below, -above, torch.tensor(0.0)]).reshape(1, 1, 5)
    from transformers.activations import LinearActivation

    model = Toy(act=LinearActivation())  # output = input
    recorder = ActivationRecorder(model, sample_size=0, near_zero=tau)
    recorder.run([{"x": values}])
    record = recorder.to_dict()[model.path]
    assert record["n_near_zero"] == 3 and record["n_zero"] == 1
    assert record["dead_units"] == [0, 2, 4]


def test_non_finite_inputs_are_counted_and_kept_out_of_the_statistics():
    from transformers.activations import LinearActivation

    x = torch.tensor([[1.0, float("nan"), -2.0, 4.0], [float("inf"), 0.5, -float("inf"), 3.0]]).reshape(1, 2, 4)
    recorder = ActivationRecorder(Toy(act=LinearActivation()), sample_size=16)
    record = recorder.run([{"x": x}])[Toy.path]
    out = recorder.to_dict()[Toy.path]
    finite = torch.tensor([1.0, -2.0, 4.0, 0.5, 3.0], dtype=torch.float64)
    assert out["input"]["n"] == 5 and out["input"]["n_nonfinite"] == 3
    assert out["input"]["mean"] == pytest.approx(float(finite.mean()))
    assert out["input"]["std"] == pytest.approx(float(finite.std(unbiased=False)))
    assert (out["input"]["min"], out["input"]["max"]) == (-2.0, 4.0)
    assert out["n_nan_output"] == 1  # the NaN passes through; inf counts as fired
    assert sorted(record.sample().tolist()) == sorted(finite.tolist())
    # each sampled value keeps the mean square of its own row, non-finite members included
    for value, ms in zip(record.sample().tolist(), record.sample_row_mean_square().tolist()):
        assert math.isnan(ms) if value in (1.0, -2.0, 4.0) else ms == math.inf


def test_dead_units_found_where_the_bias_kills_them():
    model = tiny_gpt2("relu")
    dead = {0: [3, 17, 100], 1: [5, 64]}
    with torch.no_grad():
        for block, units in dead.items():
            model.transformer.h[block].mlp.c_fc.bias[units] = -1e4
    stats = activation_stats(model, text_batches(4))
    for block, units in dead.items():
        record = stats[f"transformer.h.{block}.mlp.act"]
        assert record["dead_units"] == units
        assert record["n_units"] == 128


def test_a_unit_that_fires_in_one_batch_only_is_not_dead():
    x = torch.tensor([[-1.0, 2.0, -3.0], [-1.0, 0.5, -3.0]]).reshape(1, 2, 3)
    batches = [{"x": x}, {"x": -x.abs()}, {"x": -x.abs()}]  # unit 1 fires only in the first batch
    stats = activation_stats(Toy(), batches)  # ReLU
    assert stats[Toy.path]["dead_units"] == [0, 2]


def test_attention_mask_padding_is_left_out():
    """Padding rows carry no token: a unit that fires only there is still dead."""
    model = tiny_gpt2("relu")
    batches = text_batches(2)
    with_pad = activation_stats(model, batches)
    no_mask = activation_stats(model, [{"input_ids": b["input_ids"]} for b in batches])
    path = mlp_paths(model)[0]
    real_positions = sum(int(b["attention_mask"].sum()) for b in batches)
    all_positions = sum(b["input_ids"].numel() for b in batches)
    assert with_pad[path]["n_values"] == real_positions * 128
    assert no_mask[path]["n_values"] == all_positions * 128


# ---------------------------------------------------------------------------------- unit means


def test_per_unit_means_of_the_input_and_of_registered_functions():
    model = tiny_gpt2("gem")
    batches = text_batches(3)
    recorder = ActivationRecorder(model, sample_size=0)
    recorder.add_unit_mean("square", lambda site, x: x * x)
    recorder.add_unit_mean("gem_minus_relu", lambda site, x: site.module(x) - torch.relu(x))
    recorder.run(batches)
    full = collect(model, batches, list(recorder))
    for path, (x, y) in full.items():
        site = recorder[path]
        torch.testing.assert_close(site.unit_mean(), x.mean(0), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(site.unit_mean("square"), (x * x).mean(0), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(site.unit_mean("gem_minus_relu"), (y - x.clamp_min(0)).mean(0), rtol=1e-5, atol=1e-8)
    with pytest.raises(KeyError, match="no per-unit mean 'nope'"):
        recorder[path].unit_mean("nope")


def test_unit_mean_function_of_wrong_shape_is_refused_and_hooks_are_gone():
    model = tiny_gpt2("relu")
    recorder = ActivationRecorder(model, sample_size=0)
    recorder.add_unit_mean("bad", lambda site, x: x.mean(0))
    with pytest.raises(ValueError, match="must return a tensor shaped like its input"):
        recorder.run(text_batches(1))
    assert all(not s.module._forward_hooks for s in find_sites(model))


# ------------------------------------------------------------------------------------- reservoir


class Toy(nn.Module):
    """One block whose MLP activation sees exactly the tensor passed as `x`."""

    path = "blocks.0.mlp.act"

    def __init__(self, act: nn.Module | None = None):
        super().__init__()
        block = nn.Module()
        block.mlp = nn.Module()
        block.mlp.act = act if act is not None else nn.ReLU()
        self.blocks = nn.ModuleList([block])

    def forward(self, x):
        return self.blocks[0].mlp.act(x)


def stream_batches(n_items: int, batch_items: int, units: int = 8):
    """The values 0, 1, ..., n_items-1 in order, as (1, rows, units) batches."""
    values = torch.arange(n_items, dtype=torch.float32)
    return [{"x": values[i:i + batch_items].reshape(1, -1, units)} for i in range(0, n_items, batch_items)]


def chi_square_uniform(items: torch.Tensor, n_items: int, bins: int) -> float:
    counts = torch.bincount((items.long() * bins) // n_items, minlength=bins).double()
    expected = counts.sum() / bins
    return float(((counts - expected) ** 2 / expected).sum())


def test_reservoir_is_a_uniform_sample_without_replacement():
    n_items, capacity, bins = 24000, 1000, 20
    # batches of 296 values: the reservoir fills in the middle of a batch
    batches = stream_batches(n_items, 296)
    pooled = []
    for seed in range(10):
        recorder = ActivationRecorder(Toy(), sample_size=capacity, seed=seed)
        recorder.run(batches)
        sample = recorder[Toy.path].sample()
        assert sample.numel() == capacity
        assert len(set(sample.tolist())) == capacity  # without replacement
        assert float(sample.min()) >= 0 and float(sample.max()) < n_items
        # each value keeps its own row's mean square (rows are 8 consecutive integers)
        row_start = (sample // 8) * 8
        expected_ms = torch.stack([row_start + k for k in range(8)]).double().square().mean(0)
        torch.testing.assert_close(recorder[Toy.path].sample_row_mean_square().double(), expected_ms, rtol=1e-6, atol=0)
        pooled.append(sample)
    # 19 degrees of freedom: P(chi2 > 43.8) = 0.001 under uniformity; fixed seeds, so not flaky
    assert chi_square_uniform(pooled[0], n_items, bins) < 43.8
    assert chi_square_uniform(torch.cat(pooled), n_items, bins) < 43.8
    # and the stream's end is not over-represented (the classic bug of replacing too often)
    last_tenth = (torch.cat(pooled) >= 0.9 * n_items).double().mean().item()
    assert abs(last_tenth - 0.1) < 0.015


def test_reservoir_is_uniform_when_batches_are_large_against_the_capacity():
    """Each item of a batch has its own acceptance probability k/(t+1): with batches 10x the
    capacity, treating a batch as one step would over-sample the early batches."""
    n_items, capacity = 20000, 200
    batches = stream_batches(n_items, 2000)
    pooled = torch.cat([ActivationRecorder(Toy(), sample_size=capacity, seed=seed).run(batches)[Toy.path].sample()
                        for seed in range(10)])
    assert chi_square_uniform(pooled, n_items, 20) < 43.8


def test_reservoir_is_reproducible_and_seeded():
    batches = stream_batches(8000, 400)
    a = ActivationRecorder(Toy(), sample_size=500, seed=3).run(batches)[Toy.path].sample()
    b = ActivationRecorder(Toy(), sample_size=500, seed=3).run(batches)[Toy.path].sample()
    c = ActivationRecorder(Toy(), sample_size=500, seed=4).run(batches)[Toy.path].sample()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_reservoir_keeps_everything_while_below_capacity():
    recorder = ActivationRecorder(Toy(), sample_size=1000).run(stream_batches(400, 80))
    assert recorder[Toy.path].sample().tolist() == list(range(400))


def _stored_size(obj, seen=None) -> int:
    """Tensor elements plus container lengths reachable from obj (the model is not counted)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (nn.Module, torch.Generator)):
        return 0
    seen.add(id(obj))
    if torch.is_tensor(obj):
        return obj.numel()
    if isinstance(obj, dict):
        return len(obj) + sum(_stored_size(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return len(obj) + sum(_stored_size(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("hf_gemact"):
        return _stored_size(vars(obj), seen)
    return 0


def test_recorder_memory_does_not_grow_with_the_number_of_batches():
    g = torch.Generator().manual_seed(5)
    batches = [{"x": torch.randn(2, 32, 16, generator=g)} for _ in range(100)]  # 1024 values each
    recorder = ActivationRecorder(Toy(), sample_size=20000)
    recorder.add_unit_mean("square", lambda site, x: x * x)
    recorder.run(batches[:10])
    after_10 = _stored_size(recorder)
    site = recorder[Toy.path]
    assert site.sample().numel() == 10240  # still filling
    recorder.run(batches[10:])
    assert recorder.n_batches == 100
    assert site.sample().numel() == 20000 and site.reservoir.seen == 102400  # full, replacing
    assert _stored_size(recorder) == after_10


# ------------------------------------------------------------------------- hooks, modes, errors


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("start_training", [True, False])
def test_hooks_removed_and_modes_restored_also_when_the_model_raises(start_training):
    model = tiny_gpt2("relu")
    model.train(start_training)
    model.transformer.h[1].attn.eval()  # a mixed state must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    seen_modes = []

    def spy(module, args):
        seen_modes.append(module.training)

    model.transformer.h[0].register_forward_pre_hook(spy)
    activation_stats(model, text_batches(2))
    assert seen_modes and not any(seen_modes)  # ran in eval mode
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(not s.module._forward_hooks for s in find_sites(model))

    def explode(module, args):
        raise Boom("in the middle of the forward")

    handle = model.transformer.h[1].register_forward_pre_hook(explode)
    with pytest.raises(Boom):
        activation_stats(model, text_batches(2))
    handle.remove()
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(not s.module._forward_hooks for s in find_sites(model))
    with pytest.raises(TypeError, match="dict of model inputs"):
        activation_stats(model, [torch.zeros(2, 3)])
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(not s.module._forward_hooks for s in find_sites(model))


def test_max_batches_stops_without_consuming_more():
    taken = []

    def gen():
        for b in text_batches(5):
            taken.append(1)
            yield b

    model = tiny_gpt2("relu")
    stats = activation_stats(model, gen(), max_batches=2)
    assert len(taken) == 2
    assert stats[mlp_paths(model)[0]]["n_values"] == sum(int(b["attention_mask"].sum()) for b in text_batches(2)) * 128


def test_bad_arguments_are_refused_with_the_fix():
    model = tiny_gpt2("relu")
    with pytest.raises(ValueError, match="yielded no batch"):
        activation_stats(model, [])
    with pytest.raises(ValueError, match="near_zero must be a finite number >= 0"):
        activation_stats(model, text_batches(1), near_zero=-1)
    with pytest.raises(ValueError, match="sites must be 'mlp', 'all'"):
        activation_stats(model, text_batches(1), sites="heads")
    with pytest.raises(ValueError, match="unknown activation site"):
        activation_stats(model, text_batches(1), sites=["transformer.h.9.mlp.act"])
    with pytest.raises(ValueError, match="max_batches must be an integer >= 1"):
        activation_stats(model, text_batches(1), max_batches=0)
    with pytest.raises(NoActivationError, match="no MLP activation site"):
        activation_stats(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), [{"input": torch.zeros(1, 2)}])


def test_sites_all_records_heads_too():
    model = tiny_bert("gelu")  # BertModel: 2 intermediate activations and the pooler's Tanh
    stats = activation_stats(model, text_batches(2), sites="all")
    roles = {r["role"] for r in stats.values()}
    assert roles == {"mlp", "head"}
    pooler = next(r for r in stats.values() if r["role"] == "head")
    assert pooler["module"] == "Tanh" and pooler["n_units"] == 32


# --------------------------------------------------------------------------------- JSON and plot


def test_json_round_trip_text_table_and_plot(tmp_path):
    model = tiny_gpt2("relu")
    stats = activation_stats(model, text_batches(2))
    assert json.loads(json.dumps(stats)) == stats
    table = format_activation_stats(stats)
    for path in stats:
        assert path in table
    out = plot_activation_stats(stats, tmp_path / "stats.png", title="tiny gpt2 relu")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_import_does_not_load_matplotlib():
    code = "import sys, hf_gemact; hf_gemact.activation_stats; print('matplotlib' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


# ------------------------------------------------------------------ hf-gemact inspect --stats (CLI)


def _cli(argv, capsys):
    from hf_gemact.cli import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory, shared_data):
    """A tiny relu GPT-2 saved with the real GPT-2 tokenizer beside it."""
    import shutil

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, activation_function="relu")
    folder = tmp_path_factory.mktemp("gpt2_relu")
    GPT2LMHeadModel(config).save_pretrained(folder)
    for f in (shared_data / "gpt2-tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def test_inspect_stats_prints_and_writes_what_the_library_computes(gpt2_checkpoint, shared_data, tmp_path, capsys):
    from transformers import AutoTokenizer

    lines = [line for line in (shared_data / "text" / "tinyshakespeare.txt").read_text().splitlines() if line.strip()]
    data = tmp_path / "lines.txt"
    data.write_text("\n\n".join(lines[:60]))  # blank lines are skipped
    code, out, err = _cli(["inspect", str(gpt2_checkpoint), "--stats", "--data", str(data), "--stats_samples", "40",
                           "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")], capsys)
    assert code == 0, err
    written = json.loads((tmp_path / "s.json").read_text())
    assert written["samples"] == 40 and written["data"] == str(data)
    # the same 40 lines through the checkpoint's tokenizer, batches of 16, 128 tokens at most
    tok = AutoTokenizer.from_pretrained(gpt2_checkpoint)
    tok.pad_token = tok.eos_token
    batches = [dict(tok([l.strip() for l in lines[i:min(i + 16, 40)]], return_tensors="pt", padding=True,
                        truncation=True, max_length=64)) for i in range(0, 40, 16)]
    model = GPT2LMHeadModel.from_pretrained(gpt2_checkpoint)
    full = collect(model, batches, mlp_paths(model))
    for path, (x, y) in full.items():
        record = written["sites"][path]
        assert record["n_values"] == y.numel() and record["n_zero"] == int((y == 0).sum())
        assert record["input"]["mean"] == pytest.approx(float(x.mean()), rel=1e-9)
        assert f"{record['zero_fraction']:.2%}" in out  # the printed table
    assert "activation statistics of the MLP sites on 40 texts" in out
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_inspect_stats_on_a_folder_of_images_for_a_vision_checkpoint(shared_data, tmp_path, capsys):
    import gzip

    import numpy as np
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification

    raw = gzip.open(shared_data / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").read()
    images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)[:20]
    folder = tmp_path / "images" / "sub"
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    torch.manual_seed(0)
    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, hidden_act="gem")
    ckpt = tmp_path / "vit"
    ViTForImageClassification(config).save_pretrained(ckpt)  # no image processor saved: 0.5 mean / std
    code, out, err = _cli(["inspect", str(ckpt), "--stats", "--data", str(tmp_path / "images"),
                           "--json", str(tmp_path / "v.json")], capsys)
    assert code == 0, err
    sites = json.loads((tmp_path / "v.json").read_text())["sites"]
    model = ViTForImageClassification.from_pretrained(ckpt)
    pixels = torch.tensor(images, dtype=torch.float32)[:, None] / 127.5 - 1.0  # (x/255 - 0.5) / 0.5
    full = collect(model, [{"pixel_values": pixels[:16]}, {"pixel_values": pixels[16:]}], mlp_paths(model))
    for path, (x, y) in full.items():
        assert sites[path]["n_values"] == 20 * 17 * 64  # 16 patches + CLS, 64 units
        assert sites[path]["input"]["mean"] == pytest.approx(float(x.mean()), rel=1e-4)
        assert sites[path]["zero_fraction"] == pytest.approx(float((y == 0).double().mean()), abs=1e-3)
    assert "on 20 images" in out


@pytest.mark.parametrize("argv, message", [
    (["--stats"], "--stats needs --data FILE_OR_DATASET"),
    (["--json", "x.json"], "--json only go with --stats"),
    (["--stats", "--data", "/no/such/file.txt"], "--data /no/such/file.txt: no such file or folder"),
    (["--stats", "--data", "{folder}"], "is a folder: a text checkpoint takes a text file"),
    (["--stats", "--data", "{data}", "--plot", "{folder}"], "--plot {folder} is a folder"),
])
def test_inspect_stats_flag_errors_are_one_line(gpt2_checkpoint, tmp_path, capsys, argv, message):
    data = tmp_path / "t.txt"
    data.write_text("some text\n")
    fill = {"folder": str(tmp_path), "data": str(data)}
    argv = [a.format(**fill) for a in argv]
    code, out, err = _cli(["inspect", str(gpt2_checkpoint), *argv], capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]  # above it, at most the weights' loading bar
    assert last.startswith("hf-gemact inspect: error: ") and message.format(**fill) in last


# ---------------------------------------------------------------- sweep column and the training loop


def test_sweep_tables_carry_the_sparsity_of_each_run(tmp_path):
    from hf_gemact import sweep

    rows = []
    for act, fractions in {"relu": [(0.5, 0.6), (0.3, 0.4)], "gelu": [(0.0, 0.02), (0.0, 0.04)]}.items():
        for seed, (zero, near) in enumerate(fractions):
            run = sweep.Run(act, seed, tmp_path / act / f"seed{seed}")
            run.output_dir.mkdir(parents=True)
            run.metrics_path.write_text(json.dumps({
                "task": "clm", "final": {"perplexity": 20.0 + seed}, "best": {"perplexity": 19.0},
                "tokens_per_s": 5.0, "activation_sparsity": {"zero_fraction": zero, "near_zero_fraction": near,
                                                             "near_zero_threshold": 1e-3}}))
            rows.append(sweep.run_row(run))
    old = sweep.Run("gem", 0, tmp_path / "gem" / "seed0")  # a run from before the column
    old.output_dir.mkdir(parents=True)
    old.metrics_path.write_text(json.dumps({"task": "clm", "final": {"perplexity": 21.0}, "best": {"perplexity": 20.0}}))
    rows.append(sweep.run_row(old))
    csv_path, md_path = sweep.write_tables(rows, tmp_path)
    text = md_path.read_text()
    assert "| sparsity 0 / near 0 |" in text and "|y| <= 0.001" in text
    assert text.count("40.0% / 50.0% |") == 1  # relu: mean of (0.5, 0.3) / (0.6, 0.4)
    assert text.count("0.0% / 3.0% |") == 1  # gelu
    gem_line = next(line for line in text.splitlines() if "| gem |" in line)
    assert gem_line.endswith("|  |")
    import csv

    with open(csv_path) as f:
        written = {(r["activation"], r["seed"]): r for r in csv.DictReader(f)}
    assert float(written[("relu", "1")]["near_zero_fraction"]) == 0.4
    assert written[("gem", "0")]["zero_fraction"] == ""


@pytest.fixture
def fresh_accelerate(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState, GradientState

    monkeypatch.setenv("HF_GEMACT_CACHE", str(tmp_path / "hf_gemact_cache"))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_training_run_writes_the_sparsity_of_its_first_validation_batches(shared_data, tmp_path, fresh_accelerate):
    from transformers import AutoTokenizer

    from hf_gemact.stats import SPARSITY_EVAL_BATCHES
    from hf_gemact.training import run

    text = (shared_data / "text" / "tinyshakespeare.txt").read_text()
    (tmp_path / "train.txt").write_text(text[:20_000])
    (tmp_path / "valid.txt").write_text(text[-6_000:])
    out = tmp_path / "out"
    run("clm", ["--train_file", str(tmp_path / "train.txt"), "--validation_file", str(tmp_path / "valid.txt"),
                "--output_dir", str(out), "--config_overrides", "n_layer=2,n_embd=32,n_head=2,n_positions=32",
                "--block_size", "32", "--vocab_size", "300", "--activation", "relu",
                "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
                "--max_train_steps", "2", "--learning_rate", "3e-3"])
    got = json.loads((out / "metrics.json").read_text())["activation_sparsity"]
    # independently: the validation text as blocks of 32 tokens in order, the first 8 batches of 4
    tok = AutoTokenizer.from_pretrained(out)
    model = GPT2LMHeadModel.from_pretrained(out)
    ids = [t for line in (tmp_path / "valid.txt").read_text().splitlines(keepends=True) for t in tok(line)["input_ids"]]
    blocks = torch.tensor(ids[: len(ids) // 32 * 32]).view(-1, 32)[: SPARSITY_EVAL_BATCHES * 4]
    assert len(blocks) == 32
    full = collect(model, [{"input_ids": b} for b in blocks.split(4)], mlp_paths(model))
    ys = [y for _, y in full.values()]
    values = sum(y.numel() for y in ys)
    assert got["values"] == values and got["batches"] == SPARSITY_EVAL_BATCHES
    assert got["zero_fraction"] == sum(int((y == 0).sum()) for y in ys) / values
    assert got["near_zero_fraction"] == sum(int((y.abs() <= 1e-3).sum()) for y in ys) / values
    assert got["dead_units"] == sum(int(((y.abs() > 1e-3).sum(0) == 0).sum()) for y in ys)
    assert got["units"] == 2 * 128 and got["sites"] == 2 and got["near_zero_threshold"] == 1e-3
    assert 0.2 < got["zero_fraction"] < 0.8
