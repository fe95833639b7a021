"""ImageReward on transformers' BLIP modules.

The original (THUDM/ImageReward) is BLIP's ViT-L/16 image encoder, BLIP's BERT text encoder
with cross-attention to the image, and an MLP on the [CLS] state:

    image_embeds = ViT(image)                                      224 px, bicubic, centre crop
    state        = BERT(prompt tokens, cross-attending image_embeds)[:, 0]     35 tokens
    reward       = (MLP(state) - 0.16717362830052426) / 1.0333394966054072

Its package pins an old timm and downloads at import, so vipo rebuilds the same computation on
transformers' BlipVisionModel and BlipTextModel (the modules transformers ports BLIP's code to)
from a folder written by `vipo scorers convert imagereward ImageReward.pt --tokenizer BERT_DIR`:

    config.json          BlipConfig (vision ViT-L/16, text BERT-base with cross-attention)
    model.safetensors    vision_model.*, text_encoder.*, head.layers.*
    imagereward.json     mean, std, max_tokens, image_size
    tokenizer files      bert-base-uncased with BLIP's [DEC] and [ENC] tokens
"""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ...models.tokenizer import check_tokenizer
from .base import LinearStack, Scorer, ScorerError, require_path

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TOKENS = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageRewardModel(nn.Module):
    def __init__(self, config, head: LinearStack):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipTextModel(config.text_config, add_pooling_layer=False)
        self.head = head

    def forward(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        image_embeds = self.vision_model(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        state = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        ).last_hidden_state[:, 0]
        return self.head(state.float())


def preprocess(images: list[Image.Image], size: int) -> torch.Tensor:
    """ImageReward's transform (torchvision Resize, CenterCrop, ToTensor, Normalize) written with
    PIL: shorter side to `size` (bicubic), centre crop, [0, 1], CLIP mean/std."""
    rows = []
    for image in images:
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_long = int(size * long / short)  # torchvision's Resize(size) truncates the long side
        new_size = (size, new_long) if width <= height else (new_long, size)
        resized = image.convert("RGB").resize(new_size, Image.BICUBIC)
        left = int(round((resized.width - size) / 2.0))
        top = int(round((resized.height - size) / 2.0))
        rows.append(np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0)
    pixels = torch.from_numpy(np.stack(rows)).permute(0, 3, 1, 2)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def load_imagereward(folder: Path, scorer: str = "imagereward") -> tuple[ImageRewardModel, dict]:
    from safetensors.torch import load_file
    from transformers import BlipConfig

    for name in ("config.json", "model.safetensors", "imagereward.json"):
        if not (folder / name).is_file():
            raise ScorerError(
                f"scorer '{scorer}': {folder} lacks {name} (make the folder with `vipo scorers convert imagereward`)"
            )
    config = BlipConfig.from_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    head = LinearStack.from_state_dict(
        {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")},
        f"{folder}/model.safetensors",
    )
    model = ImageRewardModel(config, head)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ScorerError(
            f"scorer '{scorer}': {folder}/model.safetensors does not fit its config.json: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    settings = json.loads((folder / "imagereward.json").read_text(encoding="utf-8"))
    return model, settings


class ImageReward(Scorer):
    name = "imagereward"
    gain = "absolute"

    def __init__(self, paths, device, dtype=torch.float32, **options):
        super().__init__(device, dtype, **options)
        from transformers import AutoTokenizer

        folder = require_path(self.name, "path", paths.path)
        model, self.settings = load_imagereward(folder)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.model.head.float()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise ScorerError(f"scorer 'imagereward': no tokenizer in {folder}: {err}") from None
        check_tokenizer(
            self.tokenizer, self.model.text_encoder.config.vocab_size, f"scorer 'imagereward' {folder}"
        )

    def score_images(self, images, prompts):
        size = int(self.settings.get("image_size", 224))
        pixels = preprocess(images, size).to(self.device, self.dtype)
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=int(self.settings.get("max_tokens", MAX_TOKENS)),
            return_tensors="pt",
        )
        raw = self.model(pixels, tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device))
        return (raw - self.settings.get("mean", REWARD_MEAN)) / self.settings.get("std", REWARD_STD)
