"""The CLIP-based scorers, each on a transformers CLIPModel read from a local folder.

pickscore  logit_scale.exp() * cos(image, prompt)     PickScore_v1 (a fine-tuned CLIP-H/14);
                                                      ~20-22 on SD1.5 images (Table 2)
hpsv2      cos(image, prompt)                         HPSv2.1 (a fine-tuned open_clip ViT-H-14,
                                                      converted by `vipo scorers convert hpsv2`);
                                                      ~0.25-0.29 as the HPSv2 release prints it
clip       100 * cos(image, prompt)                   CLIP score, not clipped at 0 (the clip
                                                      would turn rankings of weak pairs into ties)
aesthetic  MLP(normalized CLIP ViT-L/14 image embedding)   LAION aesthetic predictor v2, ~5-6
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ...models.tokenizer import check_tokenizer
from .base import LinearStack, Scorer, ScorerError, load_state_file, require_model_folder, require_path


class ClipEmbedder:
    """Normalized image and text embeddings of a CLIPModel folder and its processor."""

    def __init__(
        self, scorer: str, key: str, model_dir: str | None, processor_dir: str | None, device, dtype
    ):
        from transformers import CLIPModel, CLIPProcessor

        model_path = require_model_folder(scorer, key, model_dir)
        processor_path = require_path(
            scorer, "processor" if processor_dir else key, processor_dir or model_dir
        )
        try:
            self.processor = CLIPProcessor.from_pretrained(processor_path)
        except (OSError, ValueError, TypeError) as err:
            raise ScorerError(f"scorer '{scorer}': no CLIP processor in {processor_path}: {err}") from None
        self.model = CLIPModel.from_pretrained(model_path, torch_dtype=dtype).to(device).eval()
        text_config = self.model.config.text_config
        check_tokenizer(
            self.processor.tokenizer, text_config.vocab_size, f"scorer '{scorer}' {processor_path}"
        )
        self.max_tokens = min(self.processor.tokenizer.model_max_length, text_config.max_position_embeddings)
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        pooled = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.processor.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        pooled = self.model.text_model(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
        ).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def cosine(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        return (self.images(images) * self.texts(prompts)).sum(-1)


class _ClipScorer(Scorer):
    scale_by_logit = False
    factor = 1.0

    def __init__(self, folder, device, dtype=torch.float32, **options):
        super().__init__(device, dtype, **options)
        self.embedder = ClipEmbedder(self.name, "path", folder.path, folder.processor, device, dtype)

    def score_images(self, images, prompts):
        cos = self.embedder.cosine(images, prompts)
        if self.scale_by_logit:
            return self.embedder.model.logit_scale.float().exp() * cos
        return self.factor * cos


class PickScore(_ClipScorer):
    name = "pickscore"
    scale_by_logit = True


class HPSv2(_ClipScorer):
    name = "hpsv2"


class ClipScore(_ClipScorer):
    name = "clip"
    factor = 100.0


class AestheticScore(Scorer):
    """LAION improved-aesthetic-predictor: its MLP on the L2-normalized CLIP ViT-L/14 image
    embedding (768 features); the prompt plays no part."""

    name = "aesthetic"

    def __init__(self, paths, device, dtype=torch.float32, **options):
        super().__init__(device, dtype, **options)
        head_path = require_path(self.name, "head", paths.head, kind="file")
        self.embedder = ClipEmbedder(self.name, "clip", paths.clip, None, device, dtype)
        self.head = LinearStack.from_state_dict(load_state_file(Path(head_path), self.name), str(head_path))
        width = self.embedder.model.config.projection_dim
        if self.head.in_features != width:
            raise ScorerError(
                f"scorer 'aesthetic': head {head_path} takes {self.head.in_features} features but the CLIP "
                f"in {paths.clip} embeds images in {width} (the predictor needs CLIP ViT-L/14: 768)"
            )
        self.head.to(device).eval()

    def score_images(self, images, prompts):
        return self.head(self.embedder.images(images))
