"""`vipo demo`: Poly-DPO teaching a tiny denoiser a preference, on CPU in seconds.

What it is: synthetic 4x8x8 "latents" from two families (smooth waves = winners, stripes =
losers), a small convolutional eps-predictor with a DDPM schedule, first fitted to both families
(the SFT stage that makes policy and reference equal), then trained with the Poly-DPO objective
of vipo.kernels against a frozen copy of itself. Winner and loser of a pair share noise and
timestep, as in every vipo objective. What it is not: a diffusion model of images; the engine's
model families (SD1.5 ... Wan2.1) are not part of this demo.

It reports the held-out implicit accuracy (z > 0) before and after, which must rise above 0.5
if the objective moves probability mass toward winners.
"""

import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vipo.kernels import beta_from, poly_dpo_loss, sample_errors

from .config import RunConfig, to_dict

log = logging.getLogger(__name__)

CHANNELS, SIZE, TIMESTEPS = 4, 8, 1000


class TinyDenoiser(nn.Module):
    """eps-prediction conv net with a sinusoidal timestep embedding (~25k parameters)."""

    def __init__(self, width: int = 48):
        super().__init__()
        self.inp = nn.Conv2d(CHANNELS, width, 3, padding=1)
        self.time = nn.Sequential(nn.Linear(32, width), nn.SiLU(), nn.Linear(width, width))
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, CHANNELS, 3, padding=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(16, device=t.device) / 16)
        angles = t.float()[:, None] * freqs[None]
        emb = self.time(torch.cat([angles.sin(), angles.cos()], dim=1))
        h = F.silu(self.inp(x_t) + emb[:, :, None, None])
        h = F.silu(self.mid(h))
        return self.out(h)


def _family(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """n samples [n, C, S, S] of one family: 'wave' (smooth) or 'stripe' (alternating rows)."""
    grid = torch.linspace(0, 2 * math.pi, SIZE)
    phase = torch.rand(n, CHANNELS, 1, 1, generator=gen) * 2 * math.pi
    amp = 0.6 + 0.4 * torch.rand(n, CHANNELS, 1, 1, generator=gen)
    if kind == "wave":
        pattern = torch.sin(grid[None, None, :, None] + phase) * torch.cos(grid[None, None, None, :])
    else:
        rows = torch.arange(SIZE) % 2 * 2.0 - 1.0
        pattern = rows[None, None, :, None] * torch.cos(grid[None, None, None, :] + phase)
    return amp * pattern + 0.05 * torch.randn(n, CHANNELS, SIZE, SIZE, generator=gen)


def _pairs(n: int, gen: torch.Generator) -> torch.Tensor:
    """[2n, C, S, S]: n winners then their n losers."""
    return torch.cat([_family("wave", n, gen), _family("stripe", n, gen)])


@dataclass
class _Schedule:
    alphas_cumprod: torch.Tensor

    @classmethod
    def ddpm(cls) -> "_Schedule":
        betas = torch.linspace(1e-4, 2e-2, TIMESTEPS)
        return cls(torch.cumprod(1.0 - betas, dim=0))

    def noised(self, x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_t, t and eps for a [2B, ...] pair batch; winner and loser share eps and t."""
        pairs = x0.shape[0] // 2
        eps = torch.randn(pairs, *x0.shape[1:], generator=gen).repeat(2, 1, 1, 1)
        t = torch.randint(0, TIMESTEPS, (pairs,), generator=gen).repeat(2)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps, t, eps


@torch.no_grad()
def _held_out_accuracy(policy, reference, schedule, x0, beta, seed) -> float:
    gen = torch.Generator().manual_seed(seed)
    x_t, t, eps = schedule.noised(x0, gen)
    out = poly_dpo_loss(policy(x_t, t), eps, ref_pred=reference(x_t, t), beta=beta)
    return out.accuracy.item()


def run_demo(cfg: RunConfig, *, sft_steps: int = 300, progress: bool = True) -> dict:
    """Train and return the summary (also written to `<output_dir>/summary.json`)."""
    torch.manual_seed(cfg.train.seed)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    schedule = _Schedule.ddpm()
    pairs = cfg.train.batch_pairs
    beta = beta_from(cfg.loss.beta_convention, cfg.loss.beta, elements_per_sample=CHANNELS * SIZE * SIZE)
    alpha = cfg.loss.alpha

    # Stage 1 (SFT on both families): the reference every DPO run starts from.
    model = TinyDenoiser()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(sft_steps):
        x_t, t, eps = schedule.noised(_pairs(pairs, gen), gen)
        loss = F.mse_loss(model(x_t, t), eps)  # the plain diffusion loss (SFT)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    reference = copy.deepcopy(model).requires_grad_(False).eval()
    policy = model

    held_out = _pairs(256, torch.Generator().manual_seed(cfg.train.seed + 1))
    acc_before = _held_out_accuracy(policy, reference, schedule, held_out, beta, cfg.train.seed + 2)

    # Stage 2: Poly-DPO. The paper's LR convention: base LR x pairs per optimizer step.
    step_pairs = pairs * cfg.train.grad_accum_steps
    lr = cfg.optim.lr * step_pairs if cfg.optim.scale_lr else cfg.optim.lr
    opt = torch.optim.AdamW(
        policy.parameters(), lr=lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay
    )
    warmup = cfg.optim.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    out_dir = Path(cfg.train.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    history = []
    started = time.perf_counter()
    bar = tqdm(range(cfg.train.max_steps), desc="poly-dpo", disable=not progress, dynamic_ncols=True)
    with open(out_dir / "metrics.jsonl", "w", encoding="utf-8") as metrics_file:
        for step in bar:
            opt.zero_grad(set_to_none=True)
            for _ in range(cfg.train.grad_accum_steps):
                x_t, t, eps = schedule.noised(_pairs(pairs, gen), gen)
                with torch.no_grad():
                    ref_err = sample_errors(reference(x_t, t), eps)
                out = poly_dpo_loss(policy(x_t, t), eps, ref_err=ref_err, beta=beta, alpha=alpha)
                (out.loss / cfg.train.grad_accum_steps).backward()
            if cfg.optim.max_grad_norm > 0:
                nn.utils.clip_grad_norm_(policy.parameters(), cfg.optim.max_grad_norm)
            opt.step()
            sched.step()
            if (step + 1) % cfg.train.log_every_steps == 0 or step + 1 == cfg.train.max_steps:
                row = {
                    "step": step + 1,
                    "loss": out.loss.item(),
                    "accuracy": out.accuracy.item(),
                    "mean_p": out.prob.mean().item(),
                    "margin": out.margin.item(),
                }
                history.append(row)
                metrics_file.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.2f}")

    acc_after = _held_out_accuracy(policy, reference, schedule, held_out, beta, cfg.train.seed + 2)
    summary = {
        "held_out_accuracy_before": acc_before,
        "held_out_accuracy_after": acc_after,
        "first_logged": history[0] if history else None,
        "last_logged": history[-1] if history else None,
        "seconds": round(time.perf_counter() - started, 2),
        "effective_lr": lr,
        "beta": beta,
        "alpha": alpha,
        "config": to_dict(cfg),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
