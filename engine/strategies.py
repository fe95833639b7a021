"""One object per `parallel.strategy`: how the policy is wrapped, how a micro-batch's gradients
are made and reduced, how the update is applied, and how a checkpoint is written and read.
The trainer calls the same methods whatever the strategy; what differs lives here.

    strategy = build_strategy(cfg, world, adapter, reference, lr, probe)
    with strategy.micro_step(last):            # DDP: no all-reduce before the last micro-batch
        loss = forward_loss(..., strategy.policy, ...)
        strategy.backward(loss, accum, last)
    norm, skipped = strategy.update(finite)    # clip + step, or skip a non-finite step
    strategy.save(...) / strategy.load(path, state)
"""

import contextlib
import math
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch

from . import parallel
from .checkpoint import (
    DEEPSPEED_TAG,
    load_checkpoint,
    load_sharded_checkpoint,
    read_rng,
    save_checkpoint,
    save_sharded_checkpoint,
)
from .errors import RunError
from .models import compile_network
from .optim import build_optimizer, build_schedule


class Strategy:
    """One process, or the base of the others: plain backward, clip and AdamW step, safetensors
    checkpoints written by rank 0."""

    name = "none"
    formats = ("safetensors", "dcp")  # an FSDP checkpoint loads into a plain network too

    def __init__(self, cfg, world, network, optimizer, scheduler, policy=None):
        self.cfg, self.world, self.network = cfg, world, network
        self.optimizer, self.scheduler = optimizer, scheduler
        self.policy = network if policy is None else policy  # what the forward calls
        self.params = [p for p in network.parameters() if p.requires_grad]

    # -- a step --

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def micro_step(self, last: bool):
        return nullcontext()

    def backward(self, loss: torch.Tensor, accum: int, last: bool) -> None:
        (loss / accum).backward()

    def _clip(self) -> torch.Tensor:
        max_norm = self.cfg.optim.max_grad_norm
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else float("inf"))

    def update(self, finite: bool) -> tuple[torch.Tensor, str | None]:
        """Clip and step; (gradient norm before clipping, why the update was skipped or None)."""
        if not finite:
            self.zero_grad()
            return torch.tensor(float("nan")), "loss"
        grad_norm = self._clip()
        if not bool(torch.isfinite(grad_norm)):  # a finite loss with inf / NaN gradients
            self.zero_grad()
            return grad_norm, "gradient norm"
        self.optimizer.step()
        return grad_norm, None

    # -- checkpoints --

    def check_resumable(self, path: Path, state: dict) -> None:
        fmt = state["format"]
        if fmt in self.formats:
            return
        if fmt == "deepspeed":
            raise RunError(f"{path} is a DeepSpeed checkpoint: resume it with parallel.strategy=zero2/zero3")
        if fmt == "safetensors":
            raise RunError(
                f"{path} was written by one process or ddp; parallel.strategy={self.name} cannot resume it "
                "(resume with ddp, or start from its weights with model.init_from)"
            )
        raise RunError(f"{path} is an FSDP checkpoint: resume it with parallel.strategy=fsdp, ddp or none")

    def save(
        self, out_dir: Path, step: int, state: dict, rng: dict, *, latest: bool, suffix: str, extra=None
    ) -> Path:
        path = Path(out_dir) / "checkpoints" / f"step-{step:06d}{suffix}"
        if self.world.is_main:  # replicas: rank 0 writes them all
            path = save_checkpoint(
                out_dir,
                step,
                self.network,
                self.optimizer,
                self.scheduler,
                None,
                {**state, "world_size": self.world.size},
                self.cfg,
                rng,
                latest=latest,
                suffix=suffix,
                extra=extra,
            )
        self.world.barrier()
        return path

    def load(self, path: Path, state: dict) -> dict[str, torch.Tensor]:
        """Weights, optimizer and schedule from `path`; returns the noise-generator states."""
        if state["format"] == "safetensors":
            load_checkpoint(path, self.network, self.optimizer, self.scheduler)
            return read_rng(path)
        _, rng = load_sharded_checkpoint(
            path, network=self.network, optimizer=self.optimizer, scheduler=self.scheduler, engine=None
        )
        return rng

    def close(self) -> None:
        pass


class DDPStrategy(Strategy):
    """Replicas; gradients all-reduced once per optimizer step (no_sync before the last micro-batch)."""

    name = "ddp"

    def zero_grad(self) -> None:
        # The gradients are views of DDP's buckets (parallel.apply_ddp): zeroed, never dropped.
        self.optimizer.zero_grad(set_to_none=False)

    def micro_step(self, last: bool):
        return nullcontext() if last else self.policy.no_sync()


class ShardedSave:
    """Every rank writes its share: DCP files for fsdp, DeepSpeed's own states for ZeRO (whose
    engine, when there is one, writes them)."""

    engine = None

    def save(self, out_dir, step, state, rng, *, latest, suffix, extra=None):
        return save_sharded_checkpoint(
            out_dir,
            step,
            world=self.world,
            network=self.network,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            engine=self.engine,
            rng=rng,
            state=state,
            cfg=self.cfg,
            latest=latest,
            suffix=suffix,
            extra=extra,
        )


class FSDPStrategy(ShardedSave, Strategy):
    """FSDP2: gradients reduce-scattered every micro-batch; the norm is a DTensor of the global
    norm; every rank writes its shards with torch.distributed.checkpoint."""

    name = "fsdp"
    formats = ("dcp",)

    def _clip(self) -> torch.Tensor:
        norm = super()._clip()
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class DeepSpeedStrategy(ShardedSave, Strategy):
    """ZeRO-2/3: the engine runs backward (dividing by its own accumulation count), counts
    micro-batches, clips and steps at the boundary, and skips an overflowing update itself."""

    formats = ("deepspeed",)

    def __init__(self, cfg, world, network, optimizer, scheduler, engine, reference_engine=None):
        super().__init__(cfg, world, network, optimizer, scheduler, policy=engine)
        self.name = cfg.parallel.strategy
        self.engine, self.reference_engine = engine, reference_engine

    def zero_grad(self) -> None:
        pass  # the engine zeroes its own gradients at the boundary

    def backward(self, loss, accum, last):
        self.engine.backward(loss)
        if not last:
            self.engine.step()  # counts the micro-batch; the update waits for the boundary

    def update(self, finite):
        skipped = self.engine.skipped_steps
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        applied = self.engine.skipped_steps == skipped
        if applied and (not finite or (norm is not None and not math.isfinite(float(norm)))):
            raise RunError(
                f"DeepSpeed applied an update with a non-finite {'loss' if not finite else 'gradient norm'}; "
                "the weights are not saved. Resume from the last checkpoint (--resume), e.g. with a lower optim.lr"
            )
        value = torch.tensor(float("nan") if norm is None or not finite else float(norm))
        if not finite:
            return value, "loss"
        return value, None if applied else "gradient (DeepSpeed skipped the update)"

    def load(self, path, state):
        saved = state.get("world_size", self.world.size)
        universal = None
        if saved != self.world.size:  # ZeRO partitions of another world size: DeepSpeed's universal format
            universal = universal_checkpoint(path, Path(self.cfg.train.output_dir), self.world)
        try:
            _, rng = load_sharded_checkpoint(
                path,
                network=self.network,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                engine=self.engine,
                universal=universal,
            )
        finally:
            if universal is not None:
                self.world.barrier()  # every rank has read it
                if self.world.is_main:
                    shutil.rmtree(universal.parent, ignore_errors=True)
                    with contextlib.suppress(OSError):  # out_dir/universal, unless it holds others
                        universal.parent.parent.rmdir()
        return rng

    def close(self) -> None:
        for engine in (self.engine, self.reference_engine):
            if engine is not None:
                engine.destroy()


def universal_checkpoint(path: Path, out_dir: Path, world) -> Path:
    """`path`'s DeepSpeed states converted by DeepSpeed's ds_to_universal (rank 0, every torch.load
    weights-only as for any DeepSpeed state) into out_dir/universal/<step>/deepspeed, a folder every
    rank sees, which ZeRO loads on any world size. vipo's checkpoints carry no
    `universal_checkpoint_info`; the converter's defaults for it (`inject_missing_state`) serve a
    model without tensor or pipeline parallelism. One extract and one merge worker: the converter
    then runs in this process, where deepspeed_loads() holds (its worker processes would not)."""
    import argparse
    import io
    import logging

    from .safe_load import deepspeed_loads

    target = Path(out_dir) / "universal" / Path(path).name / DEEPSPEED_TAG
    if world.is_main:
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        shutil.rmtree(target.parent, ignore_errors=True)
        args = argparse.Namespace(
            input_folder=str(Path(path) / DEEPSPEED_TAG),
            output_folder=str(target),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
        logging.getLogger(__name__).info(
            "%s: written by another world size; converting it to DeepSpeed's universal format in %s",
            path,
            target,
        )
        with deepspeed_loads(), contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
            ds_to_universal(args)
    world.barrier()
    return target


def build_strategy(cfg, world, adapter, reference, lr: float, probe) -> Strategy:
    """Wrap the policy (and a copy reference) for `parallel.strategy` and build the optimizer
    (optim.py) that trains what the strategy trains (FSDP's sharded parameters, ZeRO's
    partitions) and its LR schedule. `probe()` gives one sample's (latents, cond) for FSDP's
    first forward."""
    strategy, mixed = cfg.parallel.strategy, cfg.train.mixed_precision
    network = adapter.network
    ds_config = (
        parallel.deepspeed_config(cfg.parallel, cfg.train, cfg.optim, world)
        if strategy in parallel.DEEPSPEED
        else None
    )
    # torchtitan's order: activation checkpointing (at the build), compile, then sharding.
    compile_network(network, cfg.train.compile, world.device)
    if reference is not None and getattr(reference, "network", None) is not None:
        compile_network(reference.network, cfg.train.compile, world.device)
    policy = network
    if strategy == "ddp":
        policy = parallel.apply_ddp(network, world)
    from_rank0 = parallel.meta_start(cfg.parallel, cfg.model, world)
    full = None
    if strategy == "fsdp":
        full = parallel.full_weights(network, world) if from_rank0 else None
        parallel.apply_fsdp(network, world, cfg.parallel, mixed)
        if from_rank0:
            parallel.materialise(network, full, world)
        parallel.first_forward(adapter, network, *probe(), world.device)
    if reference is not None:  # a copy reference made on meta takes the policy's initial weights
        initial = (network, full) if from_rank0 else None
        parallel.parallelize_reference(
            reference, strategy, world, cfg.parallel, mixed, ds_config, initial=initial
        )
    del full
    params = [p for p in network.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optim, lr, world.device)
    scheduler = build_schedule(optimizer, cfg.optim, cfg.train.max_steps)
    if ds_config is not None:
        engine = parallel.apply_deepspeed(network, optimizer, ds_config)
        reference_engine = getattr(reference, "network", None)
        return DeepSpeedStrategy(
            cfg,
            world,
            network,
            optimizer,
            scheduler,
            engine,
            reference_engine if hasattr(reference_engine, "destroy") else None,
        )
    if strategy == "ddp":
        return DDPStrategy(cfg, world, network, optimizer, scheduler, policy)
    if strategy == "fsdp":
        return FSDPStrategy(cfg, world, network, optimizer, scheduler)
    return Strategy(cfg, world, network, optimizer, scheduler)
