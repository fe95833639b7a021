"""Input checks shared by the reference and the fused kernel, so both refuse the same inputs
with the same words."""

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# How the implicit accuracy counts a tie (z = 0): "zero" as the official Diffusion-DPO code and
# vipo do, "half" as diffusers' DPO scripts do.
TIES = ("zero", "half")
# The loss of a pair as a function of its logit (vipo.kernels.reference has the formulas).
LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def check_ties(ties: str) -> None:
    if ties not in TIES:
        raise ValueError(
            f"ties must be 'zero' (a tie counts as wrong, the official code) or 'half' (diffusers' "
            f"scripts), got {ties!r}"
        )


def check_loss_type(loss_type: str, alpha: float, beta: float) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(
            f"loss_type must be one of {', '.join(map(repr, LOSS_TYPES))} (with alpha, 'sigmoid' is "
            f"Poly-DPO), got {loss_type!r}"
        )
    if loss_type != "sigmoid" and alpha != 0:
        raise ValueError(
            f"alpha={alpha} is the Poly-DPO term of the 'sigmoid' loss; loss_type={loss_type!r} takes alpha=0"
        )
    if loss_type == "ipo" and beta == 0:
        raise ValueError("loss_type='ipo' aims the logit at 1 / beta: beta must not be 0")


def count_ties(out, ties: str):
    """`out` (a PolyDPOOutput) with its accuracy counting ties as `ties` says."""
    if ties == "zero":
        return out
    return out._replace(accuracy=out.accuracy + 0.5 * (out.logits == 0).to(out.accuracy.dtype).mean())


def check_pair_batch(name: str, tensor: torch.Tensor) -> int:
    """Dim 0 holds winners then losers: it must be even and non-zero. Returns B (pairs)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() == 0:
        raise ValueError(f"{name} must have a batch dimension [2B, ...], got a scalar")
    rows = tensor.shape[0]
    if rows == 0 or rows % 2:
        raise ValueError(
            f"{name} has {rows} rows in dim 0; it must be 2B > 0 (winners in rows [0, B), "
            f"losers in rows [B, 2B))"
        )
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {tensor.dtype}")
    return rows // 2


def check_float(name: str, tensor: torch.Tensor, *, bool_ok: bool = False) -> None:
    """A floating-point tensor (or a bool mask where `bool_ok`), named in the refusal."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype in FLOAT_DTYPES or (bool_ok and tensor.dtype == torch.bool):
        return
    allowed = "float32, bfloat16, float16 or float64" + (" (or a bool mask)" if bool_ok else "")
    raise TypeError(f"{name} must be {allowed}, got {tensor.dtype}")


def check_no_grad(name: str, tensor: torch.Tensor) -> None:
    """The loss differentiates policy_pred alone: a target that requires grad would get a gradient
    on one path and none on the other, so both refuse it."""
    if tensor.requires_grad:
        raise ValueError(
            f"{name} requires grad, but the loss differentiates policy_pred only: pass {name}.detach()"
        )


def check_same_shape(name: str, tensor: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    check_float(name, tensor)
    if tensor.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)} but {like_name} has {tuple(like.shape)}")
    if tensor.device != like.device:
        raise ValueError(f"{name} is on {tensor.device} but {like_name} is on {like.device}")


def check_elem_weight(elem_weight: torch.Tensor | None, pred: torch.Tensor) -> None:
    if elem_weight is None:
        return
    check_float("elem_weight", elem_weight, bool_ok=True)
    if elem_weight.dim() > pred.dim():
        raise ValueError(
            f"elem_weight has shape {tuple(elem_weight.shape)}, more dims than pred {tuple(pred.shape)}"
        )
    try:
        torch.broadcast_shapes(elem_weight.shape, pred.shape)
    except RuntimeError:
        raise ValueError(
            f"elem_weight of shape {tuple(elem_weight.shape)} does not broadcast to pred {tuple(pred.shape)}"
        ) from None
    if torch.broadcast_shapes(elem_weight.shape, pred.shape) != pred.shape:
        raise ValueError(
            f"elem_weight of shape {tuple(elem_weight.shape)} would enlarge pred {tuple(pred.shape)}"
        )
    if elem_weight.device != pred.device:
        raise ValueError(f"elem_weight is on {elem_weight.device} but pred is on {pred.device}")


def check_loss_inputs(
    policy_pred: torch.Tensor,
    target: torch.Tensor,
    ref_pred: torch.Tensor | None,
    ref_err: torch.Tensor | None,
    beta: float,
    alpha: float,
    elem_weight: torch.Tensor | None,
    pair_weight: torch.Tensor | None,
    loss_type: str = "sigmoid",
) -> int:
    """Validate the arguments of `poly_dpo_loss`; returns B, the number of pairs."""
    pairs = check_pair_batch("policy_pred", policy_pred)
    check_same_shape("target", target, "policy_pred", policy_pred)
    check_no_grad("target", target)
    if (ref_pred is None) == (ref_err is None):
        raise ValueError(
            "pass exactly one of ref_pred (reference prediction, same shape as policy_pred) or "
            "ref_err (reference per-sample errors [2B] from sample_errors)"
        )
    if ref_pred is not None:
        check_same_shape("ref_pred", ref_pred, "policy_pred", policy_pred)
    else:
        check_float("ref_err", ref_err)
        if ref_err.shape != (2 * pairs,):
            shape = tuple(ref_err.shape) if isinstance(ref_err, torch.Tensor) else type(ref_err).__name__
            raise ValueError(f"ref_err must have shape [2B] = [{2 * pairs}], got {shape}")
        if ref_err.device != policy_pred.device:
            raise ValueError(f"ref_err is on {ref_err.device} but policy_pred is on {policy_pred.device}")
    for name, value in (("beta", beta), ("alpha", alpha)):
        if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    check_loss_type(loss_type, alpha, beta)
    check_elem_weight(elem_weight, policy_pred)
    if pair_weight is not None:
        check_float("pair_weight", pair_weight)
        if pair_weight.shape != (pairs,):
            raise ValueError(f"pair_weight must have shape [B] = [{pairs}], got {tuple(pair_weight.shape)}")
        if pair_weight.device != policy_pred.device:
            raise ValueError(
                f"pair_weight is on {pair_weight.device} but policy_pred is on {policy_pred.device}"
            )
    return pairs
