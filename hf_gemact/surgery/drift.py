"""How far a patch moves a model on a batch: hidden-state error, output KL, loss before and after."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .wrappers import _unwrap


@dataclass
class DriftReport:
    rel_error: float  # ||h_patched - h_ref|| / ||h_ref|| of the last hidden state (non-padding positions)
    kl: float | None = None  # mean KL(ref || patched) of the output distributions (next token for LMs)
    loss_before: float | None = None
    loss_after: float | None = None

    def __str__(self) -> str:
        parts = [f"last-hidden-state relative error {self.rel_error:.4g}"]
        if self.kl is not None:
            parts.append(f"KL(ref||patched) {self.kl:.4g} nats")
        if self.loss_before is not None:
            parts.append(f"loss {self.loss_before:.4f} -> {self.loss_after:.4f}")
        return "drift: " + ", ".join(parts)


def _is_causal_lm(model) -> bool:
    return type(model).__name__.endswith(("LMHeadModel", "ForCausalLM"))


@torch.no_grad()
def activation_drift(reference_model: nn.Module, patched_model: nn.Module, batch: dict) -> DriftReport:
    """How far a patch moves a model on `batch` (a dict of model inputs): relative error of the last
    hidden state (over non-padding positions when the batch has an attention_mask); when the models return logits, the mean KL(ref || patched) of the output
    distributions (for causal LMs: next-token distributions over non-padding positions) and, for
    causal LMs or when `batch` has labels, the loss of each model."""
    reference_model, _ = _unwrap(reference_model, "activation_drift")
    patched_model, _ = _unwrap(patched_model, "activation_drift")
    batch = dict(batch)
    mask = batch.get("attention_mask")
    if _is_causal_lm(reference_model) and "labels" not in batch and "input_ids" in batch:
        labels = batch["input_ids"].clone()
        if mask is not None:
            labels[mask == 0] = -100
        batch["labels"] = labels
    outs = []
    for model in (reference_model, patched_model):
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            outs.append(model(**inputs, output_hidden_states=True, return_dict=True))
        finally:
            model.train(was_training)
    ref, new = outs

    def last_hidden(out):
        h = getattr(out, "last_hidden_state", None)
        return h if h is not None else out.hidden_states[-1]

    h0, h1 = last_hidden(ref).float(), last_hidden(new).float().to(last_hidden(ref).device)
    if mask is not None and h0.dim() == 3 and h0.shape[:2] == mask.shape:
        # padding positions are no data: their states are whatever the model makes of a pad token
        keep = mask.to(h0.device).bool()
        h0, h1 = h0[keep], h1[keep]
    rel = (torch.linalg.vector_norm(h1 - h0) / torch.linalg.vector_norm(h0).clamp_min(1e-30)).item()
    report = DriftReport(rel)
    logits0, logits1 = getattr(ref, "logits", None), getattr(new, "logits", None)
    if torch.is_tensor(logits0) and torch.is_tensor(logits1):
        lp0 = torch.log_softmax(logits0.float(), -1)
        lp1 = torch.log_softmax(logits1.float().to(lp0.device), -1)
        kl = (lp0.exp() * (lp0 - lp1)).sum(-1)
        if kl.dim() == 2 and mask is not None and mask.shape == kl.shape:
            m = mask.to(kl.device).float()
            report.kl = ((kl * m).sum() / m.sum().clamp_min(1)).item()
        else:
            report.kl = kl.mean().item()
    if getattr(ref, "loss", None) is not None and getattr(new, "loss", None) is not None:
        report.loss_before, report.loss_after = ref.loss.item(), new.loss.item()
    return report
