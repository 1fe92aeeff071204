"""Loss functions of M-DPO, M-KTO and masked SFT, written as the paper's equations.

Every function is pure and per-row: it takes masked sequence log-probabilities (see
``mtpo.logprobs.sequence_logps``) and returns one loss per row. Reducing them (mean over the batch,
over processes, over accumulation steps) is the caller's job.

Preference losses act on the implicit-reward margin

    Δ = (log π(w) − log π(l)) − (log π_ref(w) − log π_ref(l))        (w = chosen, l = rejected)

and are registered by name in ``PREFERENCE_LOSSES``. The margin-aware ones (``rev_kl``, ``kl``,
``tv``, ``hellinger``) reproduce ``PreferenceTrainer.dpo_loss`` of the original research code
(WeiXiongUST/Building-Math-Agents-with-Multi-Turn-Iterative-Preference-Learning,
alignment_algorithms/dpo.py; identical in RLHFlow/Online-RLHF, dpo_iteration/dpo.py). With
p = σ(βΔ), the model's probability that w beats l, and p* = σ(margin), a target probability, they
are divergences between Bernoulli(p*) and Bernoulli(p):

    rev_kl     −p* log p − (1 − p*) log(1 − p)              cross-entropy; = cDPO with ε = 1 − p*
    kl         p log(p / p*) + (1 − p) log((1 − p) / (1 − p*))  with p ≤ 0.999 and p* = e^m / (1 + e^m + 1e-3)
    tv         |p − p*|
    hellinger  ½ [(√p − √p*)² + (√(1 − p) − √(1 − p*))²]         with p ≤ 0.999

The clamps and the 1e-3 are the original's; we compute the same values through log-sigmoids so
that they stay finite where σ underflows. The original fed a constant margin of 0.5 to every pair
("not used so far"), which is our default when no per-row margin is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_MARGIN",
    "LossSpec",
    "PREFERENCE_LOSSES",
    "get_preference_loss",
    "preference_loss",
    "length_penalty",
    "nll_loss",
    "sft_loss",
    "kto_loss",
    "kto_kl_baseline",
]

DEFAULT_MARGIN = 0.5  # the constant the original code gave every pair
_P_MAX = 0.999  # original: p = torch.minimum(p, 0.999) in "kl" and "hellinger"
_LOGIT_P_MAX = math.log(_P_MAX / (1.0 - _P_MAX))  # σ(x) ≤ 0.999  ⇔  x ≤ this
_KL_TARGET_SHIFT = math.log1p(1e-3)  # original: p* = e^m / (1 + e^m + 1e-3) = σ(m − log(1 + 1e-3))


# ---------------------------------------------------------------------------------------------
# Preference losses: fn(delta, *, beta, label_smoothing, margin) -> (B,) losses
# ---------------------------------------------------------------------------------------------


def _sigmoid(delta: Tensor, *, beta: float, label_smoothing: float, margin: Tensor | None) -> Tensor:
    """DPO (Rafailov et al. 2023); with label smoothing ε, conservative DPO (Mitchell 2023)."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def _ipo(delta: Tensor, *, beta: float, label_smoothing: float, margin: Tensor | None) -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17): (Δ − 1/(2β))², on whatever log-probs are passed in."""
    return (delta - 1 / (2 * beta)) ** 2


def _hinge(delta: Tensor, *, beta: float, label_smoothing: float, margin: Tensor | None) -> Tensor:
    """SLiC-style hinge (Zhao et al. 2023): max(0, 1 − βΔ)."""
    return torch.relu(1 - beta * delta)


def _rev_kl(delta: Tensor, *, beta: float, label_smoothing: float, margin: Tensor) -> Tensor:
    target = torch.sigmoid(margin)  # p*
    return -target * F.logsigmoid(beta * delta) - (1 - target) * F.logsigmoid(-beta * delta)


def _kl(delta: Tensor, *, beta: float, label_smoothing: float, margin: Tensor) -> Tensor:
    x = torch.clamp(beta * delta, max=_LOGIT_P_MAX)  # σ(x) = min(p, 0.999)
    p = torch.sigmoid(x)
    shifted = margin - _KL_TARGET_SHIFT  # σ(shifted) = p*
    chosen_term = p * (F.logsigmoid(x) - F.logsigmoid(shifted))
    rejected_term = (1 - p) * (F.logsigmoid(-x) - F.logsigmoid(-shifted))
    return chosen_term + rejected_term


def _tv(delta: Tensor, *, beta: float, label_smoothing: float, margin: Tensor) -> Tensor:
    return torch.abs(torch.sigmoid(beta * delta) - torch.sigmoid(margin))


def _hellinger(delta: Tensor, *, beta: float, label_smoothing: float, margin: Tensor) -> Tensor:
    x = torch.clamp(beta * delta, max=_LOGIT_P_MAX)
    sqrt_p, sqrt_not_p = torch.exp(0.5 * F.logsigmoid(x)), torch.exp(0.5 * F.logsigmoid(-x))
    sqrt_t, sqrt_not_t = torch.exp(0.5 * F.logsigmoid(margin)), torch.exp(0.5 * F.logsigmoid(-margin))
    return 0.5 * ((sqrt_p - sqrt_t) ** 2 + (sqrt_not_p - sqrt_not_t) ** 2)


@dataclass(frozen=True)
class LossSpec:
    """A preference loss and the facts a trainer needs about it."""

    name: str
    fn: Callable[..., Tensor]
    needs_margin: bool  # reads a per-row target margin (default DEFAULT_MARGIN)
    needs_reference: bool  # needs reference log-probs (a reference model or precomputed ones)
    uses_label_smoothing: bool = False


PREFERENCE_LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("sigmoid", _sigmoid, needs_margin=False, needs_reference=True, uses_label_smoothing=True),
        LossSpec("ipo", _ipo, needs_margin=False, needs_reference=True),
        LossSpec("hinge", _hinge, needs_margin=False, needs_reference=True),
        LossSpec("rev_kl", _rev_kl, needs_margin=True, needs_reference=True),
        LossSpec("kl", _kl, needs_margin=True, needs_reference=True),
        LossSpec("tv", _tv, needs_margin=True, needs_reference=True),
        LossSpec("hellinger", _hellinger, needs_margin=True, needs_reference=True),
    )
}


def get_preference_loss(name: str) -> LossSpec:
    """The registered ``LossSpec`` called ``name``; ValueError listing the valid names otherwise."""
    try:
        return PREFERENCE_LOSSES[name]
    except KeyError:
        valid = ", ".join(sorted(PREFERENCE_LOSSES))
        raise ValueError(f"unknown preference loss {name!r}; valid names: {valid}") from None


def preference_loss(
    name: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    margin: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row preference loss and implicit rewards.

    All four log-prob tensors are (B,). ``margin`` (B,) is only read by losses with
    ``needs_margin`` (None means ``DEFAULT_MARGIN`` for every row); passing it to another loss, or a
    non-zero ``label_smoothing`` to a loss other than ``sigmoid``, is an error rather than silently
    ignored.

    IPO note: the loss is applied to the log-probs as given. The original research code passed
    token *sums*; TRL (and the IPO authors' experiments) use per-token *means*. For the latter,
    divide all four tensors by their token counts before calling.

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each (B,); rewards are
    ``beta * (policy − ref)`` per side, detached.
    """
    spec = get_preference_loss(name)
    _check_same_shape(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if label_smoothing and not spec.uses_label_smoothing:
        raise ValueError(f"label_smoothing is not used by the {name!r} loss")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if margin is not None and not spec.needs_margin:
        raise ValueError(f"the {name!r} loss takes no margin")
    if spec.needs_margin:
        margin = _row_margin(margin, policy_chosen_logps)

    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    delta = chosen_logratios - rejected_logratios  # (B,)
    losses = spec.fn(delta, beta=beta, label_smoothing=label_smoothing, margin=margin)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def _row_margin(margin: Tensor | None, like: Tensor) -> Tensor:
    if margin is None:
        return torch.full_like(like, DEFAULT_MARGIN)
    margin = torch.as_tensor(margin, dtype=like.dtype, device=like.device)
    if margin.shape != like.shape:
        raise ValueError(f"margin must have shape {tuple(like.shape)}, got {tuple(margin.shape)}")
    return margin


def _check_same_shape(*tensors: Tensor) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"log-prob tensors must all be (B,), got shapes {[tuple(t.shape) for t in tensors]}")


# ---------------------------------------------------------------------------------------------
# Length penalty, NLL / SFT
# ---------------------------------------------------------------------------------------------


def length_penalty(logps: Tensor, counts: Tensor, *, alpha: float) -> Tensor:
    """``logps − alpha · counts``: charge ``alpha`` nats per trainable token.

    Applied to the policy's chosen and rejected logps it turns Δ into Δ − α(|w| − |l|), which is
    what the original code's ``len_penalty`` did (there with padded batch lengths; here with each
    row's own trainable-token count).
    """
    return logps - alpha * counts.to(logps.dtype)


def nll_loss(logps: Tensor, counts: Tensor, *, num_tokens: Tensor | float | None = None) -> Tensor:
    """Masked per-token mean negative log-likelihood, a 0-dim tensor: −Σ logps / Σ counts.

    ``logps``/``counts`` are per-row sums and token counts from ``sequence_logps`` (for the DPO
    NLL term: the chosen rows). ``num_tokens`` replaces the denominator, e.g. with the token count
    of the whole global batch so that gradient accumulation and data parallelism give the same
    per-token mean as one big batch. With no tokens at all the result is 0 (and still has a graph).
    """
    if num_tokens is None:
        num_tokens = counts.sum()
    denominator = torch.as_tensor(num_tokens, dtype=logps.dtype, device=logps.device).clamp(min=1)
    return -logps.sum() / denominator


# SFT on trajectories is exactly the masked per-token NLL.
sft_loss = nll_loss


# ---------------------------------------------------------------------------------------------
# KTO
# ---------------------------------------------------------------------------------------------


def kto_kl_baseline(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z0 = max(0, mean(log π − log π_ref)) over mismatched pairs, detached.

    Inputs are (M,) log-probs of (prompt, completion) pairs that do not belong together. Averaging
    across processes is the trainer's job (gather the differences first, then call this).
    """
    _check_same_shape(policy_kl_logps, ref_kl_logps)
    if policy_kl_logps.numel() == 0:
        raise ValueError("KTO KL baseline needs at least one mismatched pair; got none")
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    kl: Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Per-row KTO loss (Ethayarajh et al. 2024) and rewards.

    With r = log π − log π_ref and z0 = ``kl`` (0-dim, from ``kto_kl_baseline``):
    desirable rows (labels True) cost w_d · (1 − σ(β(r − z0))), undesirable rows
    w_u · (1 − σ(β(z0 − r))). Returns ``(losses, rewards)``, each (B,); rewards = β·r, detached.
    """
    _check_same_shape(policy_logps, ref_logps, labels)
    if labels.dtype != torch.bool:
        raise TypeError(f"labels must be a bool tensor (True = desirable), got {labels.dtype}")
    if kl.dim() != 0 or kl.requires_grad:
        raise ValueError("kl must be a detached 0-dim tensor; use kto_kl_baseline(...)")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    logratios = policy_logps - ref_logps  # (B,)
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    losses = torch.where(labels, desirable, undesirable)
    return losses, beta * logratios.detach()
