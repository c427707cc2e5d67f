"""Calibrated surgery (issue 13 item 1): `patch_activations(model, name, calibrate=batches)` fits
each site's free parameters to the old activation and folds the remaining per-unit mean error into
the bias of the projection that reads the activation.

Every expected value here is computed independently: the activations by formulas written in this
file, the best parameters by float64 brute-force search, the per-unit errors from inputs captured
with forward hooks of the test's own."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import hf_gemact
from hf_gemact.registry import parse_activation
from hf_gemact.surgery import SurgeryError
from hf_gemact.surgery.fit import fit_activation


# ----------------------------------------------------------------------------- formulas of the test's own


def egem(x, n, eps, a=0.0):
    r = x.clamp_min(0)
    s = x.abs()
    pos = r ** (2 * n + 1) / (eps + r ** (2 * n))
    neg = a * (-(s ** (2 * n + 1)) / (eps + s ** (2 * n)))
    return torch.where(x >= 0, pos, neg)


def velu(x, ms, alpha, beta1, beta2, gamma, mu, eps=1e-6, lam=1.0):
    gate = torch.sigmoid(alpha * (torch.atan(beta1 * x) + torch.asin((beta2 * x).clamp(-1, 1))))
    return lam * x * gate * (1 + gamma * torch.tanh(mu / torch.sqrt(ms + eps)))


def gelu_new(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def synthetic_inputs(n=16384, seed=0):
    """A skewed, heavy-ish input distribution like an MLP's pre-activations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 1.3 - 0.4
    return torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.1, x * 2.5, x)


def mse(a, b):
    return float((a - b).square().mean())


# ----------------------------------------------------------------------------- the fits


@pytest.mark.parametrize("n", [1, 2])
def test_egem_fit_matches_a_float64_brute_force_search(n):
    x = synthetic_inputs()
    target = gelu_new(x)
    fit = fit_activation(f"egem_n{n}", x, target)
    spec = parse_activation(fit.name)
    assert spec.family == "egem" and spec.kwargs["n"] == n
    eps = spec.kwargs["eps"]
    grid = 10.0 ** torch.linspace(-8, 4, 24001, dtype=torch.float64)
    errors = torch.stack([((egem(x, n, float(e)) - target) ** 2).mean() for e in grid[::10]])
    coarse = int(errors.argmin()) * 10
    fine = grid[max(coarse - 10, 0):coarse + 11]
    fine_errors = torch.stack([((egem(x, n, float(e)) - target) ** 2).mean() for e in fine])
    best_eps, best = float(fine[int(fine_errors.argmin())]), float(fine_errors.min())
    assert mse(egem(x, n, eps), target) <= best * (1 + 1e-3)
    assert abs(math.log10(eps / best_eps)) < 0.01  # 3 significant digits, a 0.05 % grid
    assert "eps" in fit.note


def test_segem_fit_matches_a_float64_brute_force_search():
    x = synthetic_inputs(4096)
    target = gelu_new(x)
    fit = fit_activation("segem_n1", x, target)
    k = parse_activation(fit.name).kwargs
    log_eps = torch.linspace(-4, 1, 251, dtype=torch.float64)
    slopes = torch.linspace(0, 0.6, 601, dtype=torch.float64)
    best = (math.inf, None, None)
    for le in log_eps.tolist():
        e = 10.0 ** le
        pos = ((egem(x, 1, e) - target) ** 2)[x >= 0].sum()
        s = x[x < 0].abs()
        h = -(s ** 3) / (e + s ** 2)
        neg = ((slopes[:, None] * h[None, :] - target[x < 0][None, :]) ** 2).sum(1)
        total = (pos + neg) / x.numel()
        i = int(total.argmin())
        if float(total[i]) < best[0]:
            best = (float(total[i]), e, float(slopes[i]))
    got = mse(egem(x, 1, k["eps"], k["a"]), target)
    assert got <= best[0] * (1 + 1e-3)
    assert abs(math.log10(k["eps"] / best[1])) < 0.05 and abs(k["a"] - best[2]) < 0.005


def test_velu_fit_beats_a_random_search_and_its_defaults():
    x = synthetic_inputs(2048)
    g = torch.Generator().manual_seed(1)
    ms = 0.5 + 2 * torch.rand(x.shape, generator=g, dtype=torch.float64)  # each value's row statistic
    target = gelu_new(x)
    fit = fit_activation("velu", x, target, ms)
    k = parse_activation(fit.name).kwargs
    got = mse(velu(x, ms, k["alpha"], k["beta1"], k["beta2"], k["gamma"], k["mu"], lam=fit.lam), target)
    default = mse(velu(x, ms, 0.1, 0.1, 0.1, 0.1, 0.9), target)
    # random search: 1500 parameter vectors, each with its least-squares lam
    lows = torch.tensor([0.0, -3.0, 0.0, -1.0, 0.0], dtype=torch.float64)
    highs = torch.tensor([10.0, 3.0, 1.0, 1.0, 3.0], dtype=torch.float64)
    best = math.inf
    for theta in lows + (highs - lows) * torch.rand(1500, 5, generator=g, dtype=torch.float64):
        u = velu(x, ms, *theta.tolist())
        lam = float((u * target).sum() / u.square().sum())
        best = min(best, mse(lam * u, target))
    assert got <= best and got < default / 100
    assert k["eps"] == 1e-6 and k["lambda_ot"] == 0.1  # the named parameters that are not fitted stay


@pytest.mark.parametrize("name", ["gem", "gem_n1", "gelu", "relu"])
def test_names_without_free_parameters_come_back_unchanged_and_say_so(name):
    x = synthetic_inputs(512)
    fit = fit_activation(name, x, gelu_new(x))
    assert fit.name == name and fit.lam is None and "no free parameter" in fit.note


# ----------------------------------------------------------------------------- a model


@pytest.fixture
def eager():
    """Each fitted name is an activation of its own, and the fast path compiles kernels per
    activation (seconds each): these tests check the calibration, not the kernels, so they run the
    eager closed form (bitwise the same values, tests/test_fused.py). One save/load case keeps the
    fast path."""
    from hf_gemact import fused

    was = fused._state["enabled"]
    hf_gemact.set_fast_path(False)
    yield
    hf_gemact.set_fast_path(was)


def tiny_gpt2(seed=0, n_layer=2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=2, n_embd=32, n_positions=32, vocab_size=97, initializer_range=0.2,
                        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def token_batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 97, (4, 32), generator=g)} for _ in range(n)]


def mlp_tensors(model, batches):
    """block -> (activation input, activation output, c_proj output) at every position, captured by
    hooks of the test's own."""
    seen = {}

    def keep(i, what):
        def hook(module, args, out):
            value = (args[0] if what == "x" else out).detach()
            seen.setdefault((i, what), []).append(value.reshape(-1, value.shape[-1]))
        return hook

    handles = []
    for i, block in enumerate(model.transformer.h):
        handles += [block.mlp.act.register_forward_hook(keep(i, "x")), block.mlp.act.register_forward_hook(keep(i, "y")),
                    block.mlp.c_proj.register_forward_hook(keep(i, "proj"))]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in handles:
        h.remove()
    return {i: tuple(torch.cat(seen[(i, w)]) for w in ("x", "y", "proj")) for i in range(len(model.transformer.h))}


@pytest.mark.parametrize("act", ["egem_n2", "segem_n2", "gem", "velu"])
def test_bias_correction_removes_the_per_unit_mean_error_on_the_calibration_data(act, eager):
    """At every block, on the calibration data: the patched model's MLP output (c_proj) has the
    unpatched model's mean per output unit, though the patched blocks before it moved its input;
    with the biases as they were it does not. The reported errors are recomputed from the captured
    tensors: the target is the unpatched model's activation output, the input the patched model's."""
    model = tiny_gpt2()
    reference = copy.deepcopy(model)
    batches = token_batches()
    before = mlp_tensors(reference, batches)
    report = hf_gemact.patch_activations(model, act, calibrate=batches)
    after = mlp_tensors(model, batches)
    assert len(report.changes) == 2
    for i, change in enumerate(report.changes):
        x_ref, y_ref, proj_ref = before[i]
        x_new, y_new, proj_new = after[i]
        assert (i == 0) == torch.equal(x_ref, x_new)  # block 1 sees block 0's patch
        assert torch.equal(reference.transformer.h[i].mlp.c_proj.weight, model.transformer.h[i].mlp.c_proj.weight)
        scale = proj_ref.double().mean(0).abs().max()
        assert (proj_new.double().mean(0) - proj_ref.double().mean(0)).abs().max() < 1e-5 * scale
        with torch.no_grad():
            uncorrected = reference.transformer.h[i].mlp.c_proj(y_new).double().mean(0)
        assert (uncorrected - proj_ref.double().mean(0)).abs().max() > 1e-4 * scale  # the correction did something
        calibration = change.calibration
        assert calibration.projection == f"transformer.h.{i}.mlp.c_proj" and calibration.skipped is None
        assert calibration.positions == x_new.shape[0] == 3 * 4 * 32
        err = y_ref.double() - y_new.double()
        assert calibration.mse_fitted == pytest.approx(float(err.square().mean()), rel=1e-4, abs=1e-12)
        centred = err - err.mean(0)
        assert calibration.mse_calibrated == pytest.approx(float(centred.square().mean()), rel=1e-4, abs=1e-12)
        if act == "egem_n2":
            named = egem(x_new.double(), 2, 1e-4)
            assert calibration.mse_plain == pytest.approx(mse(y_ref.double(), named), rel=1e-4)
            assert calibration.mse_calibrated < calibration.mse_fitted < calibration.mse_plain
        if i == 0:
            assert torch.allclose(y_ref.double(), gelu_new(x_ref.double()), atol=1e-5)  # the target is the old output
        assert change.new == calibration.fitted and str(calibration) in str(report)


@pytest.mark.parametrize("act,fast", [("egem_n2", True), ("segem_n2", False), ("velu", False)])
def test_calibrated_patch_saves_loads_and_restores_bit_identically(act, fast, tmp_path, request):
    from transformers import GPT2LMHeadModel

    if not fast:
        request.getfixturevalue("eager")
    model = tiny_gpt2()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    batches = token_batches()
    with torch.no_grad():
        before = model(**batches[0]).logits
    report = hf_gemact.patch_activations(model, act, calibrate=batches)
    fitted = [c.new for c in report.changes]
    assert all(name != act and parse_activation(name).family == parse_activation(act).family for name in fitted)
    model.save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert [hf_gemact.surgery.guess_name(b.mlp.act) for b in loaded.transformer.h] == fitted
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        patched = model(**batches[0]).logits
        assert torch.equal(loaded(**batches[0]).logits, patched)
    assert not torch.equal(patched, before)

    hf_gemact.restore_activations(model)
    assert model.state_dict().keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(model.state_dict()[key], value), key  # the biases too
    with torch.no_grad():
        assert torch.equal(model(**batches[0]).logits, before)
    assert not hasattr(model.config, "hf_gemact_activations") and model.config.activation_function == "gelu_new"


def test_calibration_of_selected_layers_leaves_the_others_alone(eager):
    model = tiny_gpt2(n_layer=3)
    reference = copy.deepcopy(model)
    report = hf_gemact.patch_activations(model, "egem_n2", layers="-1:", calibrate=token_batches())
    assert [c.block for c in report.changes] == [2]
    for i in (0, 1):
        a, b = model.transformer.h[i], reference.transformer.h[i]
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
        assert type(a.mlp.act) is type(b.mlp.act)
    assert not torch.equal(model.transformer.h[2].mlp.c_proj.bias, reference.transformer.h[2].mlp.c_proj.bias)


def test_calibration_refuses_what_it_cannot_do():
    model = tiny_gpt2()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(SurgeryError, match="calibrate and blend"):
        hf_gemact.patch_activations(model, "gem", blend=True, calibrate=token_batches())
    with pytest.raises(SurgeryError, match="empty"):
        hf_gemact.patch_activations(model, "gem", calibrate=[])
    with pytest.raises(SurgeryError, match="wrap it in a list"):
        hf_gemact.patch_activations(model, "gem", calibrate=token_batches()[0])
    with pytest.raises(SurgeryError, match="dict of model inputs"):
        hf_gemact.patch_activations(model, "gem", calibrate=[torch.zeros(2, 3)])
    assert type(model.transformer.h[0].mlp.act).__name__ == "NewGELUActivation"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- other families


def _bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                vocab_size=97, max_position_embeddings=32)), "encoder.layer.0.output.dense"


def _vit():
    from transformers import ViTConfig, ViTModel

    model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               image_size=8, patch_size=4))
    names = dict(model.named_modules())
    layer = "layers.0" if "layers.0" in names else "encoder.layer.0"
    return model, f"{layer}.mlp.fc2" if f"{layer}.mlp.fc2" in names else f"{layer}.output.dense"


def _distilbert():
    from transformers import DistilBertConfig, DistilBertModel

    return DistilBertModel(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=97,
                                            max_position_embeddings=32)), "transformer.layer.0.ffn.lin2"


def _llama():
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=2, vocab_size=97, max_position_embeddings=32)), None


@pytest.mark.parametrize("build", [_bert, _vit, _distilbert, _llama], ids=["bert", "vit", "distilbert", "llama"])
def test_each_family_finds_the_projection_that_reads_the_activation(build, eager):
    torch.manual_seed(0)
    model, projection = build()
    model.eval()
    if type(model).__name__ == "ViTModel":
        batches = [{"pixel_values": torch.randn(2, 3, 8, 8)}]
    else:
        batches = [{"input_ids": torch.randint(0, 97, (2, 16))}]
    reference = copy.deepcopy(model)
    (change,) = hf_gemact.patch_activations(model, "egem_n2", calibrate=batches).changes
    calibration = change.calibration
    assert calibration.projection == projection
    if projection is None:  # a gated MLP: act(gate(x)) * up(x) reaches down_proj, no bias to fold into
        assert "gated" in calibration.skipped
        assert calibration.mse_calibrated == calibration.mse_fitted
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    else:
        layer = model.get_submodule(projection)
        assert not torch.equal(layer.bias, reference.get_submodule(projection).bias)
        assert calibration.mse_calibrated < calibration.mse_fitted


# ----------------------------------------------------------------------------- hf-gemact patch --calibrate


@pytest.fixture(scope="module")
def gelu_checkpoint(tmp_path_factory, shared_data):
    """A tiny gelu_new GPT-2 with the real GPT-2 tokenizer beside it, and a file of text lines."""
    import shutil

    folder = tmp_path_factory.mktemp("gelu_ckpt")
    model = tiny_gpt2()
    model.config.vocab_size = 50257
    model.resize_token_embeddings(50257)
    model.save_pretrained(folder)
    for f in (shared_data / "gpt2-tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    lines = [line for line in (shared_data / "text" / "tinyshakespeare.txt").read_text().splitlines() if line.strip()]
    data = folder.parent / "calibration.txt"
    data.write_text("\n".join(lines[:100]))
    return folder, data, lines


def test_patch_command_calibrates_on_the_first_samples_of_its_data(gelu_checkpoint, tmp_path, capsys, eager):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from hf_gemact.cli import main

    folder, data, lines = gelu_checkpoint
    code = main(["patch", str(folder), str(tmp_path / "dst"), "--act", "segem_n2", "--calibrate", str(data),
                 "--calibration_samples", "24"])
    out = capsys.readouterr().out
    assert code == 0 and "calibrating on 24 samples" in out and "calibration (mean squared difference" in out
    # the same 24 lines through the checkpoint's tokenizer (batches of 16, padded), calibrated here
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.eos_token
    batches = [dict(tok(lines[i:min(i + 16, 24)], return_tensors="pt", padding=True, truncation=True, max_length=32))
               for i in range(0, 24, 16)]
    expected = GPT2LMHeadModel.from_pretrained(folder).eval()
    report = hf_gemact.patch_activations(expected, "segem_n2", calibrate=batches)
    saved = GPT2LMHeadModel.from_pretrained(tmp_path / "dst")
    assert [hf_gemact.surgery.guess_name(b.mlp.act) for b in saved.transformer.h] == [c.new for c in report.changes]
    for key, value in expected.state_dict().items():
        assert torch.equal(saved.state_dict()[key], value), key


@pytest.mark.parametrize("flags, problem", [
    (["--calibration_samples", "5"], "--calibration_samples only goes with --calibrate"),
    (["--calibrate", "/no/such/file.txt"], "--calibrate /no/such/file.txt: no such file or folder"),
    (["--calibrate", "{data}", "--blend", "0.5"], "--calibrate and --blend do not go together"),
])
def test_patch_command_calibration_errors_are_one_line(gelu_checkpoint, tmp_path, capsys, flags, problem):
    from hf_gemact.cli import main

    folder, data, _ = gelu_checkpoint
    flags = [f.format(data=data) for f in flags]
    code = main(["patch", str(folder), str(tmp_path / "dst"), "--act", "egem_n2", *flags])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(errors) == 1 and problem in errors[0], errors
    assert not (tmp_path / "dst").exists()
