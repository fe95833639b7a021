"""Held-out preference accuracy: does the policy's implicit reward rank winners above losers?

The implicit reward of an image under the policy is how much better the policy denoises it
than the reference: r = -(e_pol - e_ref). A pair is ranked right when z > 0, i.e. when
r(winner) > r(loser); ties (policy == reference) count half, as in diffusers' DPO script.
Each pair is scored at `draws` fixed (noise, t) draws, the same for every model compared.
"""

import numpy as np
import torch

from vipo.kernels import sample_errors

from ..models.base import frozen_mode
from ..objectives import PairBatch


def _batch(source, indices, device) -> PairBatch:
    records = [source[i] for i in indices]
    images = np.stack([r.winner for r in records] + [r.loser for r in records])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return PairBatch([r.id for r in records], [r.prompt for r in records], pixels.to(device))


@torch.no_grad()
def held_out_accuracy(
    adapter, reference, source, *, draws: int = 4, batch_pairs: int = 32, seed: int = 1234
) -> dict:
    network = adapter.network
    was_training = network.training
    # The mode the reference runs in (see frozen_mode): in another mode PyTorch may take other code
    # paths, and a policy equal to its reference would not tie on every pair.
    network.train(frozen_mode(network))
    gaps = []
    try:
        for start in range(0, len(source), batch_pairs):
            batch = _batch(source, range(start, min(start + batch_pairs, len(source))), adapter.device)
            cond = adapter.encode_prompts(batch.prompts)
            latents = adapter.encode_pixels(batch.pixels)
            generator = torch.Generator(device=adapter.device).manual_seed(seed + start)
            gap = torch.zeros(latents.shape[0], dtype=torch.float64, device=adapter.device)
            for _ in range(draws):
                x_t, t, target = adapter.noisy_inputs(latents, generator)
                policy_err = sample_errors(adapter.predict(network, x_t, t, cond), target)
                gap += policy_err - reference.errors(x_t, t, cond, target)
            gaps.append(gap / draws)
    finally:
        network.train(was_training)
    gap = torch.cat([g.view(2, -1) for g in gaps], dim=1)  # [2, pairs]: winners, losers
    d = gap[0] - gap[1]  # z = -0.5 beta d: the sign is all that ranks
    return {
        "accuracy": ((d < 0).float() + 0.5 * (d == 0).float()).mean().item(),
        "winner_change": gap[0].mean().item(),
        "loser_change": gap[1].mean().item(),
        "pairs": int(d.numel()),
    }
