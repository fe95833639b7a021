"""Released reward-model checkpoints -> folders the scorers load with transformers.

    vipo scorers convert hpsv2 HPS_v2.1_compressed.pt --tokenizer CLIP_TOKENIZER_DIR --out DIR
    vipo scorers convert imagereward ImageReward.pt --tokenizer BERT_BASE_UNCASED_DIR --out DIR

HPSv2.1 is an open_clip ViT-H-14 state dict (OpenAI CLIP's layout: fused `in_proj` attention,
`c_fc`/`c_proj` MLPs, projections as [width, embed] matrices applied as x @ P). It becomes a
CLIPModel: q/k/v split from `in_proj`, projections transposed into Linear weights, GELU (open_clip's
ViT-H-14 does not use OpenAI's QuickGELU). Head counts are not in a state dict: they come from
the head widths (ViT-H-14: 80 for the image tower, 64 for the text tower). The tokenizer is the
CLIP BPE every OpenAI/LAION CLIP ships (vocab.json + merges.txt); the image processor is CLIP's
224 px bicubic resize, centre crop and OpenAI mean/std, which is open_clip's eval transform.

ImageReward.pt holds `blip.visual_encoder.*` (a timm-style ViT), `blip.text_encoder.*` (BLIP's BERT
with cross-attention, the naming transformers' BlipTextModel keeps) and `mlp.layers.*`. The
renames are those of transformers' BLIP conversion. Files are read with torch.load(weights_only=True).
"""

import json
import logging
import math
import re
from pathlib import Path

import torch

from .base import ScorerError, load_state_file

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------
# open_clip (HPSv2) -> CLIPModel


def _blocks(state: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    if not found:
        raise ScorerError(f"no {prefix}N.* tensors: not an open_clip CLIP state dict")
    return max(found) + 1


def _tower(state: dict, src: str, dst: str, layers: int) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(layers):
        s, d = f"{src}{i}.", f"{dst}{i}."
        q, k, v = state[s + "attn.in_proj_weight"].chunk(3)
        qb, kb, vb = state[s + "attn.in_proj_bias"].chunk(3)
        out.update(
            {
                d + "self_attn.q_proj.weight": q,
                d + "self_attn.k_proj.weight": k,
                d + "self_attn.v_proj.weight": v,
                d + "self_attn.q_proj.bias": qb,
                d + "self_attn.k_proj.bias": kb,
                d + "self_attn.v_proj.bias": vb,
                d + "self_attn.out_proj.weight": state[s + "attn.out_proj.weight"],
                d + "self_attn.out_proj.bias": state[s + "attn.out_proj.bias"],
                d + "layer_norm1.weight": state[s + "ln_1.weight"],
                d + "layer_norm1.bias": state[s + "ln_1.bias"],
                d + "layer_norm2.weight": state[s + "ln_2.weight"],
                d + "layer_norm2.bias": state[s + "ln_2.bias"],
                d + "mlp.fc1.weight": state[s + "mlp.c_fc.weight"],
                d + "mlp.fc1.bias": state[s + "mlp.c_fc.bias"],
                d + "mlp.fc2.weight": state[s + "mlp.c_proj.weight"],
                d + "mlp.fc2.bias": state[s + "mlp.c_proj.bias"],
            }
        )
    return out


def openclip_to_clip(
    state: dict[str, torch.Tensor],
    *,
    vision_head_width: int = 80,
    text_head_width: int = 64,
    hidden_act: str = "gelu",
):
    """(CLIPConfig, CLIPModel state dict) of an open_clip/OpenAI-layout CLIP state dict."""
    from transformers import CLIPConfig

    try:
        text_layers = _blocks(state, "transformer.resblocks.")
        vision_layers = _blocks(state, "visual.transformer.resblocks.")
        vocab, text_width = state["token_embedding.weight"].shape
        context = state["positional_embedding"].shape[0]
        embed = state["text_projection"].shape[1]
        vision_width, _, patch, _ = state["visual.conv1.weight"].shape
        grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
        text_mlp = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        vision_mlp = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as err:
        raise ScorerError(f"not an open_clip CLIP state dict: no {err.args[0]}") from None
    for width, head_width, tower in (
        (vision_width, vision_head_width, "image"),
        (text_width, text_head_width, "text"),
    ):
        if width % head_width:
            raise ScorerError(f"{tower} width {width} is not a multiple of the head width {head_width}")
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=text_width,
            intermediate_size=text_mlp,
            num_attention_heads=text_width // text_head_width,
            num_hidden_layers=text_layers,
            max_position_embeddings=context,
            hidden_act=hidden_act,
            projection_dim=embed,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        ),
        vision_config=dict(
            hidden_size=vision_width,
            intermediate_size=vision_mlp,
            patch_size=patch,
            num_attention_heads=vision_width // vision_head_width,
            num_hidden_layers=vision_layers,
            image_size=grid * patch,
            hidden_act=hidden_act,
            projection_dim=embed,
        ),
        projection_dim=embed,
    )
    out = {
        "logit_scale": state["logit_scale"].reshape(()),
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t(),
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].t(),
        **_tower(state, "transformer.resblocks.", "text_model.encoder.layers.", text_layers),
        **_tower(state, "visual.transformer.resblocks.", "vision_model.encoder.layers.", vision_layers),
    }
    return config, {k: v.contiguous() for k, v in out.items()}


def convert_hpsv2(checkpoint: Path, tokenizer_dir: Path, out: Path, **widths) -> Path:
    """A CLIPModel + CLIPProcessor folder for the `hpsv2` scorer."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    config, state = openclip_to_clip(load_state_file(Path(checkpoint), "hpsv2"), **widths)
    model = CLIPModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ScorerError(
            f"{checkpoint}: conversion left tensors unset {missing[:3]} or unused {unexpected[:3]}"
        )
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) != config.text_config.vocab_size:
        raise ScorerError(
            f"tokenizer {tokenizer_dir} has {len(tokenizer)} tokens but the checkpoint's text tower "
            f"has {config.text_config.vocab_size}: not the CLIP BPE this model was trained with"
        )
    if tokenizer.eos_token_id != len(tokenizer) - 1:
        raise ScorerError(
            f"tokenizer {tokenizer_dir}: end of text is id {tokenizer.eos_token_id}, not the largest id "
            f"{len(tokenizer) - 1}; open_clip reads the text at the largest id, so this is not CLIP's BPE"
        )
    tokenizer.model_max_length = config.text_config.max_position_embeddings
    size = config.vision_config.image_size
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        ),
        tokenizer=tokenizer,
    )
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------
# ImageReward -> BLIP modules + head

_VISION_RENAMES = [
    (r"^blip\.visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^blip\.visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^blip\.visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^blip\.visual_encoder\.norm\.", "vision_model.post_layernorm."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision_model.encoder.layers.\1.self_attn.qkv."),
    (
        r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.",
        r"vision_model.encoder.layers.\1.self_attn.projection.",
    ),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
    (r"^blip\.text_encoder\.", "text_encoder."),
    (r"^mlp\.layers\.", "head.layers."),
]


def imagereward_to_blip(state: dict[str, torch.Tensor], *, head_width: int = 64):
    """(BlipConfig, state dict of ImageRewardModel) of an ImageReward state dict."""
    from transformers import BlipConfig

    out, dropped = {}, []
    for key, value in state.items():
        for pattern, repl in _VISION_RENAMES:
            if re.match(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            dropped.append(key)
    if dropped:
        log.info("imagereward: %d tensors not used for scoring, e.g. %s", len(dropped), dropped[0])
    try:
        vision_width, _, patch, _ = out["vision_model.embeddings.patch_embedding.weight"].shape
        positions = out["vision_model.embeddings.position_embedding"].shape[1]
        vocab, text_width = out["text_encoder.embeddings.word_embeddings.weight"].shape
        max_positions = out["text_encoder.embeddings.position_embeddings.weight"].shape[0]
        vision_mlp = out["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
        text_mlp = out["text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as err:
        raise ScorerError(f"not an ImageReward state dict: no tensor for {err.args[0]}") from None
    for width in (vision_width, text_width):
        if width % head_width:
            raise ScorerError(f"width {width} is not a multiple of the head width {head_width}")
    vision_layers = _blocks(out, "vision_model.encoder.layers.")
    text_layers = _blocks(out, "text_encoder.encoder.layer.")
    config = BlipConfig(
        vision_config=dict(
            hidden_size=vision_width,
            intermediate_size=vision_mlp,
            num_hidden_layers=vision_layers,
            num_attention_heads=vision_width // head_width,
            patch_size=patch,
            image_size=math.isqrt(positions - 1) * patch,
            layer_norm_eps=1e-6,
        ),
        text_config=dict(
            vocab_size=vocab,
            hidden_size=text_width,
            intermediate_size=text_mlp,
            num_hidden_layers=text_layers,
            num_attention_heads=text_width // head_width,
            max_position_embeddings=max_positions,
            encoder_hidden_size=vision_width,
            layer_norm_eps=1e-12,
            bos_token_id=min(30522, vocab - 1),
            sep_token_id=min(102, vocab - 1),
        ),
    )
    return config, out


def convert_imagereward(checkpoint: Path, tokenizer_dir: Path, out: Path, *, head_width: int = 64) -> Path:
    """A folder for the `imagereward` scorer (see imagereward.py for its layout)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from .imagereward import MAX_TOKENS, REWARD_MEAN, REWARD_STD, load_imagereward

    config, state = imagereward_to_blip(
        load_state_file(Path(checkpoint), "imagereward"), head_width=head_width
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # BLIP's tokenizer: bert-base-uncased plus a [DEC] bos token and an [ENC] token (30524 ids).
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != config.text_config.vocab_size:
        raise ScorerError(
            f"tokenizer {tokenizer_dir} + [DEC], [ENC] has {len(tokenizer)} tokens but the checkpoint's text "
            f"encoder has {config.text_config.vocab_size}: use bert-base-uncased's tokenizer"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")
    settings = {
        "mean": REWARD_MEAN,
        "std": REWARD_STD,
        "max_tokens": MAX_TOKENS,
        "image_size": config.vision_config.image_size,
    }
    (out / "imagereward.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    tokenizer.save_pretrained(out)
    load_imagereward(out)  # every tensor placed: fail here, not at the first eval
    return out
