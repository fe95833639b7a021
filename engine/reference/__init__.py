"""Reference-model strategies: how e_ref is computed for a step's shared inputs.

    copy     a frozen copy of the initial denoiser (no grads; the policy's train/eval mode where
             the mode changes nothing, models.base.frozen_mode, so both take the same kernels)
    adapter  the policy itself with its LoRA adapters switched off: no second set of weights

    precomputed  e_ref read from `vipo score-reference`'s table by pair id and epoch

Each has one method, `errors(x_t, t, cond, target, ids=, epoch=, elem_weight=)` -> e_ref [2B]
(`elem_weight`: the batch's weight maps, which the policy's errors use too); the first two
reduce the reference prediction with `sample_errors` at once, so its output is freed before the
policy forward. With reference.offload a copy's weights live in host memory between passes
(HostWeights) and are on the device only for its own pass.
"""

import copy
from contextlib import contextmanager, nullcontext

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


def pin_host(device: torch.device) -> bool:
    """Host buffers are pinned (page-locked) where the device is a GPU: their copies to it are DMA
    transfers at full PCIe bandwidth that queue on the stream without blocking the host."""
    return device.type == "cuda"


class HostWeights:
    """reference.offload: a frozen network's parameters in host memory, one flat buffer per dtype
    (pinned for a GPU), for the whole run. `on(device)` copies each parameter to the device for
    the block (its own tensor, from its view of the pinned buffer: asynchronous DMA transfers queued
    on the stream the pass runs on); after it the parameters point at the host buffer again and
    the device copies are freed, so the policy's forward and backward run without them. Buffers
    (position tables, norms' running stats) stay where they are: a few KiB."""

    def __init__(self, network: nn.Module, *, pin: bool):
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for param in network.parameters():  # each shared parameter once
            by_dtype.setdefault(param.dtype, []).append(param)
        self.flats: list[torch.Tensor] = []
        self.params: list[nn.Parameter] = []
        self.views: list[torch.Tensor] = []
        for dtype, params in by_dtype.items():
            flat = torch.empty(sum(p.numel() for p in params), dtype=dtype, pin_memory=pin)
            offset = 0
            for param in params:
                view = flat[offset : offset + param.numel()].view(param.shape)
                offset += param.numel()
                view.copy_(param.data)
                param.data = view  # the device's (or deepcopy's) tensor goes with its last reference
                self.params.append(param)
                self.views.append(view)
            self.flats.append(flat)

    @property
    def nbytes(self) -> int:
        return sum(flat.numel() * flat.element_size() for flat in self.flats)

    @contextmanager
    def on(self, device: torch.device):
        try:
            for param, view in zip(self.params, self.views, strict=True):
                # A tensor of its own, new even where `device` is the host (a CPU run): the pass
                # reads a copy. Not views of one device buffer: under a fake trace (vipo plan) every
                # view op on a weight made that way got a storage of its own, the whole buffer's size.
                param.data = torch.empty_like(view, device=device).copy_(view, non_blocking=True)
            yield
        finally:  # the copies go with these last references, queued after the pass on its stream
            for param, view in zip(self.params, self.views, strict=True):
                param.data = view


class CopyReference:
    mode = "copy"

    def __init__(
        self, adapter, *, on_meta: bool = False, dtype: torch.dtype | None = None, offload: bool = False
    ):
        """`on_meta`: the copy is made on the meta device on every rank, rank 0 included, and
        takes its weights from the policy's when FSDP shards it (parallel.materialise): no
        second full model is ever held, even on rank 0. `dtype` (reference.dtype=bfloat16): the
        copy's weights in it; its forward runs under the step's bf16 autocast, which casts the
        policy's float32 weights to bfloat16 for every matmul and convolution anyway. `offload`
        (reference.offload): its weights in host memory between passes (HostWeights)."""
        if offload and on_meta:
            raise ValueError("reference.offload keeps whole weights on the host: not with a meta copy")
        self.adapter = adapter
        network = meta_copy(adapter.network) if on_meta else copy.deepcopy(adapter.network)
        network.requires_grad_(False)
        if dtype is not None:
            cast_frozen(network, dtype)
        self.device = next(adapter.network.parameters()).device
        self.host = HostWeights(network, pin=pin_host(self.device)) if offload else None
        self.network: nn.Module = network.train(frozen_mode(network))

    @torch.no_grad()
    def errors(self, x_t, t, cond, target, *, ids=None, epoch=None, elem_weight=None) -> torch.Tensor:
        with nullcontext() if self.host is None else self.host.on(self.device):
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
        offload = cfg is not None and cfg.reference.offload
        return CopyReference(adapter, on_meta=on_meta, dtype=dtype, offload=offload)
    if mode == "adapter":
        return AdapterReference(adapter)
    if mode == "precomputed":  # the table is found through the run config (data.cache, reference.table)
        from .precomputed import PrecomputedReference

        return PrecomputedReference.from_config(cfg, adapter)
    raise ValueError(f"unknown reference.mode {mode!r}")
