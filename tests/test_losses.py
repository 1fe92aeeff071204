"""Losses against hand formulas written with the ``math`` module on plain floats."""

from __future__ import annotations

import math

import pytest
import torch

from mtpo.losses import (
    DEFAULT_MARGIN,
    PREFERENCE_LOSSES,
    get_preference_loss,
    kto_kl_baseline,
    kto_loss,
    length_penalty,
    nll_loss,
    preference_loss,
    sft_loss,
)

# (policy_chosen, policy_rejected, ref_chosen, ref_rejected) per row: Δ spans negative, ~0, positive.
ROWS = [
    (-12.0, -15.0, -13.0, -14.0),  # Δ = 2
    (-30.5, -20.0, -29.0, -21.0),  # Δ = -2.5
    (-5.0, -5.0, -5.0, -5.0),  # Δ = 0
    (-40.0, -90.0, -60.0, -60.0),  # Δ = 70 (saturates σ)
]
MARGINS = [0.5, -1.0, 2.0, 0.0]
BETA = 0.3


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def delta(row) -> float:
    pw, pl, rw, rl = row
    return (pw - pl) - (rw - rl)


def tensors(rows=ROWS):
    cols = list(zip(*rows))
    return [torch.tensor(c, dtype=torch.float64, requires_grad=True) for c in cols]


def expected_loss(name: str, d: float, m: float, beta: float = BETA, eps: float = 0.0) -> float:
    """The textbook / original-code formula, one row at a time."""
    z = beta * d
    if name == "sigmoid":
        return -(1 - eps) * math.log(sig(z)) - eps * math.log(sig(-z))
    if name == "ipo":
        return (d - 1 / (2 * beta)) ** 2
    if name == "hinge":
        return max(0.0, 1 - z)
    if name == "rev_kl":
        t = math.exp(m) / (1 + math.exp(m))
        return -t * math.log(sig(z)) - (1 - t) * math.log(1 - sig(z))
    if name == "kl":
        p = min(sig(z), 0.999)
        t = math.exp(m) / (1 + math.exp(m) + 1e-3)
        return p * (math.log(p) - math.log(t)) + (1 - p) * (math.log(1 - p) - math.log(1 - t))
    if name == "tv":
        return abs(sig(z) - math.exp(m) / (1 + math.exp(m)))
    if name == "hellinger":
        p = min(sig(z), 0.999)
        t = math.exp(m) / (1 + math.exp(m))
        return 0.5 * ((math.sqrt(p) - math.sqrt(t)) ** 2 + (math.sqrt(1 - p) - math.sqrt(1 - t)) ** 2)
    raise AssertionError(name)


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_preference_losses_match_hand_formulas(name):
    spec = get_preference_loss(name)
    margin = torch.tensor(MARGINS, dtype=torch.float64) if spec.needs_margin else None
    losses, chosen_rewards, rejected_rewards = preference_loss(name, *tensors(), beta=BETA, margin=margin)
    for i, row in enumerate(ROWS):
        want = expected_loss(name, delta(row), MARGINS[i])
        assert losses[i].item() == pytest.approx(want, rel=1e-7, abs=1e-12), (name, i)
        assert chosen_rewards[i].item() == pytest.approx(BETA * (row[0] - row[2]))
        assert rejected_rewards[i].item() == pytest.approx(BETA * (row[1] - row[3]))
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_margin_defaults_to_the_original_constant():
    for name in ("rev_kl", "kl", "tv", "hellinger"):
        losses, _, _ = preference_loss(name, *tensors(), beta=BETA)
        for i, row in enumerate(ROWS):
            assert losses[i].item() == pytest.approx(expected_loss(name, delta(row), DEFAULT_MARGIN), rel=1e-9)
    assert DEFAULT_MARGIN == 0.5


def test_label_smoothing_is_conservative_dpo():
    losses, _, _ = preference_loss("sigmoid", *tensors(), beta=BETA, label_smoothing=0.1)
    for i, row in enumerate(ROWS[:3]):
        assert losses[i].item() == pytest.approx(expected_loss("sigmoid", delta(row), 0, eps=0.1), rel=1e-9)


def test_rev_kl_equals_cdpo_with_matching_smoothing():
    m = 0.7
    rev, _, _ = preference_loss("rev_kl", *tensors(), beta=BETA, margin=torch.full((4,), m, dtype=torch.float64))
    eps = 1 - sig(m)
    cdpo, _, _ = preference_loss("sigmoid", *tensors(), beta=BETA, label_smoothing=eps)
    torch.testing.assert_close(rev, cdpo)


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_raising_chosen_logp_does_not_raise_the_loss(name):
    rows = [ROWS[1], ROWS[2], (-10.0, -11.0, -10.0, -10.0)]  # Δ = -2.5, 0, 1: all below IPO's 1/(2β)
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = tensors(rows)
    margin = torch.full((3,), 3.0, dtype=torch.float64) if get_preference_loss(name).needs_margin else None
    losses, _, _ = preference_loss(
        name, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=BETA, margin=margin
    )
    losses.sum().backward()
    # Margin 3 → target p* = σ(3) ≈ 0.95 > p on these rows, so every loss pushes Δ up.
    assert torch.all(policy_chosen.grad < 0), policy_chosen.grad
    assert torch.all(policy_rejected.grad > 0), policy_rejected.grad
    assert ref_chosen.grad is not None  # the reference enters Δ (it is frozen by the caller)


def test_stable_where_sigmoid_underflows():
    huge = [(-1000.0, 0.0, 0.0, 0.0), (0.0, -1000.0, 0.0, 0.0)]  # βΔ = ∓300
    for name in PREFERENCE_LOSSES:
        margin = torch.zeros(2, dtype=torch.float32) if get_preference_loss(name).needs_margin else None
        rows = [torch.tensor(c, requires_grad=True) for c in zip(*huge)]
        losses, _, _ = preference_loss(name, *rows, beta=BETA, margin=margin)
        losses.sum().backward()
        assert torch.isfinite(losses).all(), name
        assert all(torch.isfinite(r.grad).all() for r in rows), name


def test_registry_and_argument_errors():
    args = tensors()
    with pytest.raises(ValueError, match="valid names: .*hellinger.*sigmoid"):
        preference_loss("dpo", *args, beta=BETA)
    with pytest.raises(ValueError, match="takes no margin"):
        preference_loss("sigmoid", *args, beta=BETA, margin=torch.zeros(4))
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("ipo", *args, beta=BETA, label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        preference_loss("sigmoid", *args, beta=0.0)
    with pytest.raises(ValueError, match="shape"):
        preference_loss("tv", *args, beta=BETA, margin=torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        preference_loss("sigmoid", args[0], args[1][:2], args[2], args[3], beta=BETA)
    spec = PREFERENCE_LOSSES["kl"]
    assert spec.needs_margin and spec.needs_reference
    with pytest.raises(AttributeError):
        spec.name = "other"  # frozen


def test_length_penalty():
    logps = torch.tensor([-10.0, -20.0])
    counts = torch.tensor([4, 10])
    assert length_penalty(logps, counts, alpha=0.5).tolist() == [-12.0, -25.0]
    # On both sides of a pair it shifts Δ by −α(|w| − |l|), as the original len_penalty did.
    pw, pl = length_penalty(torch.tensor([-10.0]), torch.tensor([4]), alpha=0.5), length_penalty(
        torch.tensor([-20.0]), torch.tensor([10]), alpha=0.5
    )
    assert (pw - pl).item() == pytest.approx((-10 + 20) - 0.5 * (4 - 10))


def test_nll_is_masked_per_token_mean():
    logps = torch.tensor([-6.0, -1.0, 0.0], requires_grad=True)
    counts = torch.tensor([3, 2, 0])
    loss = nll_loss(logps, counts)
    assert loss.item() == pytest.approx(7.0 / 5.0)
    assert sft_loss(logps, counts).item() == loss.item()
    assert nll_loss(logps, counts, num_tokens=10).item() == pytest.approx(0.7)
    loss.backward()
    assert logps.grad.tolist() == pytest.approx([-0.2, -0.2, -0.2])
    empty = nll_loss(torch.zeros(2, requires_grad=True), torch.zeros(2, dtype=torch.long))
    assert empty.item() == 0.0 and empty.requires_grad


def test_nll_accumulation_invariance():
    """Per-token mean over 4 micro-batches with a global denominator == one big batch."""
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(8, generator=g, dtype=torch.float64) * 20
    counts = torch.randint(1, 30, (8,), generator=g)
    whole = nll_loss(logps, counts)
    pieces = sum(nll_loss(lp, c, num_tokens=counts.sum()) for lp, c in zip(logps.split(2), counts.split(2)))
    assert pieces.item() == pytest.approx(whole.item(), rel=1e-12)


def brute_force_kto(policy, ref, labels, z0, beta, wd, wu):
    out = []
    for p, r, label in zip(policy, ref, labels):
        ratio = p - r
        if label:
            out.append(wd * (1 - sig(beta * (ratio - z0))))
        else:
            out.append(wu * (1 - sig(beta * (z0 - ratio))))
    return out


def test_kto_against_brute_force_including_clamped_baseline():
    policy = [-10.0, -12.0, -30.0, -8.0]
    ref = [-11.0, -11.5, -28.0, -8.5]
    labels = [True, False, True, False]
    mismatched_policy, mismatched_ref = [-50.0, -42.0, -61.0], [-49.0, -40.0, -60.5]  # mean diff < 0
    z0 = kto_kl_baseline(torch.tensor(mismatched_policy), torch.tensor(mismatched_ref))
    raw = sum(p - r for p, r in zip(mismatched_policy, mismatched_ref)) / 3
    assert raw < 0 and z0.item() == 0.0  # clamped at zero
    positive = kto_kl_baseline(torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -21.0]))
    assert positive.item() == pytest.approx(1.5) and not positive.requires_grad

    for kl_value in (z0, positive):
        losses, rewards = kto_loss(
            torch.tensor(policy), torch.tensor(ref), torch.tensor(labels), kl_value,
            beta=0.2, desirable_weight=1.5, undesirable_weight=0.7,
        )
        want = brute_force_kto(policy, ref, labels, kl_value.item(), 0.2, 1.5, 0.7)
        assert losses.tolist() == pytest.approx(want, rel=1e-6)
        assert rewards.tolist() == pytest.approx([0.2 * (p - r) for p, r in zip(policy, ref)], rel=1e-6)


def test_kto_gradient_signs_and_errors():
    policy = torch.tensor([-10.0, -10.0], requires_grad=True)
    ref = torch.tensor([-10.0, -10.0])
    losses, _ = kto_loss(policy, ref, torch.tensor([True, False]), torch.tensor(0.0), beta=0.5)
    losses.sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # raise desirable, lower undesirable
    with pytest.raises(ValueError, match="detached"):
        kto_loss(policy, ref, torch.tensor([True, False]), torch.tensor(0.0, requires_grad=True), beta=0.5)
    with pytest.raises(TypeError, match="bool"):
        kto_loss(policy, ref, torch.tensor([1, 0]), torch.tensor(0.0), beta=0.5)
    with pytest.raises(ValueError, match="at least one"):
        kto_kl_baseline(torch.zeros(0), torch.zeros(0))
