"""Activation surgery: swap the feed-forward activations of an already-built HF model in place.

    report = hf_gemact.patch_activations(model, "gem", layers=slice(-2, None))   # last 2 blocks
    hf_gemact.restore_activations(model)                                        # bit-identical undo

    hf_gemact.patch_activations(model, "gem", blend=True)   # each site: (1-t)*old(x) + t*new(x), t=0
    hf_gemact.set_blend(model, 0.5); ...; hf_gemact.set_blend(model, 1.0)
    hf_gemact.finalize_blend(model)                         # drop the old branch

How a patch is recorded in the config (see docs/SURGERY.md):
  * the family's own attribute (``activation_function`` for GPT-2, ``hidden_act`` for BERT/ViT,
    ...) is set to the most common activation of the MLP sites, preferring hf_gemact names, so that
    a process that did not ``import hf_gemact`` fails loudly instead of building the old model;
  * ``config.hf_gemact_activations = {site key: name}`` lists every site whose activation differs
    from what the native constructor would build from that attribute (per-layer patches, and head
    sites that read the same attribute but were not patched). A site key is the module path
    relative to the base model (``h.10.mlp.act``), or the full path for sites outside it;
  * ``config.hf_gemact_blend = {site key: {"from": old name, "t": t}}`` lists blended sites.
  A hook on ``PreTrainedModel.post_init`` (installed by ``import hf_gemact``, integration.py) rebuilds the recorded
  sites whenever a model is constructed from such a config, before the weights are loaded, so
  ``from_pretrained`` and ``from_config`` give exactly the patched architecture.

The package, one concern a file (each imports only those listed above it):
  errors.py    SurgeryError and its kinds
  blend.py     BlendedActivation, the (1 - t) * old + t * new site
  sites.py     finding sites (role, block), naming what a site computes, `layers` selection
  record.py    the config record and the per-model state that `restore_activations` undoes
  wrappers.py  DataParallel / DDP / torch.compile / holder modules: which model a call works on
  rebuild.py   `apply_config_record`: the recorded activations rebuilt when a model is constructed
  fit.py       calibrated surgery: a family's free parameters fitted to the old activation (float64)
  calibrate.py calibrated surgery: the per-site passes over the calibration data and the bias correction
  api.py       patch_activations, restore_activations, set_blend, get_blend, finalize_blend
  drift.py     activation_drift
"""

from ..registry import UnknownActivationError
from .api import SiteChange, SurgeryReport, finalize_blend, get_blend, patch_activations, restore_activations, set_blend
from .blend import BlendedActivation
from .drift import DriftReport, activation_drift
from .errors import ConfigRecordError, LayerSelectionError, NoActivationError, SurgeryError
from .rebuild import apply_config_record
from .record import _STATE, BLEND_ATTR, RECORD_ATTR, describe_sites, site_history
from .sites import Site, canonical_name, find_sites, guess_name
from .wrappers import _unwrap

__all__ = [
    "BlendedActivation", "ConfigRecordError", "DriftReport", "LayerSelectionError", "NoActivationError", "Site",
    "SurgeryError", "SurgeryReport", "UnknownActivationError", "activation_drift",
    "apply_config_record", "find_sites", "finalize_blend", "get_blend", "guess_name",
    "patch_activations", "restore_activations", "set_blend",
    "BLEND_ATTR", "RECORD_ATTR", "SiteChange", "canonical_name", "describe_sites", "site_history",
]
_KEPT_PRIVATE = (_STATE, _unwrap)  # importable from here as before the split
