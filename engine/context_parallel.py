"""Context parallelism: the token sequence of each sample split over a group of ranks.

    parallel.context_parallel.ulysses = k   # heads all-to-all (DeepSpeed-Ulysses), k | heads
    parallel.context_parallel.ring = r      # ring attention over k/v shards (any head count)

The attention is diffusers' (`ModelMixin.enable_parallelism` with its `ContextParallelConfig`
and the model's own `_cp_plan`): the sequence is split at the first block and gathered after
the last. What this module adds is the DPO part:

- ranks are laid out as a (data, ring, ulysses) mesh; the k x r ranks of a context group are
  consecutive (one node) and see the same pairs, the same noise and the same t (data and noise
  are drawn by data rank, `World.data_rank`);
- each rank's loss reads its own token shard of prediction and target only, and the group
  all-reduces the 2B per-sample partial errors (`vipo.kernels` with `reduce_group`): every rank
  gets the whole batch's loss and the gradient of its own tokens;
- the parameter gradient of a context group is the sum of its ranks' gradients, which the
  data-parallel mean over all ranks (DDP, FSDP) divides by k x r once too often: the backward
  scales the loss by the group size (`grad_scale`).

Families: Wan and FLUX (their transformers' `_cp_plan`); SD3.5's transformer declares none and is
refused. FLUX splits its text tokens too: their count must divide as well.
"""

import logging
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError
from .errors import RunError

log = logging.getLogger(__name__)

FAMILIES = ("wan", "flux")  # the families whose diffusers transformer declares a _cp_plan


@dataclass
class ContextParallel:
    """This rank's place in the (data, ring, ulysses) mesh and its context group."""

    ulysses: int
    ring: int
    mesh: object  # torch DeviceMesh (data, ring, ulysses)
    group: object  # the context group: the ring x ulysses ranks that share a sample
    rank: int  # this rank's place in it: which token shard it holds
    patch: tuple[int, int, int] = (1, 1, 1)  # the transformer's patch (frames, rows, columns)
    family: str = "wan"

    @property
    def size(self) -> int:
        return self.ulysses * self.ring

    @property
    def grad_scale(self) -> int:
        return self.size

    # -- the model --

    def check(self, network: nn.Module, family: str, attention: str) -> None:
        """Refuse what cannot run, in one line naming the key; learn the model's patch."""
        if family not in FAMILIES:
            raise ConfigError(
                f"parallel.context_parallel works for {', '.join(FAMILIES)}; model.family is {family!r}"
            )
        if self.ring > 1 and attention != "flash_attn":
            # diffusers' ring attention merges partial softmaxes by their log-sum-exp, which its
            # SDPA backend does not return.
            raise ConfigError(
                f"parallel.context_parallel.ring={self.ring} needs model.attention=flash_attn (a backend "
                f"that returns the log-sum-exp); model.attention is {attention!r}. Ulysses alone runs on SDPA"
            )
        self.family = family
        # Wan patches [N, C, F, H, W] by its patch_size; FLUX's adapter packs 2x2 latent patches.
        self.patch = tuple(network.config.patch_size) if family == "wan" else (1, 2, 2)
        heads = getattr(network.config, "num_attention_heads", None)
        if heads is not None and heads % self.ulysses:
            divisors = [k for k in range(1, heads + 1) if heads % k == 0]
            raise ConfigError(
                f"parallel.context_parallel.ulysses={self.ulysses} must divide the model's {heads} attention "
                f"heads (one of {divisors}); for more ranks add ring (e.g. ulysses x ring)"
            )

    def enable(self, network: nn.Module) -> None:
        """diffusers' context parallelism on `network` (a policy or a copy reference)."""
        from diffusers import ContextParallelConfig

        config = ContextParallelConfig(
            ring_degree=self.ring, ulysses_degree=self.ulysses, mesh=self.mesh["ring", "ulysses"]
        )
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        # Its submeshes are host tables of ranks, real also under `vipo plan`'s fake tensor mode.
        with device_count_for(self.mesh.device_type), unset_fake_temporarily():
            network.enable_parallelism(config=config)
        # diffusers 0.42's gather calls a torch collective that torch 2.13 deprecates, once a forward.
        warnings.filterwarnings(
            "ignore", message=".*all_gather_tensor.* is deprecated", category=FutureWarning
        )

    # -- the loss --

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of latents [N, C, F, H, W] (FLUX: [N, C, H, W]) as
        [N, S / size, C * pt * ph * pw]: the transformer's token order (frame, row, column) and
        diffusers' equal split of the sequence."""
        if x.dim() == 4:  # an image family: one frame
            x = x.unsqueeze(2)
        n, c, f, h, w = x.shape
        pt, ph, pw = self.patch
        grid = (f // pt, h // ph, w // pw)
        tokens = grid[0] * grid[1] * grid[2]
        if tokens % self.size:
            raise RunError(
                f"context parallelism splits each sample's {tokens} tokens ({'x'.join(map(str, grid))} "
                f"patches) into {self.size} equal shards: choose a resolution or frame count whose token "
                f"count {self.size} divides"
            )
        x = x.reshape(n, c, grid[0], pt, grid[1], ph, grid[2], pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(n, tokens, -1).chunk(self.size, dim=1)[self.rank]


def device_count_for(device_type: str):
    """Around enable_parallelism: diffusers 0.42 picks the rank's device as
    rank % torch.accelerator.device_count(), which is 0 on a CPU-only machine (gloo), so the CPU
    counts as one device there; on CUDA nothing is changed."""
    if device_type == "cpu":
        return mock.patch.object(torch.accelerator, "device_count", return_value=1)
    return nullcontext()


def setup(parallel_cfg, world) -> ContextParallel | None:
    """The mesh and context groups of `parallel.context_parallel` (every rank calls this; None
    when it is off). Sets `world.context`, from which the data and noise ranks follow."""
    cp = parallel_cfg.context_parallel
    size = cp.size
    if size == 1:
        return None
    if world.size % size:
        raise RunError(
            f"parallel.context_parallel: ulysses x ring = {size} must divide the {world.size} processes"
        )
    from .parallel import device_mesh

    mesh = device_mesh(
        world.device.type, (world.size // size, cp.ring, cp.ulysses), ("data", "ring", "ulysses")
    )
    group = None
    for first in range(0, world.size, size):  # every rank creates every group, in the same order
        ranks = list(range(first, first + size))
        made = dist.new_group(ranks)
        if world.rank in ranks:
            group = made
    world.context = size
    log.info(
        "context parallelism: %d data groups x %d ranks (ulysses %d x ring %d)",
        world.size // size,
        size,
        cp.ulysses,
        cp.ring,
    )
    return ContextParallel(cp.ulysses, cp.ring, mesh, group, world.rank % size)


def loss_inputs(
    adapter, pred: torch.Tensor, target: torch.Tensor, elem_weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(pred, target, kwargs) for vipo.kernels: the whole tensors (and `elem_weight`, which
    broadcasts to them), or under context parallelism this rank's token shard of each, the
    weights expanded to the prediction's shape and sharded alike, and the group to reduce over."""
    context = getattr(adapter, "context", None)
    extra = {} if elem_weight is None else {"elem_weight": elem_weight}
    if context is None:
        return pred, target, extra
    if elem_weight is not None:
        extra["elem_weight"] = context.shard(elem_weight.expand_as(pred))
    return context.shard(pred), context.shard(target), {**extra, "reduce_group": context.group}
