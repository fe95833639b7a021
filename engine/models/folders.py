"""Random-weight diffusers folders of an architecture: what `model.path` reads, written without a
model hub, for tests and benchmarks (start-up from a folder, export, loaders that read one)."""

import json
from pathlib import Path

import torch


def write_sd15_folder(root, *, resolution: int = 16, unet: dict | None = None) -> Path:
    """A tiny SD1.5 model saved as a diffusers pipeline folder (unet, vae, text_encoder, a real
    byte-level CLIP tokenizer with no merges, scheduler, model_index.json), as `model.path` expects
    a downloaded one. Random weights; seeded. `unet`: the UNet's diffusers config instead of the
    tiny one (e.g. the real SD1.5 UNet of configs/models/sd15.json, with the tiny encoders)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    root = Path(root)
    work = root.parent / f".{root.name}-tokenizer"
    work.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {
        token: i
        for i, token in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"])
    }
    (work / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (work / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(work / "vocab.json"), str(work / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=(unet or {}).get("cross_attention_dim", 32),  # what the UNet attends to
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=16,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=[16, 32],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=resolution,
    )
    unet = (
        UNet2DConditionModel(**unet)
        if unet is not None
        else UNet2DConditionModel(
            sample_size=resolution // 2,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=[32, 64],
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(root, safe_serialization=True)
    return root
