"""The train loop, torchtitan's shape: `train()` loops, `train_step()` accumulates micro-batches,
clips and steps, `forward_backward(batch)` is one micro-batch's loss and backward.

    Trainer(cfg)   data -> models.build_adapter -> reference -> strategies.build_strategy
    train_step     next_batch -> forward_backward (objectives.forward_loss, strategy.backward)
                   -> one all-reduce of the metrics -> strategy.update

Metrics stay on the device during a step and reach the host once per optimizer step (the
non-finite check, after one all-reduce of the step's metrics when there are several ranks) and
once per log interval. Everything strategy-specific (wrapping, backward, clipping and stepping,
checkpoint formats) is in the strategy object; where eps and t come from, in the noise source.

One process or many (parallel.py): `train.batch_pairs` is the global micro-batch, each rank
takes an equal share, and with `parallel.noise_draw=global` N ranks reproduce one process.
"""

import importlib
import json
import logging
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import context_parallel, parallel
from .checkpoint import checkpoint_state, export_full_weights
from .config import RunConfig, to_dict
from .data import BatchStream, build_source, to_pixels
from .data.cache import CacheBatchSource, open_cache
from .ema import EMA_FILE, PolicyEMA
from .errors import RunError
from .integrity import resolve_checkpoint, step_folders
from .models import LORA_TARGETS, build_adapter
from .noise import CounterNoise, GeneratorNoise, GlobalDrawNoise
from .objectives import LatentPairBatch, PairBatch, forward_loss
from .optim import check_optimizer
from .parallel import pick_device  # noqa: F401  (historical import path)
from .reference import build_reference
from .sinks import MetricSinks, check_sinks_installed
from .stopping import RunFolder, Stopped, StopRequests, signal_name
from .strategies import build_strategy

log = logging.getLogger(__name__)

__all__ = ["LORA_TARGETS", "Trainer", "build_data"]


def build_data(data_cfg, seed: int, model_cfg=None, rank: int = 0, world_size: int = 1, batch_decode=False):
    """The pair source of `data.*` (see data.py)."""
    return build_source(data_cfg, model_cfg, seed, rank, world_size, batch_decode=batch_decode)


def _no_mark(phase: str) -> None:
    pass


class Trainer:
    """Use as a context manager (or call `close()`) so that a process group it created is torn
    down before the interpreter exits.

    `data` and `reference` replace what the config would build: a pair source, and a function
    of the adapter giving the reference (the step benchmark feeds synthetic batches and a
    precomputed table this way; training never needs them)."""

    def __init__(self, cfg: RunConfig, *, progress: bool = True, data=None, reference=None):
        self.cfg = cfg
        check_sinks_installed(cfg.train.report_to)
        self.world = parallel.init_world(cfg.parallel, cfg.train.device)
        try:
            self._build(progress, data, reference)
        except BaseException:
            parallel.shutdown(self.world, clean=False)  # a group this trainer started ends with it
            raise

    def _build(self, progress: bool, data=None, reference=None) -> None:
        cfg, world = self.cfg, self.world
        check_optimizer(cfg.optim, cfg.parallel.strategy, world.device)  # before any data or model
        self.progress = progress and world.is_main
        self.device = world.device
        self.out_dir = Path(cfg.train.output_dir)
        # Under context parallelism the ranks of a group share their pairs: data and noise are
        # split over data ranks (world.data_rank of world.data_size).
        self.context = context_parallel.setup(cfg.parallel, world)
        shares = world.data_size
        local_pairs, rest = divmod(cfg.train.batch_pairs, shares)
        if rest or not local_pairs:
            over = f"{shares} data-parallel groups" if world.context > 1 else f"{shares} processes"
            raise RunError(
                f"train.batch_pairs={cfg.train.batch_pairs} is the global micro-batch and must split evenly "
                f"over {over}: use a multiple of {shares}"
            )
        if data is not None:
            self.data = data
        elif cfg.data.cache:  # latents and embeddings encoded once by `vipo cache`
            self.data = open_cache(cfg)
        else:
            self.data = build_data(
                cfg.data, cfg.train.seed, cfg.model, world.data_rank, shares, batch_decode=True
            )
        self.batches = BatchStream(
            self.data,
            local_pairs,
            cfg.train.seed,
            world.data_rank,
            shares,
            max_bad_fraction=cfg.data.max_bad_fraction,
            prefetch_batches=0 if cfg.data.cache else cfg.data.prefetch_batches,  # cached batches are cheap
            num_workers=0 if cfg.data.cache else cfg.data.num_workers,
        )
        self.sampler = self.batches.sampler  # None for a streaming source (tar shards)
        # Cached pairs: posterior sample, caption dropout, noise and t from the counter RNG of
        # (seed, pair id, epoch), so the precomputed reference errors match.
        # Under FSDP with model.path only rank 0 reads the denoiser's weights (parallel.meta_init).
        from_rank0 = parallel.meta_start(cfg.parallel, cfg.model, world)
        self.adapter = build_adapter(
            cfg.model,
            self.device,
            seed=cfg.train.seed,
            trainable=True,
            vocabulary=self.data.vocabulary(),
            meta=from_rank0 and not world.is_main,
        )
        self.cache_batches = None
        if cfg.data.cache:  # cached latents and embeddings: the encoders are never called
            self.adapter.drop_encoders()
            if data is None:  # in the dtype the denoiser is fed (model.param_dtype)
                self.cache_batches = CacheBatchSource(
                    self.data, cfg.train.seed, cfg.data.caption_dropout, self.device, dtype=self.adapter.dtype
                )
        # The reference is built here, before any checkpoint is loaded and before sharding: it is
        # the initial model for the whole run, resumes included.
        self.objective = cfg.loss.objective
        if self.objective == "sft":
            self.reference = None
        elif reference is not None:
            self.reference = reference(self.adapter)
        else:
            self.reference = build_reference(cfg.reference.mode, self.adapter, cfg, on_meta=from_rank0)
        if self.context is not None:  # after the copy reference is made: each network gets its own hooks
            self.context.check(self.adapter.network, cfg.model.family, cfg.model.attention)
            for network in (self.adapter.network, getattr(self.reference, "network", None)):
                if network is not None:
                    self.context.enable(network)
            self.adapter.context = self.context
        step_pairs = cfg.train.batch_pairs * cfg.train.grad_accum_steps  # global: the paper's LR convention
        self.lr = cfg.optim.lr * step_pairs if cfg.optim.scale_lr else cfg.optim.lr
        # Gradients and optimizer state against what the device has left: whole ones before the
        # strategy wraps the model, fsdp's shards once it has (engine/plan/budget.py).
        from .plan.budget import check_point

        when = (
            check_point(cfg.parallel.strategy, cfg.parallel.cpu_offload)
            if self.device.type == "cuda"
            else None
        )
        if when == "before_wrap":
            self.check_memory(torch.cuda.mem_get_info(self.device)[0])
        self.strategy = build_strategy(cfg, world, self.adapter, self.reference, self.lr, self._probe)
        if when == "after_wrap":
            self.check_memory(torch.cuda.mem_get_info(self.device)[0])
        self.ema = PolicyEMA(self.strategy.network, cfg.train.ema_decay) if cfg.train.ema_decay else None
        per_rank_noise = cfg.parallel.noise_draw == "per_rank"
        self.generator = parallel.rank_generator(cfg.train.seed, world, self.device, per_rank_noise)
        if cfg.data.cache:
            self.noise = CounterNoise(cfg.train.seed)
        elif shares > 1 and not per_rank_noise:
            self.noise = GlobalDrawNoise(self.generator, world.data_rank, shares)
        else:
            self.noise = GeneratorNoise(self.generator)
        # train.validate_every_steps: rank 0's grid and held-out accuracy, from the eval part,
        # loaded by name as the CLI loads its commands (the engine imports nothing of eval).
        self.validator = None
        if cfg.train.validate_every_steps and world.is_main:
            self.validator = importlib.import_module("vipo.engine.eval.validation").build_validator(self)
        # Called as each phase of a micro-batch ends; `vipo bench step` times them through it.
        self.mark = _no_mark
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0

    def check_memory(self, free_bytes: int) -> None:
        """Stop in one line when the first step's gradients and optimizer state cannot fit in
        `free_bytes` (engine/plan/budget.py); called on a GPU at start-up."""
        from .plan.budget import check_fits

        check_fits(
            self.adapter.network.parameters(),  # fsdp: the DTensor shards, once sharded
            self.cfg.parallel.strategy,
            free_bytes,
            str(self.device),
            optimizer=self.cfg.optim.optimizer,
        )

    @property
    def network(self):
        """The policy network itself (FSDP-sharded in place; under DDP / DeepSpeed its module)."""
        return self.adapter.network

    @property
    def optimizer(self):
        return self.strategy.optimizer

    @property
    def scheduler(self):
        return self.strategy.scheduler

    @property
    def params(self):
        return self.strategy.params

    # -- data ---------------------------------------------------------------------------------

    def next_batch(self) -> PairBatch | LatentPairBatch:
        if self.cache_batches is not None:
            indices, epoch = self.batches.next_indices()
            return self.cache_batches.batch(indices, epoch)
        records = self.batches.next_records()
        ids = [r.id for r in records]
        prompts = [r.prompt for r in records]
        if self.cfg.data.caption_dropout > 0:  # one draw per pair: winner and loser alike
            drop = self.noise.caption_dropout(ids, None, self.cfg.data.caption_dropout)
            prompts = ["" if d else p for p, d in zip(prompts, drop, strict=True)]
        weights = None
        if any(r.weight != 1.0 for r in records):  # per-pair weights from the source (e.g. a manifest)
            weights = torch.tensor([r.weight for r in records], device=self.device)
        maps = [r.weight_map for r in records]  # per-pair weight maps (loaders/weight_maps.py)
        maps = maps if any(m is not None for m in maps) else None
        return PairBatch(ids, prompts, to_pixels(records, self.device), weights, weight_maps=maps)

    def _probe(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(latents, cond) of one sample, of the shape training will see (FSDP's first forward)."""
        if self.cache_batches is not None:
            batch = self.cache_batches.batch([0], 0)
            return batch.latents, batch.cond
        cond = self.adapter.encode_prompts([""])
        if self.sampler is None:  # a stream: fixed-size squares (buckets are refused for shards)
            side = self.cfg.data.resolution
            return self.adapter.encode_pixels(torch.zeros(1, 3, side, side, device=self.device)), cond
        first = self.batches.decoded([self.data[0]], [0])
        return self.adapter.encode_pixels(to_pixels(first, self.device)), cond

    # -- one optimizer step -------------------------------------------------------------------

    def autocast(self):
        enabled = self.cfg.train.mixed_precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def forward_backward(self, batch, *, accum: int = 1, last: bool = True) -> dict[str, torch.Tensor]:
        """One micro-batch: the objective's loss through the policy as the strategy wraps it, and
        its backward (scaled by 1 / accum). Returns the detached metrics."""
        with self.autocast(), self.strategy.micro_step(last):
            loss, metrics = forward_loss(
                self.objective,
                self.adapter,
                self.strategy.policy,
                self.reference,
                batch,
                self.noise,
                self.cfg.loss,
                self.mark,
            )
            # A context group's gradient is the sum of its ranks' (each holds its tokens' share);
            # the strategy's mean over all ranks divides by the group size once too often.
            scaled = loss * self.context.grad_scale if self.context is not None else loss
            self.strategy.backward(scaled, accum, last)
        self.mark("backward")
        return {key: value.detach() for key, value in metrics.items()}

    def update(self, finite: bool) -> torch.Tensor:
        """Clip and step (or skip a non-finite step, counted); the gradient norm before clipping."""
        grad_norm, skipped = self.strategy.update(finite)
        if skipped:
            self._count_nonfinite(skipped)
        elif self.ema is not None:
            self.ema.update()
        self.mark("optimizer")
        return grad_norm

    def train_step(self) -> dict[str, torch.Tensor]:
        accum = self.cfg.train.grad_accum_steps
        sums: dict[str, torch.Tensor] = {}
        data_wait = 0.0
        self.strategy.zero_grad()
        for micro in range(accum):
            started = time.perf_counter()
            batch = self.next_batch()
            data_wait += time.perf_counter() - started
            metrics = self.forward_backward(batch, accum=accum, last=micro == accum - 1)
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value.float() / accum
        sums = self.world.mean(sums)  # every rank then takes the same decision below
        finite = bool(torch.isfinite(sums["loss"]))  # the one host sync of a step
        if finite:
            self.nonfinite_in_row = 0
        lr = self.scheduler.get_last_lr()[0]  # what this step's update ran at
        grad_norm = self.update(finite)
        with warnings.catch_warnings():  # a skipped first update still advances the schedule
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        self.step += 1
        sums["grad_norm"] = grad_norm.detach()
        sums["lr"] = torch.tensor(lr)
        sums["data_wait_s"] = torch.tensor(data_wait)
        return sums

    def _count_nonfinite(self, what: str) -> None:
        self.nonfinite_total += 1
        self.nonfinite_in_row += 1
        log.warning(
            "step %d: non-finite %s, update skipped (%d in a row)", self.step + 1, what, self.nonfinite_in_row
        )

    # -- checkpoints --------------------------------------------------------------------------

    @property
    def _rng_key(self) -> str:
        per_rank = self.cfg.parallel.noise_draw == "per_rank" and self.world.size > 1
        return f"noise_generator_rank{self.world.rank}" if per_rank else "noise_generator"

    def _rng_states(self) -> dict[str, torch.Tensor]:
        """The noise streams: one shared by every rank, or one per rank (gathered; a collective)."""
        if self._rng_key == "noise_generator":
            return {"noise_generator": self.generator.get_state()}
        states = self.world.gather(self.generator.get_state())
        return {f"noise_generator_rank{rank}": state for rank, state in enumerate(states)}

    def _restore_rng(self, rng: dict[str, torch.Tensor]) -> None:
        saved_ranks = sum(key.startswith("noise_generator_rank") for key in rng)
        if self._rng_key in rng and (self._rng_key == "noise_generator" or saved_ranks == self.world.size):
            self.generator.set_state(rng[self._rng_key])
            return
        # Per-rank streams do not carry over to another world size or noise_draw: a fresh,
        # reproducible stream per rank instead.
        log.warning("the checkpoint's noise streams do not fit this run: reseeding from (seed, rank, step)")
        seed = int(
            np.random.SeedSequence([self.cfg.train.seed, self.world.rank, self.step]).generate_state(1)[0]
        )
        self.generator.manual_seed(seed)

    def resume(self) -> bool:
        """Load the newest checkpoint that passes its integrity check (falling back past damaged
        ones, saying so); False when the run has none."""
        path = resolve_checkpoint(self.out_dir, self.world if self.world.size > 1 else None)
        if path is None:
            return False
        state = checkpoint_state(path)
        self.strategy.check_resumable(path, state)
        saved = state.get("optimizer", "adamw")  # checkpoints that predate optim.optimizer: AdamW
        if saved != self.cfg.optim.optimizer:
            raise RunError(
                f"{path} holds the state of optim.optimizer={saved}; resume with it, or start "
                f"optim.optimizer={self.cfg.optim.optimizer} from its weights with model.init_from"
            )
        self.step = state["step"]  # a reseeded per-rank stream is keyed by it
        self._restore_rng(self.strategy.load(path, state))
        if self.ema is not None:
            self.ema.load(path)
        sampler = dict(state["sampler"])
        # The position counts global batches: a different world size with the same global
        # batch continues the same order. A stream (tar shards) resumes its own position.
        if (
            self.sampler is not None
            and sampler.get("world_size") is not None
            and (
                sampler["batch_size"] * sampler["world_size"]
                == self.sampler.batch_size * self.sampler.world_size
            )
        ):
            sampler.update(batch_size=self.sampler.batch_size, world_size=self.sampler.world_size)
        self.batches.load_state_dict(sampler)
        # A resume is a fresh chance: the in-a-row count of non-finite steps starts again.
        self.nonfinite_total, self.nonfinite_in_row = state["nonfinite_total"], 0
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def save(self, *, stopped: str | None = None) -> Path:
        """A checkpoint of this step. `stopped="nonfinite"`: the run is stopping on non-finite
        losses; the checkpoint is kept for inspection as step-N.nonfinite and never becomes
        `latest`, so a resume starts from the last good one."""
        state = {
            "sampler": self.batches.state_dict(),
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_in_row": self.nonfinite_in_row,
            "optimizer": self.cfg.optim.optimizer,
        }
        if stopped:
            state["stopped"] = stopped
        latest = stopped is None
        suffix = "" if latest else f".{stopped}"
        try:
            path = self._write_checkpoint(state, latest, suffix)
        except OSError as err:  # a full disk, a quota, a vanished mount: the previous one stays latest
            raise RunError(
                f"saving the checkpoint of step {self.step} into {self.out_dir / 'checkpoints'} failed "
                f"({err.strerror or err}); the previous checkpoint is whole and stays the one --resume takes"
            ) from None
        self._saved_at = (self.step, time.monotonic())
        log.info("checkpoint %s", path)
        return path

    def _write_checkpoint(self, state: dict, latest: bool, suffix: str) -> Path:
        extra = {"extra": {EMA_FILE: self.ema.state_dict()}} if self.ema is not None else {}
        return self.strategy.save(
            self.out_dir, self.step, state, self._rng_states(), latest=latest, suffix=suffix, **extra
        )

    def export(self, out_dir: Path) -> Path | None:
        """The policy's full weights, gathered on rank 0, as a diffusers-layout folder (every
        rank calls this; rank 0 writes and gets the path)."""
        engine = getattr(self.strategy, "engine", None)
        return export_full_weights(
            self.adapter, self.network, self.strategy.name, self.world, Path(out_dir), engine
        )

    # -- the loop -----------------------------------------------------------------------------

    def train(self, *, resume: bool = False) -> dict:
        main = self.world.is_main
        with RunFolder(self.out_dir, enabled=main), StopRequests() as stops:
            self.world.barrier()
            self._start(resume)
            return self._loop(resume, stops)

    def _start(self, resume: bool) -> None:
        cfg = self.cfg.train
        if self.world.is_main:
            (self.out_dir / "config.json").write_text(
                json.dumps(to_dict(self.cfg), indent=2), encoding="utf-8"
            )
            if not cfg.checkpoint_every_steps and not cfg.checkpoint_every_minutes:
                log.warning(
                    "train.checkpoint_every_steps and train.checkpoint_every_minutes are 0: a crash loses "
                    "the run's progress (SIGTERM / Ctrl-C still save); set one for a long run"
                )
        if not resume:
            existing = step_folders(self.out_dir)
            if existing:
                raise RunError(
                    f"train.output_dir {self.out_dir} already holds checkpoints (newest {existing[0].name}); "
                    "pass --resume to continue that run, or choose another train.output_dir"
                )
        elif not self.resume():
            log.info("no checkpoint in %s: starting from step 0", self.out_dir)
        self._saved_at = (self.step, time.monotonic())

    def _stop_or_save_due(self, stops: StopRequests) -> tuple[int, bool]:
        """(signal every rank agrees to stop on, 0 for none; whether a timed checkpoint is due),
        decided on the same step by every rank (one small all-reduce when there are several)."""
        minutes = self.cfg.train.checkpoint_every_minutes
        due = bool(minutes) and self.world.is_main and time.monotonic() - self._saved_at[1] >= 60 * minutes
        flags = torch.tensor([stops.signum or 0, int(due)], dtype=torch.int64)
        flags = self.world.max(flags)
        return int(flags[0]), bool(flags[1])

    def _loop(self, resume: bool, stops: StopRequests) -> dict:
        cfg = self.cfg.train
        main = self.world.is_main
        step_pairs = cfg.batch_pairs * cfg.grad_accum_steps  # global
        started = time.perf_counter()
        first_step = self.step
        last: dict[str, float] = {}
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc=self.objective,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        sinks = MetricSinks(
            self.out_dir,
            cfg.report_to,
            run_name=cfg.run_name,
            config=to_dict(self.cfg),
            append=resume,
            resume_step=self.step,
            enabled=main,
        )
        with sinks:
            while self.step < cfg.max_steps:
                metrics = self.train_step()
                bar.update(1)
                if self.nonfinite_in_row >= cfg.max_nonfinite_steps:
                    path = self.save(stopped="nonfinite")
                    raise RunError(
                        f"{self.nonfinite_in_row} non-finite steps in a row at step {self.step}; stopped. The last "
                        f"good checkpoint stays the one --resume takes; this step's state is in {path}"
                    )
                done = self.step == cfg.max_steps
                validation = {}
                if self.validator is not None and (self.step % cfg.validate_every_steps == 0 or done):
                    validation = self.validator(self.step, sinks)
                if self.step % cfg.log_every_steps == 0 or done or validation:
                    elapsed = time.perf_counter() - started
                    last = {key: float(value) for key, value in metrics.items()}
                    last.update(validation)
                    last.update(
                        step=self.step,
                        pairs_per_s=(self.step - first_step) * step_pairs / max(elapsed, 1e-9),
                        nonfinite_total=self.nonfinite_total,
                    )
                    skipped = sum(v for k, v in self.batches.stats().items() if k.startswith("skipped_"))
                    if skipped:  # bad or unusable samples so far (this process), each logged as it happened
                        last["data_skipped"] = skipped
                    if self.device.type == "cuda":
                        last["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    sinks.write(last)
                    bar.set_postfix(
                        loss=f"{last['loss']:.4f}",
                        **({"acc": f"{last['accuracy']:.2f}"} if "accuracy" in last else {}),
                    )
                signum, due = self._stop_or_save_due(stops)
                every = cfg.checkpoint_every_steps
                if (every and self.step % every == 0) or done or due or signum:
                    path = self.save() if self._saved_at[0] != self.step else None
                    if signum:
                        bar.close()
                        where = path or self.out_dir / "checkpoints" / f"step-{self.step:06d}"
                        raise Stopped(
                            f"stopped by {signal_name(signum)} at step {self.step} of {cfg.max_steps}; checkpoint "
                            f"{where}; continue with --resume",
                            signum,
                            quiet=not main,
                        )
        bar.close()
        seconds = time.perf_counter() - started
        return {
            "steps": self.step,
            "steps_this_run": self.step - first_step,
            "seconds": seconds,
            "last": last,
            "out_dir": str(self.out_dir),
            "nonfinite_total": self.nonfinite_total,
            "effective_lr": self.lr,
            "loss_is_finite": math.isfinite(last.get("loss", float("nan"))),
            "is_main": main,
            "world_size": self.world.size,
        }

    # -- teardown -----------------------------------------------------------------------------

    def close(self, *, clean: bool = True) -> None:
        """Free the engine and wrappers, then tear down a process group this trainer created
        (after a barrier when `clean`; on an error the other ranks may never reach one)."""
        if getattr(self, "strategy", None) is not None:
            self.strategy.close()
        self.strategy = None
        if getattr(self, "batches", None) is not None:
            self.batches.close()  # stop the prefetch thread
        parallel.shutdown(self.world, clean=clean)

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(clean=exc_type is None)
