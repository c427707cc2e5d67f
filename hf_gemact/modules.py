"""nn.Module wrappers around `functional`: parameter validation, VeLU's learnable scale and the
auxiliary-loss bookkeeping. Names and presets live in `registry.py`."""

from __future__ import annotations

import functools
import math
import numbers
import warnings
import weakref

import torch
from torch import nn

from . import functional as F
from .formulas import GEM_DEFAULTS, VELU_DEFAULTS


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

    def __init__(self, n: int = GEM_DEFAULTS["n"], eps: float = GEM_DEFAULTS["eps"],
                 a: float = GEM_DEFAULTS["a"]):
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

    Per call the module records `lambda_ot * W2^2` of its pre-scale output y against N(0, 1). A
    transformers model in training mode adds the records of its forward pass to the `loss` it
    returns (see `integration.fold_auxiliary_loss`); `hf_gemact.auxiliary_loss(model)` returns the
    records that no returned loss holds yet (models called without labels).
    """

    def __init__(
        self,
        alpha: float = VELU_DEFAULTS["alpha"],
        beta1: float = VELU_DEFAULTS["beta1"],
        beta2: float = VELU_DEFAULTS["beta2"],
        gamma: float = VELU_DEFAULTS["gamma"],
        mu: float = VELU_DEFAULTS["mu"],
        eps: float = VELU_DEFAULTS["eps"],
        lambda_ot: float = 0.1,
        dim: int = VELU_DEFAULTS["dim"],
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
        # The last call's term: `pending_aux_loss` differentiable until a loss takes it over (or a
        # backward runs through it), `last_aux_loss` always detached, for logging.
        self.pending_aux_loss: torch.Tensor | None = None
        self.last_aux_loss: torch.Tensor | None = None
        self._aux_taken = self._aux_watched = False

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
        self._record_aux_loss(F.wasserstein_aux_loss(mean, std, self.lambda_ot))
        return out

    def _record_aux_loss(self, term: torch.Tensor) -> None:
        watched = self.training and term.requires_grad and not torch.compiler.is_compiling()
        if watched:
            _warn_if_dropped(self)
            # Once a backward has run through the term, the module lets go of its graph.
            term.register_hook(functools.partial(_release_aux, weakref.ref(self)))
        self.pending_aux_loss = term
        self.last_aux_loss = term.detach()
        self._aux_taken, self._aux_watched = False, watched

    def clear_aux_loss(self) -> None:
        self.pending_aux_loss = self.last_aux_loss = None

    def take_aux_loss(self) -> torch.Tensor | None:
        """The pending term, handed to a loss that now holds it (the module keeps no graph)."""
        term, self.pending_aux_loss = self.pending_aux_loss, None
        return term

    def __getstate__(self):
        # A recorded term is part of an autograd graph, which copy.deepcopy and pickle refuse; a copy
        # (EMA model, frozen teacher) starts with no record, as a fresh module does.
        state = super().__getstate__()
        state["pending_aux_loss"] = None
        return state

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha:g}, beta1={self.beta1:g}, beta2={self.beta2:g}, gamma={self.gamma:g}, "
            f"mu={self.mu:g}, eps={self.eps:g}, lambda_ot={self.lambda_ot:g}, dim={self.dim}"
        )


def _release_aux(module_ref, grad):
    module = module_ref()
    if module is not None:
        module.pending_aux_loss = None


_dropped_warned = False


def _warn_if_dropped(module: VeLU) -> None:
    """Warn once when the previous training-mode term reached neither a model's loss nor
    auxiliary_loss() before the next call: the W2 term then silently drops out of training."""
    global _dropped_warned
    previous = module.pending_aux_loss
    if _dropped_warned or previous is None or not module._aux_watched or module._aux_taken or module.lambda_ot == 0:
        return
    _dropped_warned = True
    warnings.warn(
        "VeLU's auxiliary W2 loss of the previous training forward reached no loss: the model returned "
        "no loss (no labels given, or Trainer's label smoothing / compute_loss_func computed it outside "
        "the model) and hf_gemact.auxiliary_loss(model) was not called. Add "
        "hf_gemact.auxiliary_loss(model) to the loss you back-propagate (or use velu_ot0 to train "
        "without the term).", RuntimeWarning, stacklevel=3)


def _velu_modules(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, VeLU)]


def auxiliary_loss(model: nn.Module) -> torch.Tensor:
    """Differentiable sum of the VeLU terms of the model's last forward pass that no returned loss
    holds yet (0 if none). A transformers model in training mode called with labels already adds
    its terms to `outputs.loss`, so `model(**batch).loss + auxiliary_loss(model)` never counts a
    term twice; call this when you compute the loss from logits."""
    terms = []
    for m in _velu_modules(model):
        if m.pending_aux_loss is not None:
            terms.append(m.pending_aux_loss.float())
            m._aux_taken = True
    if terms:
        return torch.stack(terms).sum()
    param = next(model.parameters(), None)
    return torch.zeros((), device=param.device if param is not None else None)


def recorded_aux_loss(model: nn.Module) -> torch.Tensor:
    """Detached sum of every VeLU term recorded by the model's last forward pass, whether a returned
    loss holds it or not: for logging the auxiliary part of a training loss."""
    terms = [m.last_aux_loss.float() for m in _velu_modules(model) if m.last_aux_loss is not None]
    if terms:
        return torch.stack(terms).sum()
    param = next(model.parameters(), None)
    return torch.zeros((), device=param.device if param is not None else None)
