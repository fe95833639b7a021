"""FLUX.1: FluxTransformer2DModel (double- then single-stream blocks) trained by flow matching.

    x_t = (1 - t) x0 + t eps,   target = eps - x0,   t in (0, 1)

The schedule is base.FlowMatchingAdapter's, shared with SD3 and Wan.

The adapter speaks in unpacked latents [N, 16, h, w], like every other family, so a sample's
error is a mean over the same elements either way. Only `predict` packs them as FluxPipeline
does: 2x2 latent patches become tokens [N, h/2 * w/2, 64], with img_ids (0, row, col) for the
rotary embedding; the prediction is unpacked again. The conditioning, as FluxPipeline.encode_prompt:

    encoder_hidden_states  T5's last hidden state (512 tokens for FLUX.1-dev), no attention mask
    pooled_projections     CLIP-L's pooled output (pooler_output, not a projection)
    txt_ids                zeros [L, 3]: text tokens carry no position in the rotary embedding

The transformer takes t in [0, 1] (it multiplies by 1000 itself) and, for the guidance-distilled
FLUX.1-dev, an embedded guidance scale.
"""

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
    token_ids,
)
from .tokenizer import WordTokenizer, check_tokenizer

T5_MAX_TOKENS = 512  # FluxPipeline's default max_sequence_length (FLUX.1-dev)
GUIDANCE = 3.5  # FluxPipeline's default guidance_scale


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] -> [N, h/2 * w/2, 4C] tokens of 2x2 patches (FluxPipeline._pack_latents)."""
    n, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: latent sides must be even, got {h}x{w}")
    patches = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack_latents` (FluxPipeline._unpack_latents, in latent cells)."""
    n, _, features = tokens.shape
    patches = tokens.view(n, h // 2, w // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(n, features // 4, h, w)


def image_ids(h: int, w: int, device) -> torch.Tensor:
    """(0, row, col) of each packed token, row-major like its position in the sequence."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=torch.float32)


class FluxAdapter(FlowMatchingAdapter):
    family = "flux"

    def __init__(
        self,
        network,
        text_encoders,
        tokenizers,
        vae,
        device,
        *,
        t5_max_tokens=T5_MAX_TOKENS,
        guidance=GUIDANCE,
        dtype=torch.float32,
        **sampling,
    ):
        super().__init__(network, device, **sampling)
        for encoder in text_encoders:
            encoder.requires_grad_(False).eval()
        self.text_encoder, self.text_encoder_2 = text_encoders  # CLIP-L, T5-XXL
        self.tokenizer, self.tokenizer_2 = tokenizers
        self.vae = vae.requires_grad_(False).eval() if vae is not None else None
        self.t5_max_tokens, self.guidance, self.dtype = t5_max_tokens, guidance, dtype

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        clip_ids = token_ids(self.tokenizer, prompts).to(self.device)
        pooled = self.text_encoder(clip_ids).pooler_output
        t5_ids = token_ids(self.tokenizer_2, prompts, self.t5_max_tokens).to(self.device)
        hidden = self.text_encoder_2(t5_ids).last_hidden_state
        return {"encoder_hidden_states": hidden.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}

    def predict(self, network: nn.Module, x_t, t, cond):
        cond = rows_for(cond, x_t.shape[0])
        hidden = cond["encoder_hidden_states"]
        h, w = x_t.shape[-2:]
        guidance = None
        # FLUX.1-dev is guidance-distilled; schnell is not. Under DDP the config is the module's.
        if getattr(network, "module", network).config.guidance_embeds:
            guidance = torch.full((x_t.shape[0],), self.guidance, device=x_t.device, dtype=torch.float32)
        tokens = network(
            hidden_states=pack_latents(x_t),
            timestep=t,
            guidance=guidance,  # t in [0, 1]: the model scales it
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=hidden,
            txt_ids=torch.zeros(hidden.shape[1], 3, device=x_t.device),
            img_ids=image_ids(h, w, x_t.device),
            return_dict=False,  # diffusers' context-parallel hooks take tensors, not output classes
        )[0]
        return unpack_latents(tokens, h, w)


def build_flux(model_cfg, device: torch.device, vocabulary: list[str] | None = None) -> FluxAdapter:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import (
        AutoTokenizer,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
    )

    options = {}
    if model_cfg.path:
        root = Path(model_cfg.path)
        parts = (
            "transformer",
            "text_encoder",
            "text_encoder_2",
            "tokenizer",
            "tokenizer_2",
            "vae",
            "scheduler",
        )
        require_subfolders(root, parts, "FLUX")
        network = denoiser_from_folder(FluxTransformer2DModel, root, "transformer")
        text_encoders = [
            from_folder(CLIPTextModel, root, "text_encoder"),
            from_folder(T5EncoderModel, root, "text_encoder_2"),
        ]
        tokenizers = [
            from_folder(CLIPTokenizer, root, "tokenizer"),
            from_folder(AutoTokenizer, root, "tokenizer_2"),
        ]
        for tokenizer, encoder, name in zip(tokenizers, text_encoders, parts[3:5], strict=True):
            check_tokenizer(tokenizer, encoder.config.vocab_size, f"{root}/{name}")
        vae = from_folder(AutoencoderKL, root, "vae")
    else:
        arch = load_architecture(model_cfg.config)
        network = FluxTransformer2DModel(**arch["transformer"])
        text_encoders = [
            CLIPTextModel(CLIPTextConfig(**arch["text_encoder"])),
            T5EncoderModel(T5Config(**arch["text_encoder_2"])),
        ]
        t5_max_tokens = arch.get("max_t5_tokens", T5_MAX_TOKENS)
        tokenizers = [
            WordTokenizer(arch["text_encoder"]["vocab_size"], arch["max_prompt_tokens"], vocabulary),
            WordTokenizer(arch["text_encoder_2"]["vocab_size"], t5_max_tokens, vocabulary),
        ]
        vae = AutoencoderKL(**arch["vae"]) if arch.get("vae") else None
        keys = ("timestep_sampling", "logit_mean", "logit_std", "guidance")
        options = {"t5_max_tokens": t5_max_tokens, **{key: arch[key] for key in keys if key in arch}}
    for encoder in text_encoders:
        encoder.to(device)
    if vae is not None:
        vae.to(device)
    return FluxAdapter(place(network, device), text_encoders, tokenizers, vae, device, **options)
