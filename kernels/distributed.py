"""Errors of samples whose elements are spread over processes (context parallelism).

Under context (sequence) parallelism each rank of a group holds a shard of every sample's
tokens. The Poly-DPO loss needs only each sample's mean squared error, so a rank reduces its
shard to 2B partial sums and the group all-reduces those (a few floats, not the predictions);
every rank then runs the same head on the whole-sample errors and gets the same loss.

The backward does not communicate: every rank's dL/d(error) is the same (same head, same
inputs), and d(error)/d(element) is local, so each rank's gradient is exactly that of its own
elements. The parameter gradient of a model whose ranks hold token shards is the SUM of the
ranks' gradients over the group (a data-parallel mean over all ranks divides it by the group
size once too often: scale the loss by the group size, as vipo.engine does).
"""

import torch
import torch.distributed as dist


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, packed: torch.Tensor, group) -> torch.Tensor:
        out = packed.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def check_group(group) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("reduce_group needs an initialised torch.distributed process group")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"reduce_group must be a torch.distributed ProcessGroup, got {type(group).__name__}")


def reduce_errors(errors: list[torch.Tensor], n_local: int, group) -> list[torch.Tensor]:
    """Whole-sample mean errors from each rank's means over its own `n_local` elements per
    sample: sum_r(e_r * n_r) / sum_r(n_r), for every tensor of `errors` ([2B] each) in one
    all-reduce of float64 (so shards of unequal size weigh right). Differentiable w.r.t. each
    entry of `errors`, locally."""
    check_group(group)
    rows = errors[0].shape[0]
    count = torch.full((1,), float(n_local), dtype=torch.float64, device=errors[0].device)
    packed = torch.cat([err.to(torch.float64) * n_local for err in errors] + [count])
    total = _SumOverGroup.apply(packed, group)
    n_total = total[-1].detach()
    return [chunk / n_total for chunk in total[:-1].split(rows)]
