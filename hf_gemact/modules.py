"""nn.Module wrappers around `functional`: parameter validation, VeLU's learnable scale and the
auxiliary-loss bookkeeping. Names and presets live in `registry.py`."""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from . import functional as F


def _check_finite(name: str, value, *, positive: bool = False, non_negative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if non_negative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def _check_order(n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"N must be an integer >= 1, got {n!r}")
    return int(n)


class GEM(nn.Module):
    """GEM, E-GEM and SE-GEM in one module: x * g(|x|) with g(s) = s^2N / (eps + s^2N), scaled by
    `a` for x < 0. GEM is eps = 1, a = 0; E-GEM is a = 0; SE-GEM is a > 0 (no dead neurons)."""

    def __init__(self, n: int = 2, eps: float = 1.0, a: float = 0.0):
        super().__init__()
        self.n = _check_order(n)
        self.eps = _check_finite("eps", eps, positive=True)
        self.a = _check_finite("a", a, non_negative=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gem(x, self.n, self.eps, self.a)

    def extra_repr(self) -> str:
        return f"n={self.n}, eps={self.eps:g}, a={self.a:g}"


class VeLU(nn.Module):
    """VeLU (Shakarami et al., arXiv 2504.15051) as the authors' code computes it.

    Per call the module records `lambda_ot * W2^2` of its pre-scale output y against N(0, 1);
    `hf_gemact.auxiliary_loss(model)` sums those records of the model's last forward pass.
    """

    def __init__(
        self,
        alpha: float = 0.1,
        beta1: float = 0.1,
        beta2: float = 0.1,
        gamma: float = 0.1,
        mu: float = 0.9,
        eps: float = 1e-6,
        lambda_ot: float = 0.1,
        dim: int = -1,
    ):
        super().__init__()
        self.alpha = _check_finite("alpha", alpha)
        self.beta1 = _check_finite("beta1", beta1)
        self.beta2 = _check_finite("beta2", beta2)
        self.gamma = _check_finite("gamma", gamma)
        self.mu = _check_finite("mu", mu)
        self.eps = _check_finite("eps", eps, positive=True)
        self.lambda_ot = _check_finite("lambda_ot", lambda_ot, non_negative=True)
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise ValueError(f"dim must be an integer, got {dim!r}")
        self.dim = int(dim)
        # Shape (1,), not (): FSDP (fully_shard and FSDP1) cannot shard a 0-dim parameter.
        self.lam = nn.Parameter(torch.ones(1))
        self.last_aux_loss: torch.Tensor | None = None

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.lam.fill_(1.0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before lam became shape (1,) hold it as a 0-dim tensor.
        key = prefix + "lam"
        if isinstance(state_dict.get(key), torch.Tensor) and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, mean, std = F.velu(
            x, self.lam.view(()), self.alpha, self.beta1, self.beta2, self.gamma, self.mu, self.eps, self.dim,
            return_stats=True,
        )
        self.last_aux_loss = F.wasserstein_aux_loss(mean, std, self.lambda_ot)
        return out

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha:g}, beta1={self.beta1:g}, beta2={self.beta2:g}, gamma={self.gamma:g}, "
            f"mu={self.mu:g}, eps={self.eps:g}, lambda_ot={self.lambda_ot:g}, dim={self.dim}"
        )


def install_scalar_lam_loading() -> None:
    """Let transformers >= 5's `from_pretrained` load checkpoints whose VeLU `lam` is 0-dim.

    That loader sets each checkpoint tensor on the model itself (`core_model_loading.
    set_param_for_module`) and treats any shape difference as a mismatch to re-initialise, without
    calling `_load_from_state_dict`; so a 0-dim `lam` bound for a VeLU is reshaped to (1,) first.
    transformers 4.x loads through `module.load_state_dict`, which `VeLU._load_from_state_dict`
    already covers. Idempotent."""
    try:
        from transformers import core_model_loading as loading
    except ImportError:  # transformers 4.x
        return
    original = getattr(loading, "set_param_for_module", None)
    if original is None or getattr(original, "_hf_gemact", False):
        return

    def set_param_for_module(model, target_name, param_value, *args, **kwargs):
        module_path, _, name = target_name.rpartition(".")
        if name == "lam" and param_value.dim() == 0 and isinstance(model.get_submodule(module_path), VeLU):
            param_value = param_value.reshape(1)
        return original(model, target_name, param_value, *args, **kwargs)

    set_param_for_module._hf_gemact = True
    loading.set_param_for_module = set_param_for_module


def auxiliary_loss(model: nn.Module) -> torch.Tensor:
    """Differentiable sum of the auxiliary terms of the model's last forward pass (0 if none)."""
    terms = [m.last_aux_loss for m in model.modules() if getattr(m, "last_aux_loss", None) is not None]
    if terms:
        return torch.stack([t.float() for t in terms]).sum()
    param = next(model.parameters(), None)
    return torch.zeros((), device=param.device if param is not None else None)
