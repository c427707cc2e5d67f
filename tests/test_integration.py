"""Integration with stock transformers code (issue 12): VeLU's W2 term in `outputs.loss`, Trainer's
weight decay, BlendCallback, PEFT adapters. Every expectation is computed here, independently of
hf_gemact's own bookkeeping: a float64 copy of the model whose VeLU modules are replaced by the
formula written out below."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from packaging import version
from torch import nn

import hf_gemact
from hf_gemact.modules import VeLU

VOCAB, SEQ = 97, 16


# ----------------------------------------------------------------------------- reference


class RefVeLU(nn.Module):
    """VeLU and its W2 term written from the definition (README), float64; appends its terms."""

    def __init__(self, module: VeLU, terms: list):
        super().__init__()
        self.p, self.lam, self.terms = module, module.lam, terms

    def forward(self, x):
        p, x = self.p, x.double()
        s = 1 + p.gamma * torch.tanh(p.mu / torch.sqrt((x ** 2).mean(p.dim, keepdim=True) + p.eps))
        g = torch.sigmoid(p.alpha * (torch.atan(p.beta1 * x) + torch.asin(torch.clamp(p.beta2 * x, -1, 1))))
        y = x * g * s
        self.terms.append(p.lambda_ot * (y.mean() ** 2 + (y.std(unbiased=False) - 1) ** 2))
        return self.lam.double() * y


def reference_model(model):
    """(float64 copy with RefVeLU sites, list that collects the W2 terms of each forward)."""
    ref = copy.deepcopy(model).double()
    terms = []
    for name, module in list(ref.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, VeLU):
                setattr(module, child_name, RefVeLU(child, terms))
    return ref, terms


def causal_ce(logits, labels, reduction="mean"):
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), labels[:, 1:].flatten(),
                                       ignore_index=-100, reduction=reduction)


def tiny_gpt2(act="velu_alpha2_beta11_beta20.7", seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=SEQ, activation_function=act,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def batch(n=4, seed=0):
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def expected_loss(model, inputs, train=True):
    """task loss + (in training) the W2 terms, from the reference."""
    ref, terms = reference_model(model)
    ref.train(train)
    logits = ref(input_ids=inputs["input_ids"]).logits
    task = causal_ce(logits, inputs["labels"])
    return task + (sum(terms) if train else 0.0), task


def velu_count(model):
    return sum(isinstance(m, VeLU) for m in model.modules())


# ----------------------------------------------------------------------------- outputs.loss


def test_training_loss_holds_w2_terms_and_eval_loss_does_not():
    model, inputs = tiny_gpt2(), batch()
    total, task = expected_loss(model, inputs)
    assert (total - task).item() > 1e-2  # the term is large enough for the checks below to see it
    model.train()
    torch.testing.assert_close(model(**inputs).loss.double(), total, rtol=1e-5, atol=1e-6)
    model.eval()
    torch.testing.assert_close(model(**inputs).loss.double(), task, rtol=1e-5, atol=1e-6)
    # return_dict=False: the loss is the first element
    model.train()
    torch.testing.assert_close(model(**inputs, return_dict=False)[0].double(), total, rtol=1e-5, atol=1e-6)


def test_a_loss_that_holds_the_terms_is_not_given_them_twice_by_auxiliary_loss():
    model, inputs = tiny_gpt2().train(), batch()
    total, _ = expected_loss(model, inputs)
    loss = model(**inputs).loss + hf_gemact.auxiliary_loss(model)  # the pattern README showed
    torch.testing.assert_close(loss.double(), total, rtol=1e-5, atol=1e-6)
    # from logits (no labels): the terms are left for auxiliary_loss
    logits = model(input_ids=inputs["input_ids"]).logits
    from_logits = causal_ce(logits, inputs["labels"]) + hf_gemact.auxiliary_loss(model)
    torch.testing.assert_close(from_logits, total, rtol=1e-5, atol=1e-6)


def test_gradient_of_training_loss_includes_w2_terms():
    model, inputs = tiny_gpt2().train(), batch()
    ref, terms = reference_model(model)
    (causal_ce(ref(input_ids=inputs["input_ids"]).logits, inputs["labels"]) + sum(terms)).backward()
    model(**inputs).loss.backward()
    weight = "transformer.h.0.mlp.c_fc.weight"
    got, want = dict(model.named_parameters())[weight].grad, dict(ref.named_parameters())[weight].grad
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("route", ["from_pretrained", "surgery", "peft", "ddp", "compile"])
def test_loss_holds_terms_on_every_route(route, tmp_path):
    inputs = batch()
    if route == "from_pretrained":
        from transformers import AutoModelForCausalLM

        tiny_gpt2().save_pretrained(tmp_path)
        model = AutoModelForCausalLM.from_pretrained(tmp_path)
        reference = model
    elif route == "surgery":
        model = tiny_gpt2("gelu_new")
        hf_gemact.patch_activations(model, "velu_alpha2_beta11_beta20.7")
        reference = model
    elif route == "peft":
        from peft import LoraConfig, get_peft_model

        reference = tiny_gpt2()
        model = get_peft_model(copy.deepcopy(reference), LoraConfig(r=2, target_modules=["c_attn"]))
    elif route == "ddp":
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
        reference = tiny_gpt2()
        model = nn.parallel.DistributedDataParallel(reference)
    else:
        reference = tiny_gpt2()
        model = torch.compile(reference, backend="eager")
    try:
        model.train()
        total, task = expected_loss(reference, inputs)
        torch.testing.assert_close(model(**inputs).loss.double(), total, rtol=1e-5, atol=1e-6)
        model.eval()
        torch.testing.assert_close(model(**inputs).loss.double(), task, rtol=1e-5, atol=1e-6)
    finally:
        if route == "ddp":
            torch.distributed.destroy_process_group()


def test_restored_surgery_leaves_no_term_behind():
    plain = tiny_gpt2("gelu_new")
    model = copy.deepcopy(plain)
    hf_gemact.patch_activations(model, "velu")
    hf_gemact.restore_activations(model)
    inputs = batch()
    plain.train(), model.train()
    assert torch.equal(model(**inputs).loss, plain(**inputs).loss)
    assert velu_count(model) == 0 and hf_gemact.auxiliary_loss(model).item() == 0.0


# ----------------------------------------------------------------------------- copies and graphs


def test_model_deep_copies_after_a_training_forward_and_keeps_no_graph():
    model, inputs = tiny_gpt2().train(), batch()
    model(input_ids=inputs["input_ids"])  # no labels: the terms wait for auxiliary_loss
    twin = copy.deepcopy(model)  # raised "Only Tensors created explicitly by the user ..." before
    assert velu_count(twin) == 2
    # the modules let go of the term's graph once the step has used it
    velus = [m for m in model.modules() if isinstance(m, VeLU)]
    assert all(m.pending_aux_loss.grad_fn is not None for m in velus)
    hf_gemact.auxiliary_loss(model).backward()
    assert all(m.pending_aux_loss is None and m.last_aux_loss.grad_fn is None for m in velus)
    # a loss that took the terms over owns their graph; the modules keep only a detached value
    loss = model(**inputs).loss
    assert all(m.pending_aux_loss is None and not m.last_aux_loss.requires_grad
               for m in model.modules() if isinstance(m, VeLU))
    copy.deepcopy(model)
    loss.backward()


def test_a_training_term_that_reaches_no_loss_is_reported():
    import hf_gemact.modules as modules

    modules._dropped_warned = False
    model, inputs = tiny_gpt2().train(), batch()
    model(input_ids=inputs["input_ids"]).logits.sum().backward()  # a user loss without the term
    with pytest.warns(RuntimeWarning, match="reached no loss"):
        model(input_ids=inputs["input_ids"])
    modules._dropped_warned = False


# ----------------------------------------------------------------------------- Trainer


# Trainer's gradient-accumulation scaling took its present form (num_items_in_batch passed to the
# model, `loss / steps` otherwise) in the 4.5x series, and the 4.4x Trainer cannot resume its own
# checkpoints under torch >= 2.6 (its RNG state file needs weights_only=False).
MODERN_TRAINER = version.parse(transformers.__version__) >= version.parse("4.50")
needs_modern_trainer = pytest.mark.skipif(not MODERN_TRAINER, reason="Trainer of transformers < 4.50 "
                                          "scales accumulated losses otherwise and cannot resume under torch >= 2.6")


def _trainer(model, tmp_path, callbacks=None, **overrides):
    from transformers import Trainer, TrainingArguments

    kwargs = dict(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=2, learning_rate=1e-3,
                  max_steps=1, max_grad_norm=0.0, weight_decay=0.1, report_to=[], use_cpu=True, save_strategy="no",
                  logging_steps=1, disable_tqdm=True, seed=0, dataloader_drop_last=True)
    kwargs.update(overrides)
    data = [{"input_ids": ids, "labels": ids.clone()} for ids in batch(8, seed=1)["input_ids"]]
    return Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=data, callbacks=callbacks)


class GradientProbe:
    """Records the micro-batches a model sees and the gradients just before the optimizer step."""

    def __init__(self, model, names):
        from transformers import TrainerCallback

        self.batches, self.grads, probe = [], {}, self
        model.register_forward_pre_hook(
            lambda m, args, kwargs: probe.batches.append(kwargs["input_ids"].clone()) if m.training else None,
            with_kwargs=True)

        class Callback(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
                params = dict(model.named_parameters())
                probe.grads = {n: params[n].grad.detach().clone() for n in names}

        self.callback = Callback()


@needs_modern_trainer
@pytest.mark.parametrize("num_items_path", [True, False], ids=["num_items_in_batch", "divided_by_steps"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_stock_trainer_gradient_is_task_plus_w2_with_accumulation(accumulation, num_items_path, tmp_path):
    model = tiny_gpt2()
    initial = copy.deepcopy(model)
    names = ["transformer.h.0.mlp.c_fc.weight", "transformer.wte.weight"]
    probe = GradientProbe(model, names)
    trainer = _trainer(model, tmp_path, per_device_train_batch_size=4 // accumulation,
                       gradient_accumulation_steps=accumulation)
    trainer.add_callback(probe.callback)
    if not num_items_path:
        trainer.model_accepts_loss_kwargs = False  # Trainer then divides each loss by the steps
    assert trainer.model_accepts_loss_kwargs == num_items_path
    trainer.train()
    assert len(probe.batches) == accumulation

    # The step's loss, written out: each micro-batch's task loss with Trainer's normalisation and
    # its W2 terms with weight 1/accumulation (equal token counts), i.e. the same per-step weight.
    ref, terms = reference_model(initial)
    ref.train()
    total_items = sum(ids.numel() for ids in probe.batches)  # Trainer counts every label of GPT-2
    objective, task_only = 0.0, 0.0
    for ids in probe.batches:
        terms.clear()
        logits = ref(input_ids=ids).logits
        if num_items_path:
            task = causal_ce(logits, ids, reduction="sum") / total_items
        else:
            task = causal_ce(logits, ids) / accumulation
        objective = objective + task + sum(terms) / accumulation
        task_only = task_only + task
    want = torch.autograd.grad(objective, [dict(ref.named_parameters())[n] for n in names], retain_graph=True)
    without_w2 = torch.autograd.grad(task_only, [dict(ref.named_parameters())[n] for n in names])
    for name, w, wo in zip(names, want, without_w2):
        assert (w - wo).abs().max() > 100 * 1e-6  # the term moves this gradient measurably
        torch.testing.assert_close(probe.grads[name].double(), w, rtol=1e-4, atol=1e-6)


def test_trainer_puts_activation_parameters_in_the_zero_decay_group(tmp_path):
    model = tiny_gpt2()
    trainer = _trainer(model, tmp_path)
    optimizer = trainer.create_optimizer()
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    lams = [m.lam for m in model.modules() if isinstance(m, VeLU)]
    assert lams and all(decay_of[id(lam)] == 0.0 for lam in lams)
    assert decay_of[id(model.transformer.h[0].mlp.c_fc.weight)] == 0.1  # ordinary weights still decay


# ----------------------------------------------------------------------------- BlendCallback


def blended_velu_gpt2():
    model = tiny_gpt2("gelu_new")
    hf_gemact.patch_activations(model, "velu_alpha2_beta11_beta20.7", blend=True)
    return model


def t_probe(model):
    """t of the blended sites at each training forward (None once finalized), seen from outside."""
    from hf_gemact.surgery import BlendedActivation

    seen = []

    def record(module, args, kwargs):
        if module.training:
            ts = {m.t for m in module.modules() if isinstance(m, BlendedActivation)}
            seen.append(ts.pop() if len(ts) == 1 else (None if not ts else sorted(ts)))

    model.register_forward_pre_hook(record, with_kwargs=True)
    return seen


def lams(model):
    return [m.lam.detach().clone() for m in model.modules() if isinstance(m, VeLU)]


def test_blend_callback_ramps_finalizes_and_saves_the_state_of_each_step(tmp_path):
    import json

    from hf_gemact.surgery import BlendedActivation

    model = blended_velu_gpt2()
    seen = t_probe(model)
    trainer = _trainer(model, tmp_path, max_steps=6, save_strategy="steps", save_steps=2,
                       callbacks=[hf_gemact.BlendCallback(blend_steps=4)])
    trainer.train()
    assert seen == [0.25, 0.5, 0.75, 1.0, None, None]
    assert not any(isinstance(m, BlendedActivation) for m in model.modules())
    assert model.config.activation_function == "velu_alpha2_beta11_beta20.7"
    assert not getattr(model.config, "hf_gemact_blend", None)
    out = tmp_path / "trainer"
    saved = {step: json.loads((out / f"checkpoint-{step}" / "config.json").read_text()) for step in (2, 4, 6)}
    assert [entry["t"] for entry in saved[2]["hf_gemact_blend"].values()] == [0.5, 0.5]
    assert "hf_gemact_blend" not in saved[4] and saved[4]["activation_function"] == "velu_alpha2_beta11_beta20.7"
    assert all(lam.item() != 1.0 for lam in lams(model))  # lam trained through the blend


@needs_modern_trainer
def test_blend_callback_resumes_at_the_checkpoints_t(tmp_path):
    """Resumed mid-ramp and after it: the same t at every step and the same final weights."""
    model = blended_velu_gpt2()
    _trainer(model, tmp_path, max_steps=6, save_strategy="steps", save_steps=2,
             callbacks=[hf_gemact.BlendCallback(blend_steps=4)]).train()
    out = tmp_path / "trainer"
    for step, expected in ((2, [0.75, 1.0, None, None]), (4, [None, None])):
        again = blended_velu_gpt2()
        seen = t_probe(again)
        resumed = _trainer(again, tmp_path, max_steps=6, save_strategy="steps", save_steps=2,
                           callbacks=[hf_gemact.BlendCallback(blend_steps=4)])
        resumed.args.output_dir = str(tmp_path / f"resumed{step}")
        resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{step}"))
        assert seen == expected, step
        for a, b in zip(lams(again), lams(model)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(again.transformer.h[1].mlp.c_proj.weight, model.transformer.h[1].mlp.c_proj.weight,
                                   rtol=1e-6, atol=1e-7)


def test_blend_callback_without_a_blend_says_what_to_do(tmp_path):
    trainer = _trainer(tiny_gpt2(), tmp_path, callbacks=[hf_gemact.BlendCallback(blend_steps=2)])
    with pytest.raises(hf_gemact.surgery.SurgeryError, match="blend=True"):
        trainer.train()
    with pytest.raises(ValueError, match="blend_steps"):
        hf_gemact.BlendCallback(blend_steps=0)


# ----------------------------------------------------------------------------- PEFT


def test_lora_on_a_patched_model_trains_saves_and_reloads(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_gemact.integration import AdapterBaseMismatchError

    tiny_gpt2("gelu_new").save_pretrained(tmp_path / "base")
    act = "velu_alpha2_beta11_beta20.7"

    def patched_base():
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        hf_gemact.patch_activations(base, act)
        return base

    # modules_to_save=["act"]: VeLU's lam trains and is saved with the adapter
    model = get_peft_model(patched_base(), LoraConfig(r=4, target_modules=["c_attn", "c_fc"], modules_to_save=["act"]))
    trainer = _trainer(model, tmp_path, max_steps=3, learning_rate=1e-2)
    trainer.train()
    trained_lams = [m.lam.item() for m in model.modules() if isinstance(m, VeLU) and m.lam.requires_grad]
    assert len(trained_lams) == 2 and all(lam != 1.0 for lam in trained_lams)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "hf_gemact.json").is_file()

    inputs = batch(seed=5)
    model.eval()
    with torch.no_grad():
        want = model(**inputs).logits
    reloaded = PeftModel.from_pretrained(patched_base(), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, want)

    unpatched = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with pytest.raises(AdapterBaseMismatchError, match="patch_activations") as err:
        PeftModel.from_pretrained(unpatched, tmp_path / "adapter")
    assert "'gelu_new'" in str(err.value) and act in str(err.value)
    assert not any("lora" in name for name, _ in unpatched.named_parameters())  # refused before touching it
    other = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), LoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(AdapterBaseMismatchError):
        other.load_adapter(tmp_path / "adapter", adapter_name="velu")


# ----------------------------------------------------------------------------- docs/INTEGRATION.md


def test_integration_doc_example_runs(tmp_path, shared_data, monkeypatch):
    """The surgery + LoRA + Trainer example of docs/INTEGRATION.md, run as written, on a small local
    GPT-2 with the real GPT-2 tokenizer instead of the Hub's `gpt2`."""
    import re
    from pathlib import Path

    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    text = (Path(__file__).resolve().parents[1] / "docs" / "INTEGRATION.md").read_text()
    code = re.search(r"## Example.*?```python\n(.*?)```", text, re.S).group(1)
    assert code.count('checkpoint = "gpt2"') == 1
    local = tmp_path / "gpt2-small-local"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64)).save_pretrained(local)
    AutoTokenizer.from_pretrained(shared_data / "gpt2-tokenizer").save_pretrained(local)
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('checkpoint = "gpt2"', f"checkpoint = {str(local)!r}"), "INTEGRATION.md", "exec"), {})
    assert (tmp_path / "outputs" / "gpt2-velu-lora" / "adapter" / "hf_gemact.json").is_file()


# ----------------------------------------------------------------------------- the project's loop


def test_training_script_update_carries_the_w2_gradient(tmp_path, shared_data, monkeypatch):
    """One optimizer step of run_clm.py on a pretrained VeLU GPT-2. AdamW's first step moves a weight
    by -lr * g / (|g| + eps), so with lr = eps = 1 the saved weights give back the gradient g the
    loop used, which must be that of task loss + W2 terms (computed here from the reference)."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from hf_gemact.training import run

    monkeypatch.setenv("HF_GEMACT_CACHE", str(tmp_path / "cache"))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    block, samples = 32, 4
    tokenizer = AutoTokenizer.from_pretrained(shared_data / "gpt2-tokenizer")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=block, activation_function="velu_alpha2_beta11_beta20.7",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    text = (shared_data / "text" / "tinyshakespeare.txt").read_text()[:20_000]
    (tmp_path / "train.txt").write_text(text)
    run("clm", ["--model_name_or_path", str(tmp_path / "ckpt"), "--train_file", str(tmp_path / "train.txt"),
                "--validation_file", str(tmp_path / "train.txt"), "--block_size", str(block),
                "--max_train_samples", str(samples), "--per_device_train_batch_size", str(samples),
                "--max_eval_samples", "4", "--max_train_steps", "1", "--learning_rate", "1", "--adam_epsilon", "1",
                "--lr_scheduler_type", "constant", "--max_grad_norm", "0", "--output_dir", str(tmp_path / "out")])
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    name = "transformer.h.0.mlp.c_fc.weight"
    u = (dict(before.named_parameters())[name] - dict(after.named_parameters())[name]).double()
    got = u / (1 - u.abs())

    # the step's batch: the first `samples` blocks of the file (one batch, so its order does not matter)
    ids = [t for line in text.splitlines(keepends=True) for t in tokenizer(line)["input_ids"]]
    inputs = torch.tensor(ids[: samples * block]).view(samples, block)
    ref, terms = reference_model(before)
    ref.train()
    logits = ref(input_ids=inputs).logits
    task = causal_ce(logits, inputs)
    weight = dict(ref.named_parameters())[name]
    (with_w2,) = torch.autograd.grad(task + sum(terms), weight, retain_graph=True)
    (without,) = torch.autograd.grad(task, weight)
    assert (with_w2 - without).abs().max() > 1e-4
    torch.testing.assert_close(got, with_w2, rtol=1e-3, atol=1e-6)
