"""Poly-DPO / Diffusion-DPO loss kernels.

    from vipo.kernels import poly_dpo_loss
    out = poly_dpo_loss(policy_pred, target, ref_pred=ref_pred, beta=5000.0, alpha=8.0)
    out.loss.backward()

Rows [0, B) of every [2B, ...] tensor are winners, rows [B, 2B) their losers.
"""

from .conventions import beta_from
from .poly_dpo import PolyDPOLoss, poly_dpo_loss, sample_errors
from .reference import PolyDPOOutput

__all__ = ["PolyDPOLoss", "PolyDPOOutput", "beta_from", "poly_dpo_loss", "sample_errors"]
