"""SD1.5: UNet2DConditionModel, eps-prediction on a DDPM training schedule, CLIP text encoder.

Builds from a local diffusers-layout folder (`model.path`: unet/, text_encoder/, tokenizer/,
vae/, scheduler/) or, with random weights, from an architecture config (`model.config`).
A config whose `vae` is null works in pixel space (the tiny test/demo variant).
"""

from pathlib import Path

import torch
from torch import nn

from ..errors import RunError
from .base import DiffusionAdapter, load_architecture, repeat_pairs
from .tokenizer import WordTokenizer, check_tokenizer


class SD15Adapter(DiffusionAdapter):
    family = "sd15"
    prediction_type = "epsilon"

    def __init__(self, network, text_encoder, tokenizer, vae, alphas_cumprod, device, dtype=torch.float32):
        super().__init__(network, device)
        self.text_encoder = text_encoder.requires_grad_(False).eval() if text_encoder is not None else None
        self.tokenizer = tokenizer
        self.vae = vae.requires_grad_(False).eval() if vae is not None else None
        self.alphas_cumprod = alphas_cumprod.to(device=device, dtype=torch.float32)
        self.dtype = dtype

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(self.tokenizer, WordTokenizer):
            ids = self.tokenizer(prompts)
        else:
            ids = self.tokenizer(
                prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                truncation=True, return_tensors="pt",
            ).input_ids  # fmt: skip
        hidden = self.text_encoder(ids.to(self.device)).last_hidden_state
        return {"encoder_hidden_states": hidden.to(self.dtype)}

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        pixels = pixels.to(self.device)
        if self.vae is None:
            return pixels.to(self.dtype)
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        latents = posterior.sample(generator) if generator is not None else posterior.mean
        return (latents * self.vae.config.scaling_factor).to(self.dtype)

    def sample_timesteps(self, n, generator):
        return torch.randint(0, len(self.alphas_cumprod), (n,), generator=generator, device=generator.device)

    def add_noise(self, latents, eps, t):
        a = self.alphas_cumprod[t].view(-1, *([1] * (latents.dim() - 1)))
        x_t = (a.sqrt() * latents.float() + (1 - a).sqrt() * eps.float()).to(latents.dtype)
        return x_t, eps

    def predict(self, network: nn.Module, x_t, t, cond):
        hidden = cond["encoder_hidden_states"]
        if x_t.shape[0] == 2 * hidden.shape[0]:
            hidden = repeat_pairs(cond)["encoder_hidden_states"]
        return network(x_t, t, encoder_hidden_states=hidden).sample

    def export(self, out_dir: Path) -> None:
        """Save the trained UNet in diffusers layout (`out_dir/unet`)."""
        self.network.save_pretrained(Path(out_dir) / "unet", safe_serialization=True)


def _alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**scheduler_config).alphas_cumprod.clone()


def build_sd15(model_cfg, device: torch.device, vocabulary: list[str] | None = None) -> SD15Adapter:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if model_cfg.path:
        root = Path(model_cfg.path)
        missing = [part for part in ("unet", "text_encoder", "tokenizer", "vae", "scheduler") if not (root / part).is_dir()]
        if missing:
            raise RunError(f"model.path {root}: not a diffusers SD1.5 folder, missing {', '.join(m + '/' for m in missing)}")
        network = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
        text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
        check_tokenizer(tokenizer, text_encoder.config.vocab_size, f"{root}/tokenizer")
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae")
        alphas = DDPMScheduler.from_pretrained(root, subfolder="scheduler").alphas_cumprod.clone()
    else:
        arch = load_architecture(model_cfg.config)
        network = UNet2DConditionModel(**arch["unet"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**arch["text_encoder"]))
        tokenizer = WordTokenizer(arch["text_encoder"]["vocab_size"], arch["max_prompt_tokens"], vocabulary)
        vae = AutoencoderKL(**arch["vae"]) if arch.get("vae") else None
        alphas = _alphas_cumprod(arch["scheduler"])
    text_encoder.to(device)
    if vae is not None:
        vae.to(device)
    return SD15Adapter(network.to(device), text_encoder, tokenizer, vae, alphas, device)
