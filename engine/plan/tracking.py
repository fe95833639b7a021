"""torch's own tools, fitted to a fake-tensor trace of a training step:

    StepMemTracker        MemTracker without module-wise snapshots, with phase peaks
    cuda_autocast_policy  CUDA autocast's fp32 policy for the ops where CPU autocast differs
    CPU_FLASH_FLOPS       FlopCounterMode's SDPA formulas for the CPU flash kernel

See engine/plan/__init__.py for why each is needed.
"""

import gc
import weakref
from collections import Counter
from contextlib import contextmanager
from unittest import mock

import torch
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType, _UpdateType
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from torch.utils.weak import WeakIdKeyDictionary

PHASES = ("data", "encode", "reference", "policy_forward", "loss", "backward", "optimizer")

# CUDA autocast's policy for ops CPU autocast leaves in the input dtype (aten/src/ATen/autocast_mode.cpp):
# "fp32" casts floating inputs to float32; "fp32_out" asks for a float32 output (no input copy).
CUDA_FP32_OPS = {
    "group_norm": "fp32",
    "layer_norm": "fp32",
    "native_layer_norm": "fp32",
    "rms_norm": "fp32",
    "upsample_nearest2d": "fp32",
    "upsample_bilinear2d": "fp32",
    "softmax.int": "fp32_out",
    "log_softmax.int": "fp32_out",
}
ATTENTION_OPS = (
    "_scaled_dot_product",
    "_flash_attention",
    "_efficient_attention",
    "_safe_softmax",
    "_softmax",
)


def _cpu_flash_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_FLASH_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops,
}


@contextmanager
def collections_at_marks():
    """The garbage collector off, everything older frozen: cyclic garbage goes only where the trace
    collects it (phase marks, recomputed blocks), so a plan is the same every time, and a
    collection scans only what the step made (engine/plan/__init__.py, "Cyclic garbage")."""
    enabled = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


class _NoModules:
    """FlopCounterMode's module tracker, tracking no module: the plan needs each phase's total
    only, and torch's ModuleTracker registers gradient hooks on every tensor a module makes, also
    on a checkpointed block's recomputation in backward, keeping those tensors alive until the
    hooks fire (for Wan, whose blocks share inputs: after the last block), so the trace would
    count every recomputed block's activations at once."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class TotalFlopCounter(FlopCounterMode):
    """FlopCounterMode counting totals alone (`get_total_flops`), with the CPU flash formulas."""

    def __init__(self):
        super().__init__(display=False, custom_mapping=CPU_FLASH_FLOPS)
        self.mod_tracker = _NoModules()


class StepMemTracker(MemTracker):
    """MemTracker keeping the global peak, the peak of each phase and the attention ops seen."""

    def __init__(self):
        super().__init__()
        self.phase = PHASES[0]
        self.phase_peaks: dict[str, int] = {}
        self.peak_phase = self.phase
        self.attention_ops: dict[str, Counter] = {}
        self._seen = WeakIdKeyDictionary()
        self._recomputed = WeakIdKeyDictionary()
        self._propagating = 0  # inside DTensor's sharding propagation (see __enter__)
        # Host memory (parallel.cpu_offload): storages marked by mark_host, which the device peak
        # leaves out; their bytes by MemTracker's kind and by role, kept as MemTracker updates them.
        self._host: dict[int, str] = {}  # id(_WeakRefInfo) -> role
        self.host_kinds: Counter = Counter()
        self.host_roles: Counter = Counter()
        self.host_peak = 0
        self.host_at_peak: tuple[dict, dict] = ({}, {})

    def __enter__(self):
        # DTensor derives an op's output metadata by running it on fake tensors of the GLOBAL
        # shapes (ShardingPropagator._propagate_tensor_meta_non_cached), inside the fake mode it
        # detects. MemTracker skips those ops by telling that nested fake mode from the one it
        # entered under; in this trace they are the same mode, so it counted them: under fsdp the
        # clip and fused AdamW on sharded parameters held a whole unsharded model's worth of fake
        # tensors (SDXL on 8 GPUs: the optimizer phase traced 20.4 GB against 10.1 GB at its start).
        # No GPU allocates them: the tracker ignores every op run inside the propagation.
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        propagate = ShardingPropagator._propagate_tensor_meta_non_cached

        def untracked(propagator, op_schema):
            self._propagating += 1
            try:
                return propagate(propagator, op_schema)
            finally:
                self._propagating -= 1

        self._unpatch = mock.patch.object(ShardingPropagator, "_propagate_tensor_meta_non_cached", untracked)
        self._unpatch.start()
        try:
            entered = super().__enter__()
        except BaseException:
            self._unpatch.stop()
            raise
        if self._depth == 1:  # MemTracker starts its peak at everything held, host memory included
            self._peak_mem, self._peak_mem_snap = {}, {}
            self._update_peak_stats(None)
        return entered

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._unpatch.stop()

    def mark_host(self, tensor: torch.Tensor, role: str) -> None:
        """`tensor`'s storages are in host memory from now on (until they are freed): the sharded
        weights, gradients and optimizer state FSDP's CPUOffloadPolicy keeps there."""
        if tensor is None:
            return
        if is_traceable_wrapper_subclass(tensor):  # a DTensor: its local shard
            for name in tensor.__tensor_flatten__()[0]:
                inner = getattr(tensor, name)
                if torch.is_tensor(inner):
                    self.mark_host(inner, role)
            return
        winfo, _ = self._WINFO.get(tensor.untyped_storage(), (None, None))
        if winfo is None:
            (winfo,) = self._update_and_maybe_create_winfos(tensor, _MemRefType.OTH)
        if id(winfo) in self._host:
            return
        self._host[id(winfo)] = role
        self.host_kinds[winfo.reftype] += winfo.mem_consumed
        self.host_roles[role] += winfo.mem_consumed
        self.host_peak = max(self.host_peak, self.host_kinds.total())

    def _update_snap(self, u_type, winfo, old_mem_consumed=None, old_reftype=None) -> None:
        super()._update_snap(u_type, winfo, old_mem_consumed, old_reftype)
        role = self._host.get(id(winfo))
        if role is None:
            return
        if u_type == _UpdateType.DEL:
            del self._host[id(winfo)]
            self.host_kinds[winfo.reftype] -= winfo.mem_consumed
            self.host_roles[role] -= winfo.mem_consumed
        elif u_type == _UpdateType.REF:
            self.host_kinds[old_reftype] -= winfo.mem_consumed
            self.host_kinds[winfo.reftype] += winfo.mem_consumed
        elif u_type == _UpdateType.SIZE:
            self.host_kinds[winfo.reftype] += winfo.mem_consumed - old_mem_consumed
            self.host_roles[role] += winfo.mem_consumed - old_mem_consumed
        self.host_peak = max(self.host_peak, self.host_kinds.total())

    def _update_peak_stats(self, peak_state) -> None:
        # The device's bytes: everything the step holds but what is marked as host memory.
        total = sum(snap[_TOTAL_KEY] for snap in self._curr_mem_snap.values()) - self.host_kinds.total()
        if total > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = total
        cpu = torch.device("cpu")
        if total > self._peak_mem.get(cpu, 0):
            self._peak_mem[cpu] = total
            self._peak_mem_snap = {cpu: _merged(self._curr_mem_snap)}
            self.peak_phase = self.phase
            if self._host:
                self.host_at_peak = (dict(self.host_kinds), dict(self.host_roles))

    # Module hooks: track each module's weights the first time it runs (and note recomputation under
    # activation checkpointing); no per-module snapshots, so a module may run twice in a step (the
    # adapter reference runs the policy network with its LoRA off, then the policy runs it).
    def _pre_fw_hook(self, module, inputs) -> None:
        if module not in self._seen:
            self._seen[module] = True
            self._track_module_params_and_buffers(module, install_grad_hooks=True)
        if self._mod_tracker.is_bw and self._ac_mod is None:  # a checkpointed block recomputes
            self._ac_mod, self._in_ac = weakref.ref(module), True
            self._recomputed[module] = True

    def _post_fw_hook(self, module, inputs, outputs) -> None:
        if self._mod_tracker.is_bw and self._ac_mod is not None and self._ac_mod() is module:
            self._ac_mod, self._in_ac = None, False

    def _pre_bw_hook(self, module, args) -> None:
        pass

    def _post_bw_hook(self, module, args) -> None:
        # The hooks set on a recomputed block's outputs leave its activations in reference cycles
        # (an artefact of the tracking, see engine/plan/__init__.py): freed once its backward is done.
        if module is not None and module in self._recomputed:
            gc.collect()

    def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True) -> tuple[int, int]:
        # MemTracker's own registers a gradient hook on every parameter, which fails on a frozen one
        # (the reference copy, the encoders, a LoRA base): hooks only where gradients flow.
        def track_grad(grad: torch.Tensor) -> None:
            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

        sizes = []
        for kind, tensors in (
            (_MemRefType.PARAM, module.parameters()),
            (_MemRefType.BUFFER, module.buffers()),
        ):
            size = 0
            for tensor in tensors:
                size += sum(w.mem_consumed for w in self._update_and_maybe_create_winfos(tensor, kind))
                if kind is not _MemRefType.PARAM:
                    continue
                if tensor.grad is not None:
                    track_grad(tensor.grad)
                if (
                    install_grad_hooks
                    and tensor.requires_grad
                    and tensor not in self._param_to_grad_hook_handles
                ):
                    self._param_to_grad_hook_handles[tensor] = (
                        tensor.register_hook(track_grad),
                        tensor.register_post_accumulate_grad_hook(lambda p: track_grad(p.grad)),
                    )
            sizes.append(size)
        return sizes[0], sizes[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._propagating:
            return func(*args, **(kwargs or {}))
        name = str(func)
        if any(key in name for key in ATTENTION_OPS):
            self.attention_ops.setdefault(self.phase, Counter())[name] += 1
        return super().__torch_dispatch__(func, types, args, kwargs)

    def peak(self) -> dict:
        """The snapshot at the device's peak, by MemTracker's kinds, host memory left out."""
        snap = dict(next(iter(self._peak_mem_snap.values()), {}))
        kinds, _ = self.host_at_peak
        for kind, value in kinds.items():
            snap[kind] = snap.get(kind, 0) - value
            snap[_TOTAL_KEY] = snap.get(_TOTAL_KEY, 0) - value
        return snap


def _merged(snaps: dict) -> dict:
    merged: dict = {}
    for snap in snaps.values():
        for key, value in snap.items():
            merged[key] = merged.get(key, 0) + value
    return merged


@contextmanager
def cuda_autocast_policy():
    """CPU autocast with CUDA's fp32 policy for CUDA_FP32_OPS (AutocastCPU kernels for the block)."""
    library = torch.library.Library("aten", "IMPL")
    exclude = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def kernel(op, policy):
        def run(*args, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(exclude):
                if policy == "fp32_out":
                    if kwargs.get("dtype") is None and len(args) < 3:
                        kwargs["dtype"] = torch.float32
                    return op(*args, **kwargs)
                args, kwargs = torch.utils._pytree.tree_map_only(torch.Tensor, _to_fp32, (args, kwargs))
                return op(*args, **kwargs)

        return run

    try:
        for name, policy in CUDA_FP32_OPS.items():
            base, _, overload = name.partition(".")
            op = getattr(getattr(torch.ops.aten, base), overload or "default")
            library.impl(name, kernel(op, policy), "AutocastCPU")
        yield
    finally:
        library._destroy()


def _to_fp32(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point() and tensor.dtype != torch.float64:
        return tensor.float()
    return tensor
