"""The train loop: `train()` loops, `train_step()` accumulates, clips and steps,
`forward_loss` (objectives.py) is the only objective-specific part.

Metrics stay on the device during a step and reach the host once per optimizer step (the
non-finite check) and once per log interval.
"""

import json
import logging
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vipo.loaders.procedural import ProceduralPairs
from vipo.loaders.sampler import PairSampler

from .checkpoint import latest_checkpoint, load_checkpoint, load_weights, save_checkpoint
from .config import RunConfig, to_dict
from .errors import RunError
from .models import build_model
from .objectives import PairBatch, forward_loss
from .reference import build_reference

log = logging.getLogger(__name__)

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"train.device is {name!r} but no CUDA device is available")
    return torch.device(name)


def build_data(data_cfg, seed: int):
    if data_cfg.source == "procedural":
        return ProceduralPairs(
            data_cfg.num_pairs, data_cfg.resolution, data_cfg.regime, data_cfg.flip_prob, seed
        )
    raise RunError(f"data.source {data_cfg.source!r} is not built yet")


class Trainer:
    def __init__(self, cfg: RunConfig, *, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.device = pick_device(cfg.train.device)
        self.out_dir = Path(cfg.train.output_dir)
        torch.manual_seed(cfg.train.seed)  # the random-weight build, identical on every (re)start
        self.data = build_data(cfg.data, cfg.train.seed)
        self.adapter = build_model(cfg.model, self.device, vocabulary=self.data.vocabulary())
        network = self.adapter.network
        if cfg.model.init_from:
            load_weights(Path(cfg.model.init_from), network)
        if cfg.model.lora_rank:
            from peft import LoraConfig

            network.requires_grad_(False)
            network.add_adapter(LoraConfig(r=cfg.model.lora_rank, lora_alpha=cfg.model.lora_rank,
                                           init_lora_weights="gaussian", target_modules=LORA_TARGETS))  # fmt: skip
        if cfg.model.gradient_checkpointing:
            network.enable_gradient_checkpointing()
        network.train()
        # The reference is built here, before any checkpoint is loaded: it is the initial model
        # for the whole run, resumes included.
        self.objective = cfg.loss.objective
        self.reference = (
            None if self.objective == "sft" else build_reference(cfg.reference.mode, self.adapter)
        )
        self.params = [p for p in network.parameters() if p.requires_grad]
        step_pairs = cfg.train.batch_pairs * cfg.train.grad_accum_steps
        self.lr = cfg.optim.lr * step_pairs if cfg.optim.scale_lr else cfg.optim.lr
        self.optimizer = torch.optim.AdamW(
            self.params, lr=self.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay,
            fused=self.device.type == "cuda",
        )  # fmt: skip
        warmup = cfg.optim.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        self.sampler = PairSampler(len(self.data), cfg.train.batch_pairs, cfg.train.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.train.seed)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0

    # -- data ---------------------------------------------------------------------------------

    def next_batch(self) -> PairBatch:
        indices = self.sampler.next_batch()
        records = [self.data[i] for i in indices]
        prompts = [r.prompt for r in records]
        if self.cfg.data.caption_dropout > 0:  # one draw per pair: winner and loser alike
            drop = (
                torch.rand(len(prompts), generator=self.generator, device=self.device)
                < self.cfg.data.caption_dropout
            )
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
        images = np.stack([r.winner for r in records] + [r.loser for r in records])
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        return PairBatch([r.id for r in records], prompts, pixels.to(self.device))

    # -- one optimizer step -------------------------------------------------------------------

    def autocast(self):
        enabled = self.cfg.train.mixed_precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def train_step(self) -> dict[str, torch.Tensor]:
        accum = self.cfg.train.grad_accum_steps
        sums: dict[str, torch.Tensor] = {}
        data_wait = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        for _ in range(accum):
            started = time.perf_counter()
            batch = self.next_batch()
            data_wait += time.perf_counter() - started
            with self.autocast():
                loss, metrics = forward_loss(
                    self.objective, self.adapter, self.reference, batch, self.cfg.loss, self.generator
                )
            (loss / accum).backward()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float() / accum
        finite = bool(torch.isfinite(sums["loss"]))  # the one host sync of a step
        if not finite:
            self.nonfinite_total += 1
            self.nonfinite_in_row += 1
            self.optimizer.zero_grad(set_to_none=True)
            log.warning(
                "step %d: non-finite loss, update skipped (%d in a row)", self.step + 1, self.nonfinite_in_row
            )
            grad_norm = torch.tensor(float("nan"))
        else:
            self.nonfinite_in_row = 0
            max_norm = self.cfg.optim.max_grad_norm
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.params, max_norm if max_norm > 0 else float("inf")
            )
            self.optimizer.step()
        with warnings.catch_warnings():  # a skipped first update still advances the schedule
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        self.step += 1
        sums["grad_norm"] = grad_norm.detach()
        sums["lr"] = torch.tensor(self.scheduler.get_last_lr()[0])
        sums["data_wait_s"] = torch.tensor(data_wait)
        return sums

    # -- the loop -----------------------------------------------------------------------------

    def resume(self) -> bool:
        path = latest_checkpoint(self.out_dir)
        if path is None:
            return False
        state = load_checkpoint(path, self.adapter.network, self.optimizer, self.scheduler, self.generator)
        self.step = state["step"]
        self.sampler.load_state_dict(state["sampler"])
        self.nonfinite_total, self.nonfinite_in_row = state["nonfinite_total"], state["nonfinite_in_row"]
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def save(self) -> Path:
        state = {"sampler": self.sampler.state_dict(), "nonfinite_total": self.nonfinite_total,
                 "nonfinite_in_row": self.nonfinite_in_row}  # fmt: skip
        path = save_checkpoint(self.out_dir, self.step, self.adapter.network, self.optimizer, self.scheduler,
                               self.generator, state, self.cfg)  # fmt: skip
        log.info("checkpoint %s", path)
        return path

    def train(self, *, resume: bool = False) -> dict:
        cfg = self.cfg.train
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=2), encoding="utf-8")
        if resume and not self.resume():
            log.info("no checkpoint in %s: starting from step 0", self.out_dir)
        mode = "a" if resume else "w"
        step_pairs = cfg.batch_pairs * cfg.grad_accum_steps
        started = time.perf_counter()
        first_step = self.step
        last: dict[str, float] = {}
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=self.objective, disable=not self.progress,
                   dynamic_ncols=True)  # fmt: skip
        with open(self.out_dir / "metrics.jsonl", mode, encoding="utf-8") as metrics_file:
            while self.step < cfg.max_steps:
                metrics = self.train_step()
                bar.update(1)
                if self.nonfinite_in_row >= cfg.max_nonfinite_steps:
                    path = self.save()
                    raise RunError(
                        f"{self.nonfinite_in_row} non-finite losses in a row at step {self.step}; "
                        f"stopped with a checkpoint at {path}"
                    )
                done = self.step == cfg.max_steps
                if self.step % cfg.log_every_steps == 0 or done:
                    elapsed = time.perf_counter() - started
                    last = {key: float(value) for key, value in metrics.items()}
                    last.update(step=self.step, pairs_per_s=(self.step - first_step) * step_pairs / max(elapsed, 1e-9),
                                nonfinite_total=self.nonfinite_total)  # fmt: skip
                    if self.device.type == "cuda":
                        last["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    metrics_file.write(json.dumps(last) + "\n")
                    metrics_file.flush()
                    bar.set_postfix(loss=f"{last['loss']:.4f}",
                                    **({"acc": f"{last['accuracy']:.2f}"} if "accuracy" in last else {}))  # fmt: skip
                if (cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0) or done:
                    self.save()
        bar.close()
        seconds = time.perf_counter() - started
        return {"steps": self.step, "seconds": seconds, "last": last, "out_dir": str(self.out_dir),
                "nonfinite_total": self.nonfinite_total, "effective_lr": self.lr,
                "loss_is_finite": math.isfinite(last.get("loss", float("nan")))}  # fmt: skip
