"""Reference-model strategies: how e_ref is computed for a step's shared inputs.

    copy     a frozen copy of the initial denoiser (no grads; the policy's train/eval mode where
             the mode changes nothing, models.base.frozen_mode, so both take the same kernels)
    adapter  the policy itself with its LoRA adapters switched off: no second set of weights

    precomputed  e_ref read from `vipo score-reference`'s table by pair id and epoch

Each has one method, `errors(x_t, t, cond, target, ids=, epoch=, elem_weight=)` -> e_ref [2B]
(`elem_weight`: the batch's weight maps, which the policy's errors use too); the first two
reduce the reference prediction with `sample_errors` at once, so its output is freed before the
policy forward.
"""

import copy

import torch
from torch import nn

from vipo.kernels import sample_errors

from ..context_parallel import loss_inputs
from ..models.base import frozen_mode


def reference_errors(adapter, network, x_t, t, cond, target, elem_weight=None) -> torch.Tensor:
    """e_ref [2B] of `network`'s prediction (under context parallelism: of the whole samples,
    from this rank's tokens and one all-reduce)."""
    pred, target, shard = loss_inputs(adapter, adapter.predict(network, x_t, t, cond), target, elem_weight)
    return sample_errors(pred, target, **shard)


def meta_copy(network: nn.Module) -> nn.Module:
    """A copy of `network` with every parameter and buffer on the meta device: the structure
    (hooks, adapters, modes) without the memory. deepcopy takes tensors from its memo by id."""
    memo = {}
    for tensor in [*network.parameters(), *network.buffers()]:
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = (
            nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
        )
    return copy.deepcopy(network, memo)


def cast_frozen(network: nn.Module, dtype: torch.dtype) -> None:
    """Cast a frozen network's parameters to `dtype` in place, except those its class keeps in
    float32 (diffusers' `_keep_in_fp32_modules`, matched against the parts of each parameter's
    name as diffusers matches them: Wan's norms, time embedding and scale-shift tables). Buffers
    keep their dtype (rotary tables, position ids)."""
    keep = set(getattr(network, "_keep_in_fp32_modules", None) or ())
    for name, param in network.named_parameters():
        if param.is_floating_point() and not keep.intersection(name.split(".")):
            param.data = param.data.to(dtype)


class CopyReference:
    mode = "copy"

    def __init__(self, adapter, *, on_meta: bool = False, dtype: torch.dtype | None = None):
        """`on_meta`: the copy is made on the meta device on every rank, rank 0 included, and
        takes its weights from the policy's when FSDP shards it (parallel.materialise): no
        second full model is ever held, even on rank 0. `dtype` (reference.dtype=bfloat16): the
        copy's weights in it; its forward runs under the step's bf16 autocast, which casts the
        policy's float32 weights to bfloat16 for every matmul and convolution anyway."""
        self.adapter = adapter
        network = meta_copy(adapter.network) if on_meta else copy.deepcopy(adapter.network)
        network.requires_grad_(False)
        if dtype is not None:
            cast_frozen(network, dtype)
        self.network: nn.Module = network.train(frozen_mode(network))

    @torch.no_grad()
    def errors(self, x_t, t, cond, target, *, ids=None, epoch=None, elem_weight=None) -> torch.Tensor:
        return reference_errors(self.adapter, self.network, x_t, t, cond, target, elem_weight)


class AdapterReference:
    mode = "adapter"

    def __init__(self, adapter):
        self.adapter = adapter
        self.same_mode = frozen_mode(adapter.network)  # run in the policy's mode (see frozen_mode)

    @torch.no_grad()
    def errors(self, x_t, t, cond, target, *, ids=None, epoch=None, elem_weight=None) -> torch.Tensor:
        network = self.adapter.network
        was_training = network.training
        network.train(was_training and self.same_mode)
        network.disable_adapters()
        try:
            return reference_errors(self.adapter, network, x_t, t, cond, target, elem_weight)
        finally:
            network.enable_adapters()
            network.train(was_training)


def build_reference(mode: str, adapter, cfg=None, *, on_meta: bool = False):
    if mode == "copy":
        dtype = (
            None if cfg is None or cfg.reference.dtype == "policy" else getattr(torch, cfg.reference.dtype)
        )
        return CopyReference(adapter, on_meta=on_meta, dtype=dtype)
    if mode == "adapter":
        return AdapterReference(adapter)
    if mode == "precomputed":  # the table is found through the run config (data.cache, reference.table)
        from .precomputed import PrecomputedReference

        return PrecomputedReference.from_config(cfg, adapter)
    raise ValueError(f"unknown reference.mode {mode!r}")
