"""SD3 / SD3.5: SD3Transformer2DModel (MMDiT) trained by flow matching.

    x_t = (1 - t) x0 + t eps,   target = eps - x0,   t in (0, 1), the transformer sees t * 1000

The schedule (logit-normal or uniform t) is base.FlowMatchingAdapter's. The prompt goes through three encoders, laid out as
StableDiffusion3Pipeline.encode_prompt does:

    encoder_hidden_states  [CLIP-L | CLIP-G] penultimate states, zero-padded to T5's width,
                           followed on the sequence axis by T5's last hidden state (77 + 256 tokens)
    pooled_projections     [CLIP-L | CLIP-G] pooled text_embeds (768 + 1280 = 2048)

Builds from a local diffusers-layout folder (`model.path`) or, with random weights, from an
architecture config (`model.config`); a config whose `vae` is null works in pixel space.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    FlowMatchingAdapter,
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

T5_MAX_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length
TIMESTEP_SCALE = 1000.0  # the transformer's timestep embedding expects t in [0, 1000]


class SD3Adapter(FlowMatchingAdapter):
    family = "sd3"

    def __init__(
        self,
        network,
        text_encoders,
        tokenizers,
        vae,
        device,
        *,
        t5_max_tokens=T5_MAX_TOKENS,
        dtype=torch.float32,
        **sampling,
    ):
        super().__init__(network, device, **sampling)
        for encoder in text_encoders:
            encoder.requires_grad_(False).eval()
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoders
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizers
        self.vae = vae.requires_grad_(False).eval() if vae is not None else None
        self.t5_max_tokens = t5_max_tokens
        self.dtype = dtype

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        hidden_l, pooled_l = clip_penultimate(self.text_encoder, self.tokenizer, prompts)
        hidden_g, pooled_g = clip_penultimate(self.text_encoder_2, self.tokenizer_2, prompts)
        t5_ids = token_ids(self.tokenizer_3, prompts, self.t5_max_tokens).to(self.device)
        hidden_t5 = self.text_encoder_3(t5_ids).last_hidden_state
        clip = torch.cat([hidden_l, hidden_g], dim=-1)
        clip = F.pad(clip, (0, hidden_t5.shape[-1] - clip.shape[-1]))  # 2048 -> 4096 features
        hidden = torch.cat([clip, hidden_t5], dim=-2)  # CLIP tokens, then T5 tokens
        pooled = torch.cat([pooled_l, pooled_g], dim=-1)
        return {"encoder_hidden_states": hidden.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}

    def predict(self, network: nn.Module, x_t, t, cond):
        cond = rows_for(cond, x_t.shape[0])
        return network(
            hidden_states=x_t,
            timestep=t * TIMESTEP_SCALE,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
        ).sample


def build_sd3(model_cfg, device: torch.device, vocabulary: list[str] | None = None) -> SD3Adapter:
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import (
        AutoTokenizer,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
    )

    sampling = {}
    if model_cfg.path:
        root = Path(model_cfg.path)
        parts = (
            "transformer",
            "text_encoder",
            "text_encoder_2",
            "text_encoder_3",
            "tokenizer",
            "tokenizer_2",
            "tokenizer_3",
            "vae",
            "scheduler",
        )
        require_subfolders(root, parts, "SD3")
        network = denoiser_from_folder(SD3Transformer2DModel, root, "transformer")
        text_encoders = [
            from_folder(CLIPTextModelWithProjection, root, "text_encoder"),
            from_folder(CLIPTextModelWithProjection, root, "text_encoder_2"),
            from_folder(T5EncoderModel, root, "text_encoder_3"),
        ]
        tokenizers = [
            from_folder(CLIPTokenizer, root, "tokenizer"),
            from_folder(CLIPTokenizer, root, "tokenizer_2"),
            from_folder(AutoTokenizer, root, "tokenizer_3"),
        ]
        for tokenizer, encoder, name in zip(tokenizers, text_encoders, parts[4:7], strict=True):
            check_tokenizer(tokenizer, encoder.config.vocab_size, f"{root}/{name}")
        vae = from_folder(AutoencoderKL, root, "vae")
        t5_max_tokens = T5_MAX_TOKENS
    else:
        arch = load_architecture(model_cfg.config)
        network = SD3Transformer2DModel(**arch["transformer"])
        text_encoders = [
            CLIPTextModelWithProjection(CLIPTextConfig(**arch["text_encoder"])),
            CLIPTextModelWithProjection(CLIPTextConfig(**arch["text_encoder_2"])),
            T5EncoderModel(T5Config(**arch["text_encoder_3"])),
        ]
        t5_max_tokens = arch.get("max_t5_tokens", T5_MAX_TOKENS)
        clip_tokens = arch["max_prompt_tokens"]
        tokenizers = [
            WordTokenizer(arch["text_encoder"]["vocab_size"], clip_tokens, vocabulary),
            WordTokenizer(arch["text_encoder_2"]["vocab_size"], clip_tokens, vocabulary),
            WordTokenizer(arch["text_encoder_3"]["vocab_size"], t5_max_tokens, vocabulary),
        ]
        vae = AutoencoderKL(**arch["vae"]) if arch.get("vae") else None
        sampling = {key: arch[key] for key in ("timestep_sampling", "logit_mean", "logit_std") if key in arch}
    for encoder in text_encoders:
        encoder.to(device)
    if vae is not None:
        vae.to(device)
    network = place(network, device)
    return SD3Adapter(
        network, text_encoders, tokenizers, vae, device, t5_max_tokens=t5_max_tokens, **sampling
    )
