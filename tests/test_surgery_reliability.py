"""Surgery reliability (issue 17 items 3 and 10): malformed config records and wrapped models.

Every malformed `hf_gemact_activations` / `hf_gemact_blend` entry in a saved checkpoint's
config.json either applies or makes from_pretrained raise ConfigRecordError naming the entry and the
file; surgery on DataParallel / DDP / torch.compile / custom wrappers patches the transformers model
inside (recorded in its config) or refuses with a message that says what to pass.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from torch import nn

import hf_gemact
from hf_gemact import surgery
from hf_gemact.surgery import BlendedActivation, ConfigRecordError, SurgeryError

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForMaskedLM, BertModel, GPT2Config, GPT2LMHeadModel, GPT2Model  # noqa: E402


def _gpt2_config(**kw):
    return GPT2Config(n_layer=3, n_embd=16, n_head=2, n_positions=32, vocab_size=64, bos_token_id=0,
                      eos_token_id=0, **kw)


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("plain")
    GPT2LMHeadModel(_gpt2_config()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def batch():
    return {"input_ids": torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))}


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _edited_copy(src, dst, **entries):
    """A copy of checkpoint `src` whose config.json has `entries` set (None deletes a key)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in entries.items():
        config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _acts(model):
    blocks = model.transformer.h if hasattr(model, "transformer") else model.h
    return [type(b.mlp.act).__name__ for b in blocks]


# ---------------------------------------------------------------------------- malformed records


def test_full_path_key_applies_like_the_direct_patch(plain_dir, batch, tmp_path):
    # a full module path names exactly one site, so it is applied (from the task class and from
    # the base class, which strips the task class's base_model_prefix)
    folder = _edited_copy(plain_dir, tmp_path / "c", hf_gemact_activations={"transformer.h.1.mlp.act": "gem"})
    loaded = GPT2LMHeadModel.from_pretrained(folder)
    assert _acts(loaded) == ["NewGELUActivation", "GEM", "NewGELUActivation"]
    direct = GPT2LMHeadModel.from_pretrained(plain_dir)
    hf_gemact.patch_activations(direct, "gem", layers=[1])
    assert torch.equal(_logits(loaded, batch), _logits(direct, batch))
    assert _acts(GPT2Model.from_pretrained(folder)) == ["NewGELUActivation", "GEM", "NewGELUActivation"]


RECORD = "hf_gemact_activations"
BLEND = "hf_gemact_blend"

MALFORMED = [
    # (config key, value, text the one-line message must contain)
    (RECORD, {"h.1.mlp.actt": "gem"}, "names no module of GPT2LMHeadModel"),
    (RECORD, {"hh.1.mlp.act": "gem"}, "names no module of GPT2LMHeadModel"),
    (RECORD, {"h.1.mlp.c_fc": "gem"}, "names a Conv1D module, which is not an activation site"),
    (RECORD, {"h.1.mlp.act": None}, "is null"),
    (RECORD, {"h.1.mlp.act": "gemm"}, "'gemm'"),
    (RECORD, {"h.1.mlp.act": 2}, "is of type int"),
    (RECORD, ["h.1.mlp.act", "gem"], "must be a JSON object"),
    (RECORD, "gem", "must be a JSON object"),
    (BLEND, {"h.1.mlp.act": {"t": 0.5}}, "has no 'from'"),
    (BLEND, {"h.1.mlp.act": "gelu_new"}, "must be an object"),
    (BLEND, {"h.1.mlp.act": {"from": "gelu_new", "t": "half"}}, "it must be a number in [0, 1]"),
    (BLEND, {"h.1.mlp.act": {"from": "gelu_new", "t": 1.5}}, "it must be a number in [0, 1]"),
    (BLEND, {"h.1.mlp.act": {"from": "gelu_new", "t": True}}, "it must be a number in [0, 1]"),
    (BLEND, {"h.1.mlp.act": {"from": "gelu_new"}}, "has no 't'"),
    (BLEND, {"h.1.mlp.act": {"from": None, "t": 0.5}}, "'from' is null"),
    (BLEND, {"h.1.mlp.act": {"from": "gelu_new", "t": 0.5, "tt": 1}}, "unknown field(s) ['tt']"),
    (BLEND, {"h.1.mlp.acts": {"from": "gelu_new", "t": 0.5}}, "names no module"),
    (BLEND, [{"from": "gelu_new", "t": 0.5}], "must be a JSON object"),
]


@pytest.mark.parametrize("attr, value, problem", MALFORMED, ids=[f"{a[10:]}-{p[:18]}" for a, _, p in MALFORMED])
def test_malformed_record_raises_naming_entry_and_file(plain_dir, tmp_path, attr, value, problem):
    folder = _edited_copy(plain_dir, tmp_path / "c", **{attr: value})
    with pytest.raises(ConfigRecordError) as info:
        GPT2LMHeadModel.from_pretrained(folder)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{folder / 'config.json'}: {attr}")
    if isinstance(value, dict):
        assert f"[{next(iter(value))!r}]" in message
    assert problem in message


def test_typo_below_the_first_step_is_caught_in_the_base_class_too(plain_dir, tmp_path):
    folder = _edited_copy(plain_dir, tmp_path / "c", hf_gemact_activations={"h.1.mlp.actt": "gem"})
    with pytest.raises(ConfigRecordError, match=r"\['h.1.mlp.actt'\] names no module of GPT2Model"):
        GPT2Model.from_pretrained(folder)


def test_head_of_another_class_is_skipped_and_applied_where_it_exists(tmp_path):
    # BertForMaskedLM pins its MLM-head transform when hidden_act becomes gem; BertModel lacks
    # that head, so loading the checkpoint into BertModel skips the entry (and BertForMaskedLM,
    # which builds a BertModel inside itself, still applies it)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    mlm = BertForMaskedLM(config)
    hf_gemact.patch_activations(mlm, "gem")
    mlm.save_pretrained(tmp_path / "mlm")
    saved = json.loads((tmp_path / "mlm" / "config.json").read_text())
    assert saved[RECORD] == {"cls.predictions.transform.transform_act_fn": "gelu"}
    reloaded = BertForMaskedLM.from_pretrained(tmp_path / "mlm")
    assert type(reloaded.cls.predictions.transform.transform_act_fn).__name__ == "GELUActivation"
    base = BertModel.from_pretrained(tmp_path / "mlm")
    assert [type(layer.intermediate.intermediate_act_fn) for layer in base.encoder.layer] == [hf_gemact.GEM] * 2


def test_base_model_built_inside_a_task_model_leaves_the_head_entry_to_it(tmp_path):
    # config.save_pretrained keeps a stale architectures list: here it says BertModel while the
    # record was written by BertForMaskedLM. The BertModel that BertForMaskedLM builds inside itself
    # lacks the head, and must leave that entry to the outer model instead of calling it a typo.
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, architectures=["BertModel"])
    mlm = BertForMaskedLM(config)
    hf_gemact.patch_activations(mlm, "gem")
    mlm.config.save_pretrained(tmp_path)
    reread = transformers.AutoConfig.from_pretrained(tmp_path)
    assert reread.architectures == ["BertModel"] and RECORD in reread.to_dict()
    rebuilt = BertForMaskedLM(reread)
    assert type(rebuilt.cls.predictions.transform.transform_act_fn).__name__ == "GELUActivation"
    assert type(rebuilt.bert.encoder.layer[1].intermediate.intermediate_act_fn) is hf_gemact.GEM


def test_in_memory_config_names_no_file(plain_dir):
    config = GPT2LMHeadModel.from_pretrained(plain_dir).config
    config.hf_gemact_activations = {"h.1.mlp.actt": "gem"}
    with pytest.raises(ConfigRecordError, match=r"^the model's config: hf_gemact_activations\['h.1.mlp.actt'\]"):
        GPT2LMHeadModel(config)


# -------------------------------------------------------------------------------- wrapped models


@pytest.fixture
def gpt2(plain_dir):
    return GPT2LMHeadModel.from_pretrained(plain_dir).eval()


def _direct(gpt2, act, **kw):
    """The independent reference: the same patch on an unwrapped copy."""
    twin = copy.deepcopy(gpt2)
    hf_gemact.patch_activations(twin, act, **kw)
    return twin


class Holder(nn.Module):
    """A custom wrapper holding the transformers model as an attribute (plus its own layer)."""

    def __init__(self, model):
        super().__init__()
        self.backbone = model
        self.extra = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, **batch):
        return self.backbone(**batch)


def _compiled(model):
    return torch.compile(model, backend="eager")


@pytest.mark.parametrize("wrap", [nn.DataParallel, Holder, _compiled], ids=["DataParallel", "custom", "compile"])
def test_surgery_through_a_wrapper_patches_the_inner_model(gpt2, batch, wrap):
    reference = copy.deepcopy(gpt2)
    wrapped = wrap(gpt2)
    before = _logits(wrapped, batch)  # a compiled model is traced here, before the patch
    report = hf_gemact.patch_activations(wrapped, "gem", layers=[-1], blend=True)
    assert [c.path for c in report.changes] == ["transformer.h.2.mlp.act"]  # paths of the inner model
    assert gpt2.config.activation_function == "gem" and RECORD in gpt2.config.to_dict()
    hf_gemact.set_blend(wrapped, 0.25)
    assert surgery.get_blend(wrapped) == 0.25
    twin = _direct(reference, "gem", layers=[-1], blend=True)
    hf_gemact.set_blend(twin, 0.25)
    assert torch.equal(_logits(wrapped, batch), _logits(twin, batch))
    drift = hf_gemact.activation_drift(wrap(reference), wrapped, batch)
    assert drift.loss_before is not None  # the inner causal LM was recognised through the wrapper
    assert drift.rel_error == hf_gemact.activation_drift(reference, twin, batch).rel_error
    hf_gemact.set_blend(wrapped, 1.0)
    hf_gemact.finalize_blend(wrapped)
    assert isinstance(gpt2.transformer.h[2].mlp.act, hf_gemact.GEM)
    hf_gemact.restore_activations(wrapped)
    assert torch.equal(_logits(wrapped, batch), before)
    assert gpt2.config.activation_function == "gelu_new" and RECORD not in gpt2.config.to_dict()


def test_custom_wrapper_with_two_models_says_which_to_pass(gpt2):
    pair = nn.Module()
    pair.student, pair.teacher = gpt2, copy.deepcopy(gpt2)
    with pytest.raises(SurgeryError, match=r"holds 2 transformers models \(student, teacher\).*wrapper\.student"):
        hf_gemact.patch_activations(pair, "gem")
    assert not any(isinstance(m, hf_gemact.GEM) for m in pair.modules())


@pytest.fixture
def gloo_group(tmp_path):
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_unwraps_parameter_free_changes_and_refuses_parameter_changes(gpt2, batch, gloo_group):
    from torch.nn.parallel import DistributedDataParallel

    reference = copy.deepcopy(gpt2)
    ddp = DistributedDataParallel(gpt2)
    hf_gemact.patch_activations(ddp, "gem", layers=[0])
    assert gpt2.config.activation_function == "gem"
    assert torch.equal(_logits(ddp, batch), _logits(_direct(reference, "gem", layers=[0]), batch))
    # VeLU brings a parameter (lam) that DDP, built before it, would never synchronise
    with pytest.raises(SurgeryError, match="before wrapping it in DistributedDataParallel"):
        hf_gemact.patch_activations(ddp, "velu")
    assert _acts(gpt2) == ["GEM", "NewGELUActivation", "NewGELUActivation"]  # untouched by the refusal
    hf_gemact.restore_activations(ddp)
    assert torch.equal(_logits(ddp, batch), _logits(reference, batch))

    velu_then_gem = _direct(reference, "velu")
    hf_gemact.patch_activations(velu_then_gem, "gem", blend=True)  # the old branch is VeLU, with lam
    ddp = DistributedDataParallel(velu_then_gem)
    hf_gemact.set_blend(ddp, 1.0)  # t is not a parameter: fine under DDP
    assert surgery.get_blend(ddp) == 1.0
    with pytest.raises(SurgeryError, match="finalize_blend on a DistributedDataParallel"):
        hf_gemact.finalize_blend(ddp)
    assert all(isinstance(b.mlp.act, BlendedActivation) for b in velu_then_gem.transformer.h)
