"""The UNet families: eps-prediction on a DDPM training schedule.

    sd15  UNet2DConditionModel, one CLIP text encoder (last hidden state)
    sdxl  UNet2DConditionModel with "text_time" added conditions, two CLIP text encoders:
          CLIP-L and CLIP-G penultimate hidden states side by side, CLIP-G's pooled projection
          and the size/crop micro-conditioning (time_ids)

Each builds from a local diffusers-layout folder (`model.path`) or, with random weights, from
an architecture config (`model.config`). A config whose `vae` is null works in pixel space
(the tiny test/demo variants).
"""

from pathlib import Path

import torch
from torch import nn

from .base import (
    DiffusionAdapter,
    clip_penultimate,
    denoiser_from_folder,
    from_folder,
    load_architecture,
    place,
    require_subfolders,
    rows_for,
    token_ids,
)
from .tokenizer import WordTokenizer, check_tokenizer


class SD15Adapter(DiffusionAdapter):
    family = "sd15"
    prediction_type = "epsilon"
    denoiser = "unet"

    def __init__(self, network, text_encoder, tokenizer, vae, alphas_cumprod, device, dtype=torch.float32):
        super().__init__(network, device)
        self.text_encoder = text_encoder.requires_grad_(False).eval() if text_encoder is not None else None
        self.tokenizer = tokenizer
        self.vae = vae.requires_grad_(False).eval() if vae is not None else None
        self.alphas_cumprod = alphas_cumprod.to(device=device, dtype=torch.float32)
        self.dtype = dtype

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        hidden = self.text_encoder(token_ids(self.tokenizer, prompts).to(self.device)).last_hidden_state
        return {"encoder_hidden_states": hidden.to(self.dtype)}

    def sample_timesteps(self, n, generator):
        return torch.randint(0, len(self.alphas_cumprod), (n,), generator=generator, device=generator.device)

    def add_noise(self, latents, eps, t):
        a = self.alphas_cumprod[t].view(-1, *([1] * (latents.dim() - 1)))
        x_t = (a.sqrt() * latents.float() + (1 - a).sqrt() * eps.float()).to(latents.dtype)
        return x_t, eps

    def predict(self, network: nn.Module, x_t, t, cond):
        hidden = rows_for(cond, x_t.shape[0])["encoder_hidden_states"]
        return network(x_t, t, encoder_hidden_states=hidden).sample


def _alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**scheduler_config).alphas_cumprod.clone()


def build_sd15(model_cfg, device: torch.device, vocabulary: list[str] | None = None) -> SD15Adapter:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if model_cfg.path:
        root = Path(model_cfg.path)
        require_subfolders(root, ("unet", "text_encoder", "tokenizer", "vae", "scheduler"), "SD1.5")
        network = denoiser_from_folder(UNet2DConditionModel, root, "unet")
        text_encoder = from_folder(CLIPTextModel, root, "text_encoder")
        tokenizer = from_folder(CLIPTokenizer, root, "tokenizer")
        check_tokenizer(tokenizer, text_encoder.config.vocab_size, f"{root}/tokenizer")
        vae = from_folder(AutoencoderKL, root, "vae")
        alphas = from_folder(DDPMScheduler, root, "scheduler").alphas_cumprod.clone()
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
    return SD15Adapter(place(network, device), text_encoder, tokenizer, vae, alphas, device)


class SDXLAdapter(SD15Adapter):
    """SD1.5's schedule and VAE handling, with SDXL's two text encoders and added conditions."""

    family = "sdxl"

    def __init__(self, network, text_encoders, tokenizers, vae, alphas_cumprod, device, dtype=torch.float32):
        super().__init__(network, text_encoders[0], tokenizers[0], vae, alphas_cumprod, device, dtype)
        self.text_encoder_2 = text_encoders[1].requires_grad_(False).eval()
        self.tokenizer_2 = tokenizers[1]
        # Pixels per latent cell: time_ids speak in pixels, the UNet sees latents.
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        hidden_l, _ = clip_penultimate(self.text_encoder, self.tokenizer, prompts)
        hidden_g, pooled = clip_penultimate(self.text_encoder_2, self.tokenizer_2, prompts)
        # As StableDiffusionXLPipeline.encode_prompt: features side by side (768 + 1280 = 2048).
        hidden = torch.cat([hidden_l, hidden_g], dim=-1)
        return {"encoder_hidden_states": hidden.to(self.dtype), "text_embeds": pooled.to(self.dtype)}

    def time_ids(self, x_t: torch.Tensor) -> torch.Tensor:
        """SDXL's micro-conditioning (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per
        row: training images are used at their own size, uncropped."""
        h, w = (side * self.vae_scale for side in x_t.shape[-2:])
        ids = torch.tensor([h, w, 0, 0, h, w], device=x_t.device, dtype=self.dtype)
        return ids.expand(x_t.shape[0], -1)

    def predict(self, network: nn.Module, x_t, t, cond):
        cond = rows_for(cond, x_t.shape[0])
        added = {"text_embeds": cond["text_embeds"], "time_ids": self.time_ids(x_t)}
        hidden = cond["encoder_hidden_states"]
        return network(x_t, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


def build_sdxl(model_cfg, device: torch.device, vocabulary: list[str] | None = None) -> SDXLAdapter:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if model_cfg.path:
        root = Path(model_cfg.path)
        parts = ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler")
        require_subfolders(root, parts, "SDXL")
        network = denoiser_from_folder(UNet2DConditionModel, root, "unet")
        text_encoders = [
            from_folder(CLIPTextModel, root, "text_encoder"),
            from_folder(CLIPTextModelWithProjection, root, "text_encoder_2"),
        ]
        names = ("tokenizer", "tokenizer_2")
        tokenizers = [from_folder(CLIPTokenizer, root, name) for name in names]
        for tokenizer, encoder, name in zip(tokenizers, text_encoders, names, strict=True):
            check_tokenizer(tokenizer, encoder.config.vocab_size, f"{root}/{name}")
        vae = from_folder(AutoencoderKL, root, "vae")
        alphas = from_folder(DDPMScheduler, root, "scheduler").alphas_cumprod.clone()
    else:
        arch = load_architecture(model_cfg.config)
        network = UNet2DConditionModel(**arch["unet"])
        text_encoders = [
            CLIPTextModel(CLIPTextConfig(**arch["text_encoder"])),
            CLIPTextModelWithProjection(CLIPTextConfig(**arch["text_encoder_2"])),
        ]
        tokenizers = [
            WordTokenizer(arch[name]["vocab_size"], arch["max_prompt_tokens"], vocabulary)
            for name in ("text_encoder", "text_encoder_2")
        ]
        vae = AutoencoderKL(**arch["vae"]) if arch.get("vae") else None
        alphas = _alphas_cumprod(arch["scheduler"])
    for encoder in text_encoders:
        encoder.to(device)
    if vae is not None:
        vae.to(device)
    return SDXLAdapter(place(network, device), text_encoders, tokenizers, vae, alphas, device)
