"""Calibrated surgery: fit the new activation to what each site computed before the patch, and fold
the remaining mean error of every hidden unit into the bias of the projection that reads it.

Sites are calibrated one after another, in module order, on the model as patched so far, against
an unpatched copy (the reference), the way sequential post-training quantization corrects biases:
at each site the target is the reference's activation output, the input is the patched model's
(which carries the drift of the sites before it), so the correction removes that drift's mean too.
Per site, two passes over the calibration batches (each runs both models):
  1. a reservoir sample of (patched input, reference output) pairs, fixed memory; the family's free
     parameters are fitted on it (fit.py);
  2. per hidden unit, exact sums over every calibration position of e = reference(x) - fitted(x'),
     e^2 and (reference(x) - plain(x'))^2, plain being the requested activation as named.
The bias correction d = mean(e) per unit enters the reading projection P as bias += W d, so P's mean
output over the calibration data is the reference's. The errors reported are exact over those
positions: plain = mean((reference - plain)^2), fitted = mean(e^2), calibrated = mean((e - d)^2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from ..modules import VeLU
from ..site_record import NEAR_ZERO, SiteRecord, _rows
from .errors import SurgeryError
from .fit import fit_activation
from .sites import _build, _reference_tensor

# Reservoir values per site for the fit (what stats.DEFAULT_SAMPLE_SIZE keeps).
CALIBRATION_SAMPLE_SIZE = 65536


@dataclass
class SiteCalibration:
    fitted: str  # the site's new activation name
    note: str  # what the fit did
    mse_plain: float  # requested name as given, no bias correction
    mse_fitted: float  # fitted parameters, no bias correction
    mse_calibrated: float  # fitted parameters and the bias correction (= mse_fitted when skipped)
    projection: str | None  # path of the projection whose bias took the correction
    skipped: str | None  # why there was no bias correction
    positions: int  # calibration positions (rows) the errors are over

    def __str__(self) -> str:
        bias = f"bias folded into {self.projection}" if self.projection else f"no bias correction: {self.skipped}"
        return (f"{self.fitted}: MSE to the old activation {self.mse_plain:.3e} as named -> {self.mse_fitted:.3e} "
                f"fitted -> {self.mse_calibrated:.3e} calibrated ({bias}; {self.note}; {self.positions} positions)")


def _weight_in_out(module):
    """(weight as (out, in), in features) of a linear-like module, or None: nn.Linear and
    transformers' Conv1D (GPT-2, whose weight is stored (in, out))."""
    if isinstance(module, nn.Linear):
        return module.weight, module.in_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):
        return module.weight.t(), module.nx
    return None


def _linear_children(module):
    return [(name, m) for name, m in module.named_modules() if _weight_in_out(m) is not None]


def _inferred_projection(site, block, units):
    """The generic recipe's rule: the one linear-like module of the site's parent (else of its
    block) that reads `units` features, when exactly one linear-like module writes them (a gated
    MLP multiplies the activation by a second projection: its mean error is no bias)."""
    for scope, root in (("parent", site.parent), ("block", block)):
        if root is None:
            continue
        children = _linear_children(root)
        readers = [(n, m) for n, m in children if _weight_in_out(m)[1] == units]
        writers = [(n, m) for n, m in children if _weight_in_out(m)[0].shape[0] == units]
        if len(writers) > 1:
            return None, (f"{len(writers)} projections in its {scope} write {units} features (a gated MLP?): the "
                          f"activation's error is multiplied, not added")
        if len(readers) == 1:
            return readers[0][1], None
        if len(readers) > 1:
            return None, f"{len(readers)} projections in its {scope} read {units} features: which one reads it is unclear"
    return None, "no projection reading its output was found"


def _projection(site, model, recipe, units):
    """(module, path) of the projection that reads the site's output, or (None, why)."""
    block = model.get_submodule(f"{site.stack}.{site.block}") if site.stack is not None else None
    found, why = None, None
    if recipe.projections is None:
        found, why = _inferred_projection(site, block, units)
    else:
        for path in recipe.projections:
            root, rest = (block, path[len("block."):]) if path.startswith("block.") else (site.parent, path)
            try:
                found = root.get_submodule(rest) if root is not None else None
            except AttributeError:
                found = None
            if found is not None:
                break
        if found is None:
            why = f"the {recipe.family} recipe's projection ({', '.join(recipe.projections)}) is not there"
    if found is None:
        return None, why
    shape = _weight_in_out(found)
    if shape is None or shape[1] != units:
        return None, f"{type(found).__name__} does not read {units} features"
    if getattr(found, "bias", None) is None:
        return None, "the projection has no bias"
    path = next(name for name, m in model.named_modules() if m is found)
    return found, path


def check_batches(batches) -> list:
    if isinstance(batches, Mapping) or torch.is_tensor(batches):
        raise SurgeryError("calibrate takes an iterable of batches (dicts of model inputs, model(**batch)), e.g. "
                           "[tokenizer(texts, return_tensors='pt', padding=True)] or a DataLoader; got one "
                           f"{type(batches).__name__}: wrap it in a list")
    try:
        batches = list(batches)
    except TypeError:
        raise SurgeryError(f"calibrate must be an iterable of dicts of model inputs, got {type(batches).__name__}") from None
    if not batches:
        raise SurgeryError("calibrate: no calibration batch (the iterable was empty); pass a few batches of the data "
                           "the model will see")
    for batch in batches:
        if not isinstance(batch, Mapping):
            raise SurgeryError(f"calibrate: each batch must be a dict of model inputs (model(**batch)), got "
                               f"{type(batch).__name__}")
    return batches


def _evaluate(module, x):
    with torch.no_grad():
        y = module(x)
    if isinstance(module, VeLU):
        module.clear_aux_loss()
    return y


class _Paired:
    """Runs the reference and the patched model on one batch and hands over, for one site, the
    patched model's input rows and the reference's output rows (padding positions dropped)."""

    def __init__(self, model, reference, site):
        self.model, self.reference = model, reference
        self.site_module = site.module
        self.reference_module = reference.get_submodule(site.path)

    def __call__(self, batch):
        seen = {}
        device = _reference_tensor(self.model).device
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        mask = inputs.get("attention_mask")

        def keep(name, take_input):
            def hook(module, args, output):
                seen[name] = _rows((args[0] if take_input else output).detach(), mask)
            return hook

        for model, module, name, take_input in ((self.reference, self.reference_module, "y", False),
                                                 (self.model, self.site_module, "x", True)):
            handle = module.register_forward_hook(keep(name, take_input))
            try:
                with torch.no_grad():
                    model(**inputs)
            finally:
                handle.remove()
        return seen["x"], seen["y"]


def _in_eval_mode(models):
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    return modes


def calibrate_site(model, reference, site, name, batches, recipe, reference_tensor):
    """(fitted module, SiteCalibration, projection or None, bias correction in the projection's output
    space) for one site of `model` (patched so far) against `reference` (the unpatched copy).
    Nothing is changed: the caller installs the module and folds the correction."""
    paired = _Paired(model, reference, site)
    modes = _in_eval_mode((model, reference))
    try:
        record = SiteRecord(site, sample_size=CALIBRATION_SAMPLE_SIZE, near_zero=NEAR_ZERO, seed=0, unit_fns={})
        for batch in batches:
            x, y = paired(batch)
            record.observe(x, y, None)
        fit = fit_activation(name, record.sample(), record.sample_output(), record.sample_row_mean_square())
        module = _build(fit.name, reference_tensor).eval()
        if fit.lam is not None:
            with torch.no_grad():
                module.lam.fill_(fit.lam)
        plain = _build(name, reference_tensor).eval()
        sums, positions = {}, 0
        for batch in batches:
            x, y = paired(batch)
            target = y.double()
            error = target - _evaluate(module, x).double()
            for key, value in (("error", error), ("error2", error.square()),
                               ("plain2", (target - _evaluate(plain, x).double()).square())):
                total = value.sum(0)
                sums[key] = sums[key] + total if key in sums else total
            positions += x.shape[0]
    finally:
        for m, training in modes:
            m.training = training
    mean = {key: value / max(positions, 1) for key, value in sums.items()}
    d = mean["error"]
    mse_fitted = float(mean["error2"].mean())
    projection, where = _projection(site, model, recipe, d.numel())
    correction = None
    mse_calibrated = mse_fitted
    if projection is not None:
        correction = _weight_in_out(projection)[0].detach().double().to(d.device) @ d
        mse_calibrated = float((mean["error2"] - d.square()).clamp_min(0).mean())
    calibration = SiteCalibration(fit.name, fit.note, float(mean["plain2"].mean()), mse_fitted, mse_calibrated,
                                  where if projection is not None else None,
                                  None if projection is not None else where, positions)
    return module, calibration, projection, correction


def fold_bias(projection, correction) -> None:
    with torch.no_grad():
        bias = projection.bias
        bias.copy_((bias.double() + correction.to(bias.device)).to(bias.dtype))
