"""Public entry points of vipo.kernels: one place that picks the implementation."""

import torch
from torch import nn

from . import reference
from .reference import PolyDPOOutput


def sample_errors(
    pred: torch.Tensor, target: torch.Tensor, elem_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample mean of `elem_weight * (pred - target)^2` over every non-batch dim -> float32 [2B]."""
    return reference.sample_errors(pred, target, elem_weight)


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
) -> PolyDPOOutput:
    """Poly-DPO loss and metrics; see `vipo.kernels.reference` for the exact definition."""
    return reference.poly_dpo_loss(
        policy_pred,
        target,
        ref_pred=ref_pred,
        ref_err=ref_err,
        beta=beta,
        alpha=alpha,
        elem_weight=elem_weight,
        pair_weight=pair_weight,
    )


class PolyDPOLoss(nn.Module):
    """`poly_dpo_loss` with beta and alpha fixed at construction."""

    def __init__(self, beta: float, alpha: float = 0.0):
        super().__init__()
        self.beta = float(beta)
        self.alpha = float(alpha)

    def forward(
        self,
        policy_pred: torch.Tensor,
        target: torch.Tensor,
        *,
        ref_pred: torch.Tensor | None = None,
        ref_err: torch.Tensor | None = None,
        elem_weight: torch.Tensor | None = None,
        pair_weight: torch.Tensor | None = None,
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
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, alpha={self.alpha}"
