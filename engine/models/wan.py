"""Wan2.1 text-to-video: WanTransformer3DModel trained by flow matching (see base.py's
FlowMatchingAdapter), on video latents [N, C, F, h, w].

    pixels    [N, 3, F, H, W] video in [-1, 1] (F = 1 + 4k, what the causal VAE encodes), or
              [N, 3, H, W] images, taken as 1-frame videos, so image pair data trains it too
    latents   AutoencoderKLWan's, normalised per channel: (z - latents_mean) / latents_std
    timestep  t * 1000: the transformer embeds the scheduler's timestep as is
    prompt    UMT5's last hidden state over the prompt's tokens, zeros past its length (as
              WanPipeline._get_t5_prompt_embeds), 512 tokens

Builds from a local diffusers-layout folder (`model.path`) or, with random weights, from an
architecture config (`model.config`); a config whose `vae` is null works in pixel space.
"""

import html
from pathlib import Path

import torch
from torch import nn

from .base import (
    FlowMatchingAdapter,
    denoiser_from_folder,
    from_folder,
    load_architecture,
    place,
    require_subfolders,
    rows_for,
)
from .tokenizer import PAD, WordTokenizer, check_tokenizer

UMT5_MAX_TOKENS = 512  # WanPipeline's default max_sequence_length
TIMESTEP_SCALE = 1000.0
VAE_FRAME_CHUNK = 4  # AutoencoderKLWan encodes the first frame, then chunks of 4; others are dropped


def clean_prompt(prompt: str) -> str:
    """WanPipeline's prompt_clean without ftfy: unescaped HTML, single spaces."""
    return " ".join(html.unescape(html.unescape(prompt)).split())


class WanAdapter(FlowMatchingAdapter):
    family = "wan"

    def __init__(
        self,
        network,
        text_encoder,
        tokenizer,
        vae,
        device,
        *,
        max_tokens=UMT5_MAX_TOKENS,
        dtype=torch.float32,
        **sampling,
    ):
        super().__init__(network, device, **sampling)
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.vae = vae.requires_grad_(False).eval() if vae is not None else None
        self.max_tokens, self.dtype = max_tokens, dtype

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L] ids and their attention mask (1 on the prompt's tokens, 0 on padding)."""
        prompts = [clean_prompt(p) for p in prompts]
        if isinstance(self.tokenizer, WordTokenizer):
            ids = self.tokenizer(prompts)
            return ids, (ids != PAD).long()
        out = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_tokens,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return out.input_ids, out.attention_mask

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        ids, mask = (x.to(self.device) for x in self.tokenize(prompts))
        hidden = self.text_encoder(ids, attention_mask=mask).last_hidden_state
        # The transformer's cross-attention has no mask: padding must carry zeros, not UMT5's states.
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        return {"encoder_hidden_states": hidden.to(self.dtype)}

    def _posterior(self, pixels: torch.Tensor):
        pixels = pixels.to(self.device)
        if pixels.dim() == 4:  # images: 1-frame videos
            pixels = pixels.unsqueeze(2)
        frames = pixels.shape[2]
        if (frames - 1) % VAE_FRAME_CHUNK:
            raise ValueError(f"Wan's VAE encodes 1 + 4k frames; got {frames} (it would drop the last ones)")
        return self.vae.encode(pixels.to(self.vae.dtype)).latent_dist

    def _normalisation(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Wan's latents are normalised per channel (latents_mean / latents_std of its VAE)."""
        config = self.vae.config
        mean = torch.tensor(config.latents_mean, device=device).view(1, -1, 1, 1, 1)
        std = torch.tensor(config.latents_std, device=device).view(1, -1, 1, 1, 1)
        return mean, std

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.vae is None:
            pixels = pixels.to(self.device)
            return (pixels.unsqueeze(2) if pixels.dim() == 4 else pixels).to(self.dtype)
        posterior = self._posterior(pixels)
        latents = posterior.sample(generator) if generator is not None else posterior.mean
        mean, std = self._normalisation(latents.device)
        return ((latents.float() - mean) / std).to(self.dtype)

    @torch.no_grad()
    def encode_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.vae is None:
            return self.encode_pixels(pixels), None
        posterior = self._posterior(pixels)
        mean, std = self._normalisation(posterior.mean.device)
        return ((posterior.mean.float() - mean) / std).to(self.dtype), (
            posterior.logvar.float() - 2 * std.log()
        ).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents.float()
        mean, std = self._normalisation(latents.device)
        return self.vae.decode((latents.float() * std + mean).to(self.vae.dtype)).sample.float()

    def predict(self, network: nn.Module, x_t, t, cond):
        hidden = rows_for(cond, x_t.shape[0])["encoder_hidden_states"]
        # return_dict=False: diffusers' context-parallel hooks take tensors, not output classes.
        (out,) = network(
            hidden_states=x_t, timestep=t * TIMESTEP_SCALE, encoder_hidden_states=hidden, return_dict=False
        )
        return out


def build_wan(model_cfg, device: torch.device, vocabulary: list[str] | None = None) -> WanAdapter:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    options = {}
    if model_cfg.path:
        root = Path(model_cfg.path)
        require_subfolders(root, ("transformer", "text_encoder", "tokenizer", "vae", "scheduler"), "Wan")
        network = denoiser_from_folder(WanTransformer3DModel, root, "transformer")
        text_encoder = from_folder(UMT5EncoderModel, root, "text_encoder")
        tokenizer = from_folder(AutoTokenizer, root, "tokenizer")
        check_tokenizer(tokenizer, text_encoder.config.vocab_size, f"{root}/tokenizer")
        vae = from_folder(AutoencoderKLWan, root, "vae")
    else:
        arch = load_architecture(model_cfg.config)
        network = WanTransformer3DModel(**arch["transformer"])
        text_encoder = UMT5EncoderModel(UMT5Config(**arch["text_encoder"]))
        max_tokens = arch.get("max_prompt_tokens", UMT5_MAX_TOKENS)
        tokenizer = WordTokenizer(arch["text_encoder"]["vocab_size"], max_tokens, vocabulary)
        vae = AutoencoderKLWan(**arch["vae"]) if arch.get("vae") else None
        keys = ("timestep_sampling", "logit_mean", "logit_std")
        options = {"max_tokens": max_tokens, **{key: arch[key] for key in keys if key in arch}}
    text_encoder.to(device)
    if vae is not None:
        vae.to(device)
    return WanAdapter(place(network, device), text_encoder, tokenizer, vae, device, **options)
