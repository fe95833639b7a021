"""Reward-model scorers, checkpoint conversion, the eval table and data agreement, on tiny
random-weight models the tests build: the numbers are checked for consistency, not quality."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

from vipo.engine.cli import main
from vipo.engine.config import ConfigError
from vipo.engine.eval.scoring import build_scorer, build_scorers, load_scorers_config
from vipo.engine.eval.scoring.agreement import agreement, suggest_alpha
from vipo.engine.eval.scoring.base import Scorer, ScorerError
from vipo.engine.eval.scoring.config import AestheticPaths, ClipFolder, ScorersConfig
from vipo.engine.eval.scoring.convert import convert_hpsv2, convert_imagereward, openclip_to_clip
from vipo.engine.eval.scoring.evaluation import open_pairs, pair_agreement
from vipo.engine.eval.scoring.table import summarize, to_markdown
from vipo.loaders.procedural import COLOURS, ProceduralPairs

from vipo_testing import write_clip_tokenizer

WORDS = "a an the on of red green blue yellow circle square triangle left right top bottom cat".split()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread; on a busy 2-core machine it costs a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_clip_config(vocab_size, projection_dim=16):
    """Text ids as the tokenizer above lays them out: start of text vocab_size-2, end vocab_size-1."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=16,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=projection_dim,
    )


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A CLIPModel + CLIPProcessor folder, random weights, as PickScore_v1 / CLIP-L are laid out."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = write_clip_tokenizer(folder / "tok", WORDS)
    torch.manual_seed(0)
    CLIPModel(tiny_clip_config(len(tokenizer))).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def aesthetic_head(tmp_path_factory, clip_dir):
    """The LAION predictor's nn.Sequential layout (Linear/Dropout, no activations), saved as .pth."""
    torch.manual_seed(1)
    head = nn.Sequential(
        nn.Linear(16, 32), nn.Dropout(0.2), nn.Linear(32, 8), nn.Dropout(0.1), nn.Linear(8, 1)
    )
    path = tmp_path_factory.mktemp("aesthetic") / "head.pth"
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, path)
    return path, head.eval()


def clip_config(clip_dir, head=None):
    return ScorersConfig(
        pickscore=ClipFolder(str(clip_dir)),
        hpsv2=ClipFolder(str(clip_dir)),
        clip=ClipFolder(str(clip_dir)),
        aesthetic=AestheticPaths(str(clip_dir), head and str(head)),
        batch_size=4,
    )


def random_images(count, seed=0, size=(24, 40)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# Scorers


def test_clip_scorers_are_their_published_functions_of_clip_similarity(clip_dir, aesthetic_head):
    from transformers import CLIPModel, CLIPProcessor

    scorers = build_scorers("pickscore,hpsv2,clip,aesthetic", clip_config(clip_dir, aesthetic_head[0]))
    images, prompts = random_images(3), ["a red circle", "a blue square on the left", "a cat"]
    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    inputs = processor(
        text=prompts, images=[Image.fromarray(i) for i in images], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        out = model(**inputs)  # transformers' own similarity: logit_scale.exp() * cos
    logits = out.logits_per_image.diagonal()
    cos = logits / model.logit_scale.exp()
    torch.testing.assert_close(scorers["pickscore"].score(images, prompts), logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scorers["hpsv2"].score(images, prompts), cos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scorers["clip"].score(images, prompts), 100 * cos, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        expected = aesthetic_head[1](F.normalize(out.image_embeds, dim=-1)).squeeze(-1)
    torch.testing.assert_close(scorers["aesthetic"].score(images, prompts), expected, rtol=1e-5, atol=1e-5)
    assert scorers["pickscore"].score(images[:1], ["a cat"]) != scorers["pickscore"].score(
        images[:1], ["a red circle"]
    )


def test_scores_do_not_depend_on_batching_and_a_video_scores_the_mean_of_its_frames(clip_dir):
    cfg = clip_config(clip_dir)
    scorer = build_scorer("clip", cfg)
    images = random_images(5, seed=3)
    prompts = ["a red circle"] * 5
    batched = scorer.score(images, prompts)
    scorer.batch_size = 1
    torch.testing.assert_close(scorer.score(images, prompts), batched, rtol=1e-5, atol=1e-4)
    video = np.stack(images[:3])
    scorer.video_frames = 3
    torch.testing.assert_close(
        scorer.score([video], ["a red circle"]), batched[:3].mean().view(1), rtol=1e-5, atol=1e-4
    )
    scorer.video_frames = 2  # frames 0 and 2 of 3, evenly spaced
    torch.testing.assert_close(
        scorer.score([video], ["a red circle"]), batched[[0, 2]].mean().view(1), rtol=1e-5, atol=1e-4
    )


def test_missing_weights_are_errors_naming_the_scorer_and_the_path(tmp_path, clip_dir):
    with pytest.raises(ScorerError, match=r"scorer 'pickscore' has no weights path: set pickscore.path"):
        build_scorer("pickscore", ScorersConfig())
    with pytest.raises(
        ScorerError, match=r"scorer 'hpsv2': folder not found at .*nowhere \(from hpsv2.path\)"
    ):
        build_scorer("hpsv2", ScorersConfig(hpsv2=ClipFolder(str(tmp_path / "nowhere"))))
    with pytest.raises(
        ScorerError, match=r"scorer 'aesthetic': file not found at .*head.pth \(from aesthetic.head\)"
    ):
        build_scorer(
            "aesthetic", ScorersConfig(aesthetic=AestheticPaths(str(clip_dir), str(tmp_path / "head.pth")))
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScorerError, match=r"scorer 'clip': .*empty is not a model folder"):
        build_scorer("clip", ScorersConfig(clip=ClipFolder(str(tmp_path / "empty"))))
    with pytest.raises(ScorerError, match=r"scorer 'imagereward' has no weights path"):
        build_scorer("imagereward", ScorersConfig())
    with pytest.raises(ConfigError, match="unknown scorer hps"):
        build_scorers("pickscore,hps", ScorersConfig())


def test_an_aesthetic_head_of_another_width_than_the_clip_is_refused(tmp_path, clip_dir):
    torch.save({"layers.0.weight": torch.zeros(1, 768), "layers.0.bias": torch.zeros(1)}, tmp_path / "h.pth")
    with pytest.raises(ScorerError, match="takes 768 features but the CLIP .* embeds images in 16"):
        build_scorer(
            "aesthetic", ScorersConfig(aesthetic=AestheticPaths(str(clip_dir), str(tmp_path / "h.pth")))
        )


def test_scorers_config_resolves_relative_paths_and_rejects_unknown_keys(tmp_path):
    path = tmp_path / "scorers.yaml"
    path.write_text(yaml.safe_dump({"pickscore": {"path": "models/pick"}, "batch_size": 2}))
    cfg = load_scorers_config(path)
    assert cfg.pickscore.path == str(tmp_path / "models" / "pick") and cfg.batch_size == 2
    path.write_text(yaml.safe_dump({"pickscore": {"weights": "x"}}))
    with pytest.raises(ConfigError, match=r"unknown key 'pickscore.weights'"):
        load_scorers_config(path)
    path.write_text(yaml.safe_dump({"batch_size": 0}))
    with pytest.raises(ConfigError, match="batch_size"):
        load_scorers_config(path)


# ---------------------------------------------------------------------------------------------
# Conversion of the released checkpoints


def random_openclip_state(seed=0, width=32, layers=2, vocab=30, context=16, embed=16, patch=8, grid=4):
    """An open_clip ViT state dict (OpenAI CLIP's layout) with random tensors."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def block(prefix):
        return {
            f"{prefix}ln_1.weight": 1 + r(width),
            f"{prefix}ln_1.bias": r(width),
            f"{prefix}attn.in_proj_weight": r(3 * width, width),
            f"{prefix}attn.in_proj_bias": r(3 * width),
            f"{prefix}attn.out_proj.weight": r(width, width),
            f"{prefix}attn.out_proj.bias": r(width),
            f"{prefix}ln_2.weight": 1 + r(width),
            f"{prefix}ln_2.bias": r(width),
            f"{prefix}mlp.c_fc.weight": r(2 * width, width),
            f"{prefix}mlp.c_fc.bias": r(2 * width),
            f"{prefix}mlp.c_proj.weight": r(width, 2 * width),
            f"{prefix}mlp.c_proj.bias": r(width),
        }

    state = {
        "token_embedding.weight": r(vocab, width),
        "positional_embedding": r(context, width),
        "ln_final.weight": 1 + r(width),
        "ln_final.bias": r(width),
        "text_projection": r(width, embed),
        "logit_scale": torch.tensor(4.6),
        "visual.conv1.weight": r(width, 3, patch, patch),
        "visual.class_embedding": r(width),
        "visual.positional_embedding": r(grid * grid + 1, width),
        "visual.ln_pre.weight": 1 + r(width),
        "visual.ln_pre.bias": r(width),
        "visual.ln_post.weight": 1 + r(width),
        "visual.ln_post.bias": r(width),
        "visual.proj": r(width, embed),
    }
    for i in range(layers):
        state.update(block(f"transformer.resblocks.{i}."))
        state.update(block(f"visual.transformer.resblocks.{i}."))
    return state


def openclip_forward(state, pixels, ids, heads):
    """OpenAI/open_clip CLIP written out with torch's MultiheadAttention, which takes the fused
    in_proj layout as is: an implementation independent of the conversion."""
    width = state["token_embedding.weight"].shape[1]

    def ln(x, name):
        return F.layer_norm(x, (width,), state[f"{name}.weight"], state[f"{name}.bias"])

    def tower(x, prefix, mask=None):
        layers = len({k.split(".")[len(prefix.split(".")) - 1] for k in state if k.startswith(prefix)})
        for i in range(layers):
            p = f"{prefix}{i}."
            attn = nn.MultiheadAttention(width, heads, batch_first=True)
            attn.load_state_dict(
                {k[len(p + "attn.") :]: v for k, v in state.items() if k.startswith(p + "attn.")}
            )
            h = ln(x, p + "ln_1")
            x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
            h = F.gelu(F.linear(ln(x, p + "ln_2"), state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"]))
            x = x + F.linear(h, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
        return x

    patch = state["visual.conv1.weight"].shape[-1]
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([state["visual.class_embedding"].expand(x.shape[0], 1, width), x], 1)
    x = ln(x + state["visual.positional_embedding"], "visual.ln_pre")
    image = ln(tower(x, "visual.transformer.resblocks.")[:, 0], "visual.ln_post") @ state["visual.proj"]
    length = ids.shape[1]
    causal = torch.full((length, length), float("-inf")).triu(1)
    x = state["token_embedding.weight"][ids] + state["positional_embedding"][:length]
    x = ln(tower(x, "transformer.resblocks.", causal), "ln_final")
    text = x[torch.arange(ids.shape[0]), ids.argmax(-1)] @ state["text_projection"]
    return image, text


def test_openclip_conversion_matches_an_independent_forward_of_the_original_layout():
    from transformers import CLIPModel

    state = random_openclip_state()
    config, converted = openclip_to_clip(state, vision_head_width=8, text_head_width=8)
    model = CLIPModel(config).eval()
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[28, 5, 7, 29, 0, 0], [28, 3, 29, 0, 0, 0]])  # bos .. eos (the largest id), 0-padded
    with torch.no_grad():
        image, text = openclip_forward(state, pixels, ids, heads=4)
        hf_image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        hf_text = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    torch.testing.assert_close(hf_image, image, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hf_text, text, rtol=1e-4, atol=1e-4)


def test_a_converted_hpsv2_checkpoint_is_a_folder_the_hpsv2_scorer_loads(tmp_path):
    tokenizer = write_clip_tokenizer(tmp_path / "tok", WORDS)
    state = random_openclip_state(vocab=len(tokenizer))
    torch.save({"state_dict": state}, tmp_path / "HPS_v2.1_compressed.pt")  # the release wraps its weights
    out = convert_hpsv2(
        tmp_path / "HPS_v2.1_compressed.pt",
        tmp_path / "tok",
        tmp_path / "hps",
        vision_head_width=8,
        text_head_width=8,
    )
    scorer = build_scorer("hpsv2", ScorersConfig(hpsv2=ClipFolder(str(out))))
    images = random_images(2, seed=4, size=(32, 32))
    prompts = ["a red circle", "a cat on the left"]
    ids = tokenizer(prompts, padding="max_length", max_length=16).input_ids
    pixels = scorer.embedder.processor.image_processor(
        images=[Image.fromarray(i) for i in images], return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        image, text = openclip_forward(state, pixels, torch.tensor(ids), heads=4)
    expected = F.cosine_similarity(image, text)
    torch.testing.assert_close(scorer.score(images, prompts), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ScorerError, match="tokens but the checkpoint's text tower has"):
        write_clip_tokenizer(tmp_path / "small", WORDS[:3])
        convert_hpsv2(
            tmp_path / "HPS_v2.1_compressed.pt",
            tmp_path / "small",
            tmp_path / "bad",
            vision_head_width=8,
            text_head_width=8,
        )


BLIP_RENAMES_BACK = [  # transformers' BLIP names -> the ImageReward release's names
    ("vision_model.embeddings.class_embedding", "blip.visual_encoder.cls_token"),
    ("vision_model.embeddings.position_embedding", "blip.visual_encoder.pos_embed"),
    ("vision_model.embeddings.patch_embedding.", "blip.visual_encoder.patch_embed.proj."),
    ("vision_model.post_layernorm.", "blip.visual_encoder.norm."),
    ("vision_model.encoder.layers.", "blip.visual_encoder.blocks."),
    (".layer_norm1.", ".norm1."),
    (".layer_norm2.", ".norm2."),
    (".self_attn.qkv.", ".attn.qkv."),
    (".self_attn.projection.", ".attn.proj."),
    ("text_encoder.", "blip.text_encoder."),
    ("head.layers.", "mlp.layers."),
]


def test_a_converted_imagereward_checkpoint_scores_as_the_model_it_came_from(tmp_path):
    from transformers import BertTokenizer, BlipConfig

    from vipo.engine.eval.scoring.base import LinearStack
    from vipo.engine.eval.scoring.imagereward import (
        CLIP_MEAN,
        CLIP_STD,
        REWARD_MEAN,
        REWARD_STD,
        ImageRewardModel,
        preprocess,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(specials + WORDS) + "\n")
    BertTokenizer(str(tmp_path / "bert" / "vocab.txt")).save_pretrained(tmp_path / "bert")
    vocab = len(specials) + len(WORDS) + 2  # + BLIP's [DEC] and [ENC]
    config = BlipConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            layer_norm_eps=1e-6,
        ),
        text_config=dict(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=40,
            bos_token_id=vocab - 2,
            sep_token_id=3,
        ),
    )
    torch.manual_seed(2)
    head = LinearStack([(32, 8), (8, 4), (4, 1)], [0, 2, 4])
    original = ImageRewardModel(config, head).eval()
    released = {}
    for key, value in original.state_dict().items():
        if key.endswith("position_ids"):
            continue
        for new, old in BLIP_RENAMES_BACK:
            key = key.replace(new, old)
        released[key] = value
    released["blip.vision_proj.weight"] = torch.zeros(4, 32)  # in the release, unused for scoring
    torch.save(released, tmp_path / "ImageReward.pt")
    out = convert_imagereward(tmp_path / "ImageReward.pt", tmp_path / "bert", tmp_path / "ir", head_width=8)
    scorer = build_scorer(
        "imagereward", ScorersConfig(imagereward=type(ScorersConfig().imagereward)(str(out)))
    )
    images = random_images(3, seed=5, size=(40, 36))
    prompts = ["a red circle", "a blue square on the left", "a cat"]
    tokens = scorer.tokenizer(
        prompts, padding="max_length", max_length=35, truncation=True, return_tensors="pt"
    )
    assert (tokens.input_ids[:, 0] == 2).all()  # [CLS] first: its state is what the head reads
    with torch.no_grad():
        raw = original(
            preprocess([Image.fromarray(i) for i in images], 32), tokens.input_ids, tokens.attention_mask
        )
    scores = scorer.score(images, prompts)
    torch.testing.assert_close(scores, (raw - REWARD_MEAN) / REWARD_STD, rtol=1e-4, atol=1e-5)
    assert scorer.score(images[:1], ["a cat"]) != scorer.score(
        images[:1], ["a red circle"]
    )  # cross-attends text
    assert scorer.gain == "absolute"
    grey = preprocess([Image.new("RGB", (40, 20), (51, 102, 153))], 32)  # shorter side -> 32, centre crop
    assert grey.shape == (1, 3, 32, 32)
    torch.testing.assert_close(
        grey[0, :, 5, 7], (torch.tensor([0.2, 0.4, 0.6]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    )


# ---------------------------------------------------------------------------------------------
# The eval table


def test_table_gains_are_relative_percent_or_absolute_difference_as_in_table_2():
    per_prompt = {
        "sd15": {"pickscore": [20.0, 21.0], "imagereward": [0.0, 0.2], "clip": [0.0, 0.0]},
        "poly": {"pickscore": [21.0, 22.05], "imagereward": [0.5, 0.7], "clip": [1.0, 1.0]},
    }
    gains = {"pickscore": "relative", "imagereward": "absolute", "clip": "relative"}
    table = summarize(per_prompt, gains, base="sd15")
    base, poly = table["models"]
    assert base["model"] == "sd15" and "gain" not in base
    assert poly["mean"]["pickscore"] == pytest.approx(21.525)
    assert poly["gain"]["pickscore"] == pytest.approx(100 * (21.525 - 20.5) / 20.5)
    assert poly["gain"]["imagereward"] == pytest.approx(0.5)
    assert poly["gain"]["clip"] is None  # a base of 0 has no relative gain
    markdown = to_markdown(table)
    assert "| sd15 (base) | 2 | 20.5 | 0.1 | 0 |" in markdown
    assert "21.52 (+5.0%)" in markdown and "0.6 (+0.500)" in markdown and "1 (n/a)" in markdown
    with pytest.raises(ValueError, match="base 'sdxl' is not among"):
        summarize(per_prompt, gains, base="sdxl")


def write_samples(folder, prompts, colour, n=2):
    folder.mkdir(parents=True)
    rows = []
    for p, prompt in enumerate(prompts):
        for i in range(n):
            shade = np.clip(np.array(colour) + 20 * i, 0, 255).astype(np.uint8)
            Image.fromarray(np.broadcast_to(shade, (20, 20, 3)).copy()).save(folder / f"{p}_{i}.png")
            rows.append({"prompt_index": p, "prompt": prompt, "sample": i, "seed": i, "file": f"{p}_{i}.png"})
    (folder / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_vipo_eval_writes_per_prompt_scores_and_the_table(tmp_path, clip_dir, aesthetic_head):
    config = tmp_path / "scorers.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "clip": {"path": str(clip_dir)},
                "aesthetic": {"clip": str(clip_dir), "head": str(aesthetic_head[0])},
            }
        )
    )
    prompts = ["a red circle", "a blue square"]
    write_samples(tmp_path / "base", prompts, (90, 90, 90))
    write_samples(tmp_path / "poly", prompts, (200, 40, 40))
    code = main(
        [
            "eval",
            str(tmp_path / "poly"),
            "--base",
            str(tmp_path / "base"),
            "--scorers",
            "clip,aesthetic",
            "--scorers-config",
            str(config),
            "--out",
            str(tmp_path / "eval"),
            "-q",
        ]
    )
    assert code == 0
    table = json.loads((tmp_path / "eval" / "table.json").read_text())
    assert [m["model"] for m in table["models"]] == ["base", "poly"] and table["metrics"] == [
        "clip",
        "aesthetic",
    ]
    scorers = build_scorers("clip,aesthetic", load_scorers_config(config))
    means = {}
    for model in ("base", "poly"):  # mean over prompts of the mean over each prompt's 2 images
        images = [Image.open(tmp_path / model / f"{p}_{i}.png") for p in range(2) for i in range(2)]
        texts = [prompts[p] for p in range(2) for _ in range(2)]
        means[model] = {
            name: s.score(images, texts).view(2, 2).mean(1).mean().item() for name, s in scorers.items()
        }
    for row in table["models"]:
        for metric in ("clip", "aesthetic"):
            assert row["mean"][metric] == pytest.approx(means[row["model"]][metric], rel=1e-5, abs=1e-5)
    poly = table["models"][1]
    base_clip = means["base"]["clip"]
    assert poly["gain"]["clip"] == pytest.approx(
        100 * (means["poly"]["clip"] - base_clip) / abs(base_clip), rel=1e-4
    )
    per_prompt = [json.loads(line) for line in (tmp_path / "eval" / "scores.jsonl").read_text().splitlines()]
    assert len(per_prompt) == 4 and {r["images"] for r in per_prompt} == {2}
    assert "| base (base) | 2 |" in (tmp_path / "eval" / "table.md").read_text()


def test_vipo_eval_names_a_missing_sample_file(tmp_path, clip_dir, capsys):
    config = tmp_path / "scorers.yaml"
    config.write_text(yaml.safe_dump({"clip": {"path": str(clip_dir)}}))
    write_samples(tmp_path / "run", ["a cat"], (10, 10, 10))
    (tmp_path / "run" / "0_1.png").unlink()
    assert (
        main(
            [
                "eval",
                str(tmp_path / "run"),
                "--scorers",
                "clip",
                "--scorers-config",
                str(config),
                "--out",
                str(tmp_path / "eval"),
                "-q",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "vipo: error: sample file not found" in err and "0_1.png" in err


# ---------------------------------------------------------------------------------------------
# Agreement and the alpha regime


def test_agreement_fractions_match_a_hand_count():
    # 4 pairs, 3 scorers; margins (winner - loser):
    #   pair 0: +, +, +   all agree with the label
    #   pair 1: -, -, -   all agree with each other, against the label
    #   pair 2: +, -, +   no consensus
    #   pair 3: +, 0, +   a tie: not agreement, half a point of accuracy
    winners = {
        "a": torch.tensor([2.0, 0.0, 3.0, 1.0]),
        "b": torch.tensor([5.0, 1.0, 0.0, 2.0]),
        "c": torch.tensor([1.0, 0.0, 1.0, 4.0]),
    }
    losers = {
        "a": torch.tensor([1.0, 1.0, 0.0, 0.0]),
        "b": torch.tensor([4.0, 2.0, 1.0, 2.0]),
        "c": torch.tensor([0.0, 3.0, 0.0, 0.0]),
    }
    stats = agreement(winners, losers)
    assert stats.pairs == 4
    assert stats.label_accuracy == {"a": 0.75, "b": 0.375, "c": 0.75}
    assert stats.all_agree_label == 0.25 and stats.all_agree_each == 0.5


class ColourOracle(Scorer):
    """Scores how close an image's non-grey pixels are to the colour its prompt names: a scorer
    that sees exactly the attribute a `colour` pair's label is about."""

    name = "colour"

    def __init__(self):
        super().__init__(torch.device("cpu"), batch_size=8)

    def score_images(self, images, prompts):
        out = []
        for image, prompt in zip(images, prompts, strict=True):
            pixels = np.asarray(image).reshape(-1, 3).astype(float)
            shape = pixels[np.abs(pixels - 128).sum(1) > 0]
            target = next(np.array(rgb) for name, rgb in COLOURS.items() if name in prompt.split())
            out.append(-np.abs(shape.mean(0) - target).sum())
        return torch.tensor(out)


def test_a_scorer_that_sees_the_label_reaches_accuracy_one_and_flipped_labels_cost_exactly_their_share():
    clean = ProceduralPairs(96, 16, "clean", seed=3)
    colour_pairs = [i for i in range(len(clean)) if clean[i].category == "colour"]
    assert len(colour_pairs) >= 10

    class Subset:
        def __init__(self, source):
            self.source, self.skipped = source, 0

        def __len__(self):
            return len(colour_pairs)

        def get(self, index):
            record = self.source[colour_pairs[index]]
            return record.prompt, record.winner, record.loser

    result = pair_agreement(Subset(clean), {"colour": ColourOracle()}, progress=False)
    assert result["stats"].label_accuracy["colour"] == 1.0 and result["stats"].all_agree_label == 1.0
    noisy = ProceduralPairs(96, 16, "noisy", flip_prob=0.3, seed=3)
    flipped = np.mean([not np.array_equal(noisy[i].winner, clean[i].winner) for i in colour_pairs])
    assert 0 < flipped < 1
    result = pair_agreement(Subset(noisy), {"colour": ColourOracle()}, progress=False)
    assert result["stats"].label_accuracy["colour"] == pytest.approx(1 - flipped)


def test_suggest_alpha_reads_noisy_clean_and_over_simple_data_by_its_stated_rule():
    g = torch.Generator().manual_seed(0)
    pairs = 400

    def scores(signal, noise):
        label = torch.ones(pairs)
        winners = {f"s{k}": signal * label + noise * torch.randn(pairs, generator=g) for k in range(5)}
        losers = {f"s{k}": noise * torch.randn(pairs, generator=g) for k in range(5)}
        return suggest_alpha(agreement(winners, losers))

    noisy, clean, simple = scores(0.1, 1.0), scores(1.5, 0.4), scores(20.0, 1.0)
    assert noisy["regime"] == "noisy" and noisy["alpha"].startswith("alpha > 0")
    assert clean["regime"] == "clean" and clean["alpha"].startswith("alpha = 0")
    assert simple["regime"] == "over-simple" and simple["alpha"].startswith("alpha in [-1, 0)")
    assert "p under the reference model is 1/2" in clean["rule"]


def test_data_agreement_cli_reports_figures_consistent_with_its_pair_scores(tmp_path, clip_dir, capsys):
    config = tmp_path / "scorers.yaml"
    config.write_text(yaml.safe_dump({"pickscore": {"path": str(clip_dir)}, "clip": {"path": str(clip_dir)}}))
    code = main(
        [
            "data",
            "agreement",
            "procedural:shuffled",
            "--scorers",
            "pickscore,clip",
            "--scorers-config",
            str(config),
            "--pairs",
            "6",
            "--resolution",
            "32",
            "--suggest-alpha",
            "--out",
            str(tmp_path / "a"),
            "-q",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "all scorers agree with each other" in out and "suggested:" in out and "rule:" in out
    report = json.loads((tmp_path / "a" / "agreement.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "a" / "pair_scores.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and report["pairs"] == 6
    recomputed = agreement(
        {n: torch.tensor([r[n][0] for r in rows]) for n in ("pickscore", "clip")},
        {n: torch.tensor([r[n][1] for r in rows]) for n in ("pickscore", "clip")},
    )
    assert report["label_accuracy"] == pytest.approx(recomputed.label_accuracy)
    assert report["all_agree_each"] == pytest.approx(recomputed.all_agree_each)
    # pickscore is logit_scale * cos and clip is 100 * cos of the same model: same ranking always
    same_sign = [
        np.sign(r["pickscore"][0] - r["pickscore"][1]) == np.sign(r["clip"][0] - r["clip"][1]) for r in rows
    ]
    assert all(same_sign) and report["all_agree_each"] == 1.0


def test_a_manifest_source_counts_its_missing_images_as_skips(tmp_path, clip_dir):
    rng = np.random.default_rng(0)
    lines = []
    for k in range(3):
        for side in ("w", "l"):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                tmp_path / f"{k}{side}.png"
            )
        lines.append({"prompt": "a cat", "winner": f"{k}w.png", "loser": f"{k}l.png"})
    (tmp_path / "1l.png").unlink()
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    source = open_pairs(str(tmp_path / "pairs.jsonl"))
    result = pair_agreement(source, {"clip": build_scorer("clip", clip_config(clip_dir))}, progress=False)
    assert result["stats"].pairs == 2 and result["stats"].skipped == 1
    assert [row["index"] for row in result["rows"]] == [0, 2]
