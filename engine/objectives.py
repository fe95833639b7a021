"""Objectives: from a batch of pairs to a loss and its metrics (device tensors, no host sync).

    sft       the diffusion loss on winners (the paper's stage 1) or on both images
    dpo       Diffusion-DPO (Poly-DPO with alpha = 0)
    poly_dpo  -log p + alpha (1 - p)                                  (paper Eq. 9)

The preference step builds x_t, t and the conditioning once for policy and reference, reduces
the reference output to e_ref at once (freeing it) and then runs the policy forward.
"""

from dataclasses import dataclass

import torch

from vipo.kernels import beta_from, poly_dpo_loss, sample_errors


@dataclass
class PairBatch:
    """B pairs: pixels [2B, 3, H, W] in [-1, 1], winners in rows [0, B), losers in [B, 2B)."""

    ids: list[str]
    prompts: list[str]
    pixels: torch.Tensor
    weights: torch.Tensor | None = None  # [B] per-pair weights (None: all 1)

    @property
    def pairs(self) -> int:
        return len(self.ids)


def resolve_beta(loss_cfg, elements_per_sample: int) -> float:
    return beta_from(loss_cfg.beta_convention, loss_cfg.beta, elements_per_sample=elements_per_sample)


def sft_loss(adapter, batch: PairBatch, loss_cfg, generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    cond = adapter.encode_prompts(batch.prompts)
    pixels = batch.pixels[: batch.pairs] if loss_cfg.winners_only else batch.pixels
    latents = adapter.encode_pixels(pixels)
    if not loss_cfg.winners_only:  # both images: the prompt of each pair twice
        cond = {key: torch.cat([value, value]) for key, value in cond.items()}
    x_t, t, target = adapter.noisy_inputs(latents, generator, paired=False)
    err = sample_errors(adapter.predict(adapter.network, x_t, t, cond), target)
    loss = err.mean()
    return loss, {"loss": loss.detach(), "e_pol": err.detach().mean()}


def preference_loss(adapter, reference, batch: PairBatch, loss_cfg, generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    cond = adapter.encode_prompts(batch.prompts)
    latents = adapter.encode_pixels(batch.pixels)
    x_t, t, target = adapter.noisy_inputs(latents, generator, paired=True)
    ref_err = reference.errors(x_t, t, cond, target)  # the reference output is already freed
    pred = adapter.predict(adapter.network, x_t, t, cond)
    beta = resolve_beta(loss_cfg, pred[0].numel())
    out = poly_dpo_loss(pred, target, ref_err=ref_err, beta=beta, alpha=loss_cfg.alpha, pair_weight=batch.weights)
    return out.loss, preference_metrics(out, loss_cfg.alpha)


def preference_metrics(out, alpha: float) -> dict[str, torch.Tensor]:
    """Every metric of DESIGN.md Section 1, plus the diagnostics users ask for: how winners and
    losers moved against the reference (a falling loss can come from pushing losers away while
    winners do not improve), the share of negative margins, and the mean gradient factor."""
    pairs = out.logits.shape[0]
    pol_w, pol_l = out.policy_err[:pairs], out.policy_err[pairs:]
    ref_w, ref_l = out.ref_err[:pairs], out.ref_err[pairs:]
    p = out.prob
    return {
        "loss": out.loss.detach(),
        "accuracy": out.accuracy,
        "mean_p": p.mean(),
        "margin": out.margin,
        "e_pol_w": pol_w.mean(),
        "e_pol_l": pol_l.mean(),
        "e_ref_w": ref_w.mean(),
        "e_ref_l": ref_l.mean(),
        "winner_change": (pol_w - ref_w).mean(),  # < 0: winners denoised better than by the reference
        "loser_change": (pol_l - ref_l).mean(),
        "negative_margin_share": (out.logits < 0).float().mean(),
        "grad_factor": ((1 - p) * (1 + alpha * p)).mean(),  # Eq. 10's |dL/dz|
    }


def forward_loss(objective: str, adapter, reference, batch, loss_cfg, generator):
    if objective == "sft":
        return sft_loss(adapter, batch, loss_cfg, generator)
    return preference_loss(adapter, reference, batch, loss_cfg, generator)
