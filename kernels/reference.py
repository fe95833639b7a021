"""The Poly-DPO objective in eager PyTorch: the spec every fused implementation must match.

DESIGN.md Section 1. Dim 0 of every per-sample tensor is 2B: winners in rows [0, B), losers in
rows [B, 2B); winner and loser of a pair share prompt, noise and timestep.

    e      = mean over non-batch dims of m * (pred - target)^2
    d      = (e_pol[w] - e_pol[l]) - (e_ref[w] - e_ref[l])
    h      = -k * d                  (the logit before beta)
    z      = beta * h / 2 = -0.5 * beta * k * d
    loss   = mean over pairs of l(z), with l by `loss_type`:
      "sigmoid"  softplus(-z) + alpha * (1 - sigmoid(z))   paper Eq. 9; alpha = 0 is Diffusion-DPO
                 dl/dz = -(1 - p) * (1 + alpha * p)        paper Eq. 10
      "hinge"    relu(1 - z)                               diffusers' train_diffusion_dpo.py
      "ipo"      (h - 1 / beta)^2                          the same script's `(logits - 1/(2 beta))^2`
                                                           with its logits = h and its beta = beta / 2

Errors are summed in float64 (their difference between policy and reference is small against
each), the rest runs in float32 for 16- and 32-bit inputs and in float64 for float64 inputs, which
makes this module its own float64 oracle in tests.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .checks import (
    check_elem_weight,
    check_loss_inputs,
    check_loss_type,
    check_pair_batch,
    check_same_shape,
    check_ties,
    count_ties,
)


class PolyDPOOutput(NamedTuple):
    """Loss and per-step metrics. Only `loss` carries a gradient (w.r.t. policy_pred)."""

    loss: torch.Tensor  # scalar
    logits: torch.Tensor  # z, [B]
    prob: torch.Tensor  # sigmoid(z), [B]: the implicit probability that the winner wins
    accuracy: torch.Tensor  # scalar, mean of z > 0
    margin: torch.Tensor  # scalar, mean z / beta: the implicit reward margin
    policy_err: torch.Tensor  # [2B]
    ref_err: torch.Tensor  # [2B]


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sample_errors(
    pred: torch.Tensor, target: torch.Tensor, elem_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample mean of `elem_weight * (pred - target)^2` over every non-batch dim -> float64 [2B].

    The mean divides by the element count N, not by the sum of weights (a weight map scales
    each element's share). Squares are formed in float32 (float64 for float64 inputs) and summed
    in float64: the loss subtracts a policy error from a nearly equal reference error, and a
    float32 result would round away the digits that difference is made of.
    """
    check_pair_batch("pred", pred)
    check_same_shape("target", target, "pred", pred)
    check_elem_weight(elem_weight, pred)
    dtype = _math_dtype(pred.dtype)
    sq = (pred.to(dtype) - target.to(dtype)).square()
    if elem_weight is not None:
        sq = sq * elem_weight.to(dtype)
    rows = sq.reshape(pred.shape[0], -1)
    return rows.sum(dim=1, dtype=torch.float64) / rows.shape[1]


def poly_dpo_from_errors(
    policy_err: torch.Tensor,
    ref_err: torch.Tensor,
    *,
    beta: float,
    alpha: float = 0.0,
    pair_weight: torch.Tensor | None = None,
    loss_type: str = "sigmoid",
    math_dtype: torch.dtype | None = None,
) -> PolyDPOOutput:
    """The loss head on per-sample errors [2B] (policy_err differentiable, ref_err constant).

    The gap policy_err - ref_err is formed in the wider of the two dtypes, everything after it in
    `math_dtype` (default: policy_err's dtype)."""
    check_loss_type(loss_type, alpha, beta)
    pairs = policy_err.shape[0] // 2
    dtype = math_dtype or policy_err.dtype
    ref_err = ref_err.detach()
    wide = torch.promote_types(policy_err.dtype, ref_err.dtype)
    # Subtract the nearly equal policy and reference errors of the same sample first: that
    # difference is exact in floating point far more often than winner minus loser.
    gap = (policy_err.to(wide) - ref_err.to(wide)).to(dtype)
    diff = gap[:pairs] - gap[pairs:]
    h = -diff if pair_weight is None else -pair_weight.to(dtype) * diff
    logits = 0.5 * beta * h
    if loss_type == "sigmoid":
        # logsigmoid has no log of an underflowed sigmoid (and, unlike F.softplus, no threshold
        # past which it returns its argument: 2e-9 off at z = -20, visible in float64);
        # sigmoid(-z) is 1 - p without the cancellation of 1 - sigmoid(z) near p = 1.
        per_pair = -F.logsigmoid(logits) + alpha * torch.sigmoid(-logits)
    elif loss_type == "hinge":
        per_pair = torch.relu(1.0 - logits)
    else:  # ipo
        per_pair = (h - 1.0 / beta).square()
    z = logits.detach()
    return PolyDPOOutput(
        loss=per_pair.mean(),
        logits=z,
        prob=torch.sigmoid(z),
        accuracy=(z > 0).to(z.dtype).mean(),
        margin=z.mean() / beta if beta != 0 else torch.zeros_like(z.mean()),
        policy_err=policy_err.detach().to(dtype),
        ref_err=ref_err.to(dtype),
    )


def poly_dpo_loss(
    policy_pred: torch.Tensor,
    target: torch.Tensor,
    *,
    ref_pred: torch.Tensor | None = None,
    ref_err: torch.Tensor | None = None,
    beta: float,
    alpha: float = 0.0,
    elem_weight: torch.Tensor | None = None,
    pair_weight: torch.Tensor | None = None,
    ties: str = "zero",
    loss_type: str = "sigmoid",
) -> PolyDPOOutput:
    """Poly-DPO loss (alpha = 0: Diffusion-DPO) from policy and reference predictions.

    Pass exactly one of `ref_pred` (reference prediction, same shape as policy_pred) or
    `ref_err` (its per-sample errors [2B], e.g. from `sample_errors` on the reference pass).
    `ties="half"` counts a pair with z = 0 as half right in `accuracy` (diffusers' scripts).
    `loss_type`: "sigmoid" (with alpha: Poly-DPO), "hinge" or "ipo" (module docstring).
    """
    check_ties(ties)
    check_loss_inputs(
        policy_pred, target, ref_pred, ref_err, beta, alpha, elem_weight, pair_weight, loss_type
    )
    policy_err = sample_errors(policy_pred, target, elem_weight)
    if ref_pred is not None:
        with torch.no_grad():
            ref_err = sample_errors(ref_pred, target, elem_weight)
    out = poly_dpo_from_errors(
        policy_err,
        ref_err,
        beta=beta,
        alpha=alpha,
        pair_weight=pair_weight,
        loss_type=loss_type,
        math_dtype=_math_dtype(policy_pred.dtype),
    )
    return count_ties(out, ties)
