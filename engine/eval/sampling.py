"""Deterministic DDIM sampling (eta = 0) for eps-prediction families, used by reports.

x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t);   x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev) eps
"""

import numpy as np
import torch


@torch.no_grad()
def ddim_sample(
    adapter, network, prompts: list[str], shape: tuple[int, ...], *, steps: int = 25, seed: int = 0
) -> np.ndarray:
    """Images for `prompts` as [N, H, W, 3] uint8; `shape` is one latent's shape."""
    if adapter.prediction_type != "epsilon":
        raise ValueError(f"ddim_sample is for eps-prediction families, not {adapter.family}")
    was_training = network.training
    network.eval()
    try:
        cond = adapter.encode_prompts(prompts)
        generator = torch.Generator(device=adapter.device).manual_seed(seed)
        x = torch.randn((len(prompts), *shape), generator=generator, device=adapter.device)
        alphas = adapter.alphas_cumprod
        timesteps = torch.linspace(len(alphas) - 1, 0, steps).round().long().tolist()
        for i, t in enumerate(timesteps):
            a_t = alphas[t]
            a_prev = (
                alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0, device=x.device)
            )
            t_batch = torch.full((len(prompts),), t, device=x.device, dtype=torch.long)
            eps = adapter.predict(network, x.to(adapter.dtype), t_batch, cond).float()
            x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1.5, 1.5)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        if adapter.vae is not None:
            x = adapter.vae.decode(x.to(adapter.vae.dtype) / adapter.vae.config.scaling_factor).sample.float()
    finally:
        network.train(was_training)
    images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()
