"""vipo's step as training runs it: the engine's own Trainer, built from a RunConfig, timed through
its phase marks. Nothing of the step is here; only the batch and the phase clock are.

    trainer = Trainer(cfg, data=..., reference=...)     models.build_adapter, reference, strategy
    per step: the host batch to the device               (mark "data")
              trainer.strategy.zero_grad()
              trainer.forward_backward(batch)            encode, reference, policy_forward, loss, backward
              finite = one host sync of the loss
              trainer.update(finite)                     clip + AdamW (mark "optimizer")
    (train_step's LR-schedule step, one Python call, is all of the trainer's step left out)

A latent-cache run (`data.cache` set; --inputs latents) trains on LatentPairBatch and draws its
noise from the counter RNG, as real cached runs do; a pixels run on PairBatch, encoders online.
The pair source is replaced by a small procedural one (the batch is made here, of the workload's
shape) and reference.mode=precomputed by a table of random errors: only speed is measured.
"""

import gc

import torch

from vipo.benchmarks.step_workload import HostBatch, Workload
from vipo.engine.config import RunConfig
from vipo.engine.models import build_adapter
from vipo.engine.objectives import LatentPairBatch, PairBatch
from vipo.engine.reference.precomputed import PrecomputedReference
from vipo.engine.trainer import Trainer
from vipo.loaders.procedural import ProceduralPairs

# A placeholder for data.cache: it makes a latent-cache run of the config (counter-RNG noise; what
# reference.mode=precomputed requires), while the batches come from the benchmark, never a folder.
SYNTHETIC_CACHE = "synthetic-latents-of-vipo-bench-step"


class RandomErrorTable:
    """Stands in for `vipo score-reference`'s table: `lookup(ids, epoch)` gives e_ref [2B] (winners,
    then losers) as a float32 CPU tensor, as the real table does after reading its file."""

    def __init__(self, rows: int):
        self.errors = torch.rand(rows, generator=torch.Generator().manual_seed(2)) * 0.1

    def lookup(self, ids, epoch) -> torch.Tensor:
        return self.errors


def bench_source(cfg: RunConfig) -> ProceduralPairs:
    """The pair source the trainer is given: enough pairs for a batch; its records are never drawn."""
    return ProceduralPairs(max(8, cfg.train.batch_pairs), resolution=16, seed=cfg.train.seed)


class VipoStep:
    """The engine's Trainer for `cfg` and a host batch of the workload's shape."""

    def __init__(self, work: Workload, cfg: RunConfig, inputs: str):
        self.work, self.cfg, self.inputs = work, cfg, inputs
        self.device = work.device
        reference = None
        if cfg.reference.mode == "precomputed":
            table = RandomErrorTable(work.rows)

            def reference(adapter):
                return PrecomputedReference(adapter, table)

        if inputs == "pixels":
            self.trainer = Trainer(cfg, progress=False, data=bench_source(cfg), reference=reference)
            self.host = HostBatch(work, self.trainer.adapter, inputs, self.trainer.autocast())
            return
        # A latent-cache run frees its encoders (the cache holds their output): the host batch's
        # embeddings come from a frozen build made and freed first, as `vipo cache` encodes once.
        encoders = build_adapter(cfg.model, self.device, seed=cfg.train.seed, trainable=False)
        encoders.network = None
        autocast = torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=cfg.train.mixed_precision == "bf16"
        )
        self.host = HostBatch(work, encoders, inputs, autocast)
        del encoders
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.trainer = Trainer(cfg, progress=False, data=bench_source(cfg), reference=reference)

    def batch(self) -> PairBatch | LatentPairBatch:
        """This step's batch on the device: what the trainer's next_batch hands forward_backward."""
        host = self.host
        if self.inputs == "pixels":
            return PairBatch(list(host.ids), list(host.prompts), host.pixels_on_device())
        # The latents in the dtype the denoiser is fed (model.param_dtype), like encode_pixels' output.
        latents, cond = host.latents_on_device(self.trainer.adapter.dtype)
        return LatentPairBatch(list(host.ids), 0, latents, cond)

    def step(self, clock) -> torch.Tensor:
        trainer = self.trainer
        trainer.mark = clock.mark
        clock.start()
        trainer.strategy.zero_grad()
        batch = self.batch()
        clock.mark("data")
        metrics = trainer.forward_backward(batch, accum=1, last=True)
        finite = bool(torch.isfinite(metrics["loss"]))  # the trainer's one host sync a step
        trainer.update(finite)
        return metrics["loss"]

    def summary(self) -> dict:
        return {"skipped_updates": self.trainer.nonfinite_total}

    def close(self) -> None:
        self.trainer.close()
