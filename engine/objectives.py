"""Objectives: from a batch of pairs to a loss and its metrics (device tensors, no host sync).

    sft       the diffusion loss on winners (the paper's stage 1) or on both images
    dpo       Diffusion-DPO (Poly-DPO with alpha = 0)
    poly_dpo  -log p + alpha (1 - p)                                  (paper Eq. 9)

One path for every batch: pixels and prompts (encoded here), or latents and embeddings from the
latent cache. x_t, t and the conditioning are built once for policy and reference; the reference
output is reduced to e_ref at once (freed) and then the policy runs. Where eps, t come from is the
noise source's business (noise.py), where e_ref comes from the reference's (reference.py).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vipo.kernels import beta_from, poly_dpo_loss, sample_errors
from vipo.loaders.weight_maps import latent_weights

from .context_parallel import loss_inputs


@dataclass
class PairBatch:
    """B pairs: pixels [2B, 3, H, W] (or [2B, 3, F, H, W]) in [-1, 1], winners in rows [0, B),
    losers in [B, 2B)."""

    ids: list[str]
    prompts: list[str]
    pixels: torch.Tensor
    weights: torch.Tensor | None = None  # [B] per-pair weights (None: all 1)
    epoch: int | None = None
    # Per pair: float32 [H, W] pixel weights or [F] frame weights, None for none (loaders/weight_maps.py)
    weight_maps: list | None = None

    @property
    def pairs(self) -> int:
        return len(self.ids)


@dataclass
class LatentPairBatch:
    """B cached pairs of one epoch: latents [2B, ...] (winners, then losers), cond of B rows."""

    ids: list[str]
    epoch: int
    latents: torch.Tensor
    cond: dict[str, torch.Tensor]
    weights: torch.Tensor | None = None
    elem_weight: torch.Tensor | None = None  # [B, 1, h, w] or [B, 1, f, 1, 1] from the weight maps

    @property
    def pairs(self) -> int:
        return len(self.ids)


def resolve_beta(loss_cfg, elements_per_sample: int) -> float:
    return beta_from(loss_cfg.beta_convention, loss_cfg.beta, elements_per_sample=elements_per_sample)


def _no_mark(phase: str) -> None:
    pass


def model_inputs(adapter, batch, winners_only: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(latents, cond of B rows) of a batch: encoded now for pixels, as stored for cached latents.
    `winners_only`: the winners' latents alone (SFT stage 1 encodes no loser)."""
    if isinstance(batch, LatentPairBatch):
        latents = batch.latents[: batch.pairs] if winners_only else batch.latents
        return latents, batch.cond
    pixels = batch.pixels[: batch.pairs] if winners_only else batch.pixels
    return adapter.encode_pixels(pixels), adapter.encode_prompts(batch.prompts)


def any_count_errors(pred, target, elem_weight=None, **shard) -> torch.Tensor:
    """`sample_errors` of any number of samples: the kernel reduces pairs (an even row count),
    and SFT on winners has one row a pair, so an odd count is given twice and the copies' errors
    dropped (their gradient is zero: the samples' gradient is unchanged)."""
    rows = pred.shape[0]
    if rows % 2 == 0:
        return sample_errors(pred, target, elem_weight, **shard)
    twice = [
        torch.cat([x, x]) if x is not None and x.dim() and x.shape[0] == rows else x
        for x in (pred, target, elem_weight)
    ]
    return sample_errors(*twice, **shard)[:rows]


def element_weights(batch, latents: torch.Tensor, winners_only: bool = False) -> torch.Tensor | None:
    """The kernel's elem_weight for `latents` ([2B, ...], or [B, ...] of winners alone): each
    pair's weight map at the latent grid, for its winner and its loser; None without maps."""
    if isinstance(batch, LatentPairBatch):
        weights = batch.elem_weight
    else:
        weights = (
            latent_weights(batch.weight_maps, latents.shape, latents.device) if batch.weight_maps else None
        )
    if weights is None:
        return None
    return weights if winners_only else torch.cat([weights, weights])


def forward_loss(
    objective: str,
    adapter,
    network,
    reference,
    batch,
    noise,
    loss_cfg,
    mark: Callable[[str], None] = _no_mark,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one micro-batch and its metrics. `network` is the policy as the strategy wraps
    it (DDP, FSDP, a DeepSpeed engine); `mark(phase)` is called as each phase ends (encode,
    reference, policy_forward, loss) for benchmarks that time them."""
    if objective == "sft":
        winners_only = loss_cfg.winners_only
        latents, cond = model_inputs(adapter, batch, winners_only)
        if not winners_only:  # both images: the prompt of each pair twice
            cond = {key: torch.cat([value, value]) for key, value in cond.items()}
        weights = element_weights(batch, latents, winners_only)
        x_t, t, target = noise.draw(adapter, latents, ids=batch.ids, epoch=batch.epoch, paired=False)
        mark("encode")
        pred, target, shard = loss_inputs(adapter, adapter.predict(network, x_t, t, cond), target, weights)
        err = any_count_errors(pred, target, **shard).float()  # float64 not needed
        mark("policy_forward")
        loss = err.mean()
        mark("loss")
        return loss, {"loss": loss.detach(), "e_pol": err.detach().mean()}
    latents, cond = model_inputs(adapter, batch)
    weights = element_weights(batch, latents)
    x_t, t, target = noise.draw(adapter, latents, ids=batch.ids, epoch=batch.epoch, paired=True)
    mark("encode")
    ref_err = reference.errors(  # the reference output is freed in here
        x_t, t, cond, target, ids=batch.ids, epoch=batch.epoch, elem_weight=weights
    )
    mark("reference")
    pred = adapter.predict(network, x_t, t, cond)
    mark("policy_forward")
    beta = resolve_beta(loss_cfg, pred[0].numel())  # of the whole sample, also when its tokens are split
    pred, target, shard = loss_inputs(adapter, pred, target, weights)
    out = poly_dpo_loss(
        pred,
        target,
        ref_err=ref_err,
        **shard,
        beta=beta,
        alpha=loss_cfg.alpha,
        pair_weight=batch.weights,
        loss_type=loss_cfg.loss_type,
    )
    mark("loss")
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
