"""transformers.Trainer callbacks for patched models."""

from __future__ import annotations

from transformers import TrainerCallback

from .surgery import SurgeryError, finalize_blend, get_blend, set_blend


def _inner(model):
    """The transformers model under a PEFT wrapper (whose config records the blend)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


class BlendCallback(TrainerCallback):
    """Ramp every blended activation site (`patch_activations(..., blend=True)`) from t = 0 to 1
    linearly over `blend_steps` optimizer steps, as the training scripts' `--blend_steps` do:
    optimizer step k (1-based) runs at t = k / blend_steps, and after step `blend_steps` the blend is
    finalized (a plain patched model). A run resumed from a Trainer checkpoint continues at the
    checkpoint's t (from `state.global_step`), finalized if it was saved after the ramp.

        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[hf_gemact.BlendCallback(500)])
    """

    def __init__(self, blend_steps: int):
        if isinstance(blend_steps, bool) or not isinstance(blend_steps, int) or blend_steps < 1:
            raise ValueError(f"BlendCallback: blend_steps must be an integer >= 1, got {blend_steps!r}")
        self.blend_steps = blend_steps

    def _t(self, step: int) -> float:
        return min(step / self.blend_steps, 1.0)

    def _finalize(self, model) -> None:
        if get_blend(model) is not None:
            set_blend(model, 1.0)
            finalize_blend(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = _inner(model)
        if state.global_step >= self.blend_steps:
            self._finalize(model)
        elif get_blend(model) is None:
            raise SurgeryError(
                f"BlendCallback: the model has no blended activation at step {state.global_step} of a "
                f"{self.blend_steps}-step ramp; patch it with hf_gemact.patch_activations(model, NAME, "
                f"blend=True) before creating the Trainer")
        else:
            set_blend(model, self._t(state.global_step))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step < self.blend_steps:
            set_blend(_inner(model), self._t(state.global_step + 1))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step >= self.blend_steps:
            self._finalize(_inner(model))
