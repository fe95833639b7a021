"""Public entry points of vipo.kernels: the one place that picks the implementation.

CUDA tensors (16- and 32-bit floats) run the fused Triton kernels of `triton_ops`; CPU tensors
run the eager reference, except under TRITON_INTERPRET=1 (the test suite), where the Triton
kernels run on CPU through the interpreter. float64 always runs the reference (the kernels
accumulate in float32).
"""

import os

import torch
from torch import nn

from . import reference
from .checks import (
    check_elem_weight,
    check_loss_inputs,
    check_loss_type,
    check_pair_batch,
    check_same_shape,
    check_ties,
    count_ties,
)
from .distributed import reduce_errors
from .reference import PolyDPOOutput

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_triton_ops = None


def _fused_ops():
    """vipo.kernels.triton_ops, imported on first use (None where Triton is not installed)."""
    global _triton_ops
    if _triton_ops is None:
        try:
            from . import triton_ops
        except ImportError:  # no Triton on this platform: the reference serves
            _triton_ops = False
        else:
            _triton_ops = triton_ops
    return _triton_ops or None


def use_fused(tensor: torch.Tensor) -> bool:
    """Whether `poly_dpo_loss` / `sample_errors` run the Triton kernels for this tensor."""
    if tensor.dtype not in _FUSED_DTYPES:
        return False
    if not (tensor.is_cuda or (_INTERPRET and tensor.device.type == "cpu")):
        return False
    return _fused_ops() is not None


def _local_errors(pred, target, elem_weight) -> torch.Tensor:
    if not use_fused(pred):
        return reference.sample_errors(pred, target, elem_weight)
    check_pair_batch("pred", pred)
    check_same_shape("target", target, "pred", pred)
    check_elem_weight(elem_weight, pred)
    return _fused_ops().sample_errors_op(pred, target, elem_weight)


def sample_errors(
    pred: torch.Tensor,
    target: torch.Tensor,
    elem_weight: torch.Tensor | None = None,
    *,
    reduce_group=None,
) -> torch.Tensor:
    """Per-sample mean of `elem_weight * (pred - target)^2` over every non-batch dim -> float64 [2B].

    Differentiable w.r.t. `pred`. Use it on the reference pass to reduce the reference output to
    2B numbers before the policy forward, then pass them as `ref_err` to `poly_dpo_loss`. The
    result is float64 because the loss subtracts it from a nearly equal policy error: float32
    would round away the digits that difference is made of (inside the kernel each square is
    formed and summed in float64).

    `reduce_group` (a torch.distributed group): `pred` and `target` are this rank's shard of each
    sample's elements (context parallelism); the result is the mean over the whole sample, the same
    on every rank of the group, from one all-reduce of 2B + 1 floats (`vipo.kernels.distributed`).
    """
    errors = _local_errors(pred, target, elem_weight)
    if reduce_group is None:
        return errors
    (errors,) = reduce_errors([errors], pred[0].numel(), reduce_group)
    return errors


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
    reduce_group=None,
) -> PolyDPOOutput:
    """Poly-DPO loss (alpha = 0: Diffusion-DPO) and its metrics.

    policy_pred, target, ref_pred: [2B, ...], winners in rows [0, B), losers in rows [B, 2B).
    Pass exactly one of ref_pred or ref_err ([2B] reference errors from `sample_errors`).
    elem_weight broadcasts to policy_pred; pair_weight is [B]. Only `loss` has a gradient,
    w.r.t. policy_pred. See `vipo.kernels.reference` for the exact definition.
    `ties`: how `accuracy` counts a pair with z = 0: "zero" (the official code) or "half"
    (diffusers' scripts). `loss_type`: "sigmoid" (with alpha != 0: Poly-DPO), "hinge" or "ipo"
    as diffusers' DPO script defines them (formulas in `vipo.kernels.reference`).
    `reduce_group`: the predictions are this rank's shard of each sample's elements (context
    parallelism, see `sample_errors`); a `ref_err` is then the whole-sample errors (from
    `sample_errors(..., reduce_group=)`). Every rank of the group gets the whole batch's loss and
    the gradient of its own elements.
    """
    check_ties(ties)
    if reduce_group is not None:
        check_loss_inputs(
            policy_pred, target, ref_pred, ref_err, beta, alpha, elem_weight, pair_weight, loss_type
        )
        return _sharded_loss(
            policy_pred,
            target,
            ref_pred,
            ref_err,
            beta,
            alpha,
            elem_weight,
            pair_weight,
            ties,
            loss_type,
            reduce_group,
        )
    if not use_fused(policy_pred):
        return reference.poly_dpo_loss(
            policy_pred,
            target,
            ref_pred=ref_pred,
            ref_err=ref_err,
            beta=beta,
            alpha=alpha,
            elem_weight=elem_weight,
            pair_weight=pair_weight,
            ties=ties,
            loss_type=loss_type,
        )
    check_loss_inputs(
        policy_pred, target, ref_pred, ref_err, beta, alpha, elem_weight, pair_weight, loss_type
    )
    # Each input is read in its own dtype and widened to float32 inside the kernel.
    loss, stats, logits, prob, policy_err, ref_err_out, _ = _fused_ops().poly_dpo_fwd(
        policy_pred,
        target,
        ref_pred,
        ref_err.detach() if ref_err is not None else None,
        elem_weight,
        pair_weight,
        float(beta),
        float(alpha),
        loss_type,
    )
    # Only the loss is differentiable; the metric outputs of the op carry no gradient.
    stats = stats.detach()
    out = PolyDPOOutput(
        loss=loss,
        logits=logits.detach(),
        prob=prob.detach(),
        accuracy=stats[0],
        margin=stats[1],
        policy_err=policy_err.detach(),
        ref_err=ref_err_out.detach(),
    )
    return count_ties(out, ties)


def _sharded_loss(
    policy_pred, target, ref_pred, ref_err, beta, alpha, elem_weight, pair_weight, ties, loss_type, group
) -> PolyDPOOutput:
    """The loss of samples sharded over `group`: local float64 errors (the fused kernel or the
    reference, as without a group), one all-reduce, then the head on 2B numbers (eager: the
    head's cost is nothing against the errors')."""
    n_local = policy_pred[0].numel()
    policy_err = _local_errors(policy_pred, target, elem_weight)
    if ref_pred is not None:
        with torch.no_grad():
            ref_local = _local_errors(ref_pred, target, elem_weight)
        policy_err, ref_err = reduce_errors([policy_err, ref_local], n_local, group)
    else:
        (policy_err,) = reduce_errors([policy_err], n_local, group)
    out = reference.poly_dpo_from_errors(
        policy_err,
        ref_err,
        beta=float(beta),
        alpha=float(alpha),
        pair_weight=pair_weight,
        loss_type=loss_type,
        math_dtype=torch.float64 if policy_pred.dtype == torch.float64 else torch.float32,
    )
    return count_ties(out, ties)


class PolyDPOLoss(nn.Module):
    """`poly_dpo_loss` with beta and alpha fixed at construction."""

    def __init__(self, beta: float, alpha: float = 0.0, ties: str = "zero", loss_type: str = "sigmoid"):
        super().__init__()
        check_ties(ties)
        check_loss_type(loss_type, alpha, beta)
        self.beta = float(beta)
        self.alpha = float(alpha)
        self.ties = ties
        self.loss_type = loss_type

    def forward(
        self,
        policy_pred: torch.Tensor,
        target: torch.Tensor,
        *,
        ref_pred: torch.Tensor | None = None,
        ref_err: torch.Tensor | None = None,
        elem_weight: torch.Tensor | None = None,
        pair_weight: torch.Tensor | None = None,
        reduce_group=None,
    ) -> PolyDPOOutput:
        return poly_dpo_loss(
            policy_pred,
            target,
            ref_pred=ref_pred,
            ref_err=ref_err,
            beta=self.beta,
            alpha=self.alpha,
            elem_weight=elem_weight,
            pair_weight=pair_weight,
            ties=self.ties,
            loss_type=self.loss_type,
            reduce_group=reduce_group,
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, alpha={self.alpha}, ties={self.ties!r}, loss_type={self.loss_type!r}"
