"""`vipo sample`: trained runs (full and LoRA) and diffusers folders, seeded per image."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vipo.engine.cli import main
from vipo.engine.config import load_config
from vipo.engine.errors import RunError
from vipo.engine.eval.sample import latent_shape, read_prompts, sample, write_video
from vipo.engine.eval.sampling import ddim_sample
from vipo.engine.trainer import Trainer

from vipo_testing import write_clip_tokenizer

PROMPTS = ["a red circle on the left", "a blue square on the top"]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models are too small to gain from a second thread, and on a busy 2-core machine
    two threads a process made these tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_tiny(out, *overrides):
    cfg = load_config(
        None,
        [
            "model.config=sd15-tiny",
            "data.num_pairs=8",
            "data.resolution=16",
            "train.batch_pairs=1",
            "train.max_steps=1",
            "train.log_every_steps=1",
            "loss.beta=500",
            "optim.lr=1e-2",
            f"train.output_dir={out}",
            *overrides,
        ],
    )
    trainer = Trainer(cfg, progress=False)
    trainer.train()
    return trainer


def prompt_file(tmp_path, prompts=PROMPTS):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n\n", encoding="utf-8")
    return path


def read_index(folder):
    return [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines()]


def pixels(folder, row):
    return np.asarray(Image.open(folder / row["file"]))


def test_a_run_samples_with_its_trained_weights_one_seed_per_image(tmp_path):
    trainer = train_tiny(tmp_path / "run")
    prompts = prompt_file(tmp_path)
    summary = sample(tmp_path / "run", prompts, tmp_path / "a", n=2, seed=5, steps=3, batch=3, progress=False)
    rows = read_index(tmp_path / "a")
    assert summary["files"] == 4 and [r["seed"] for r in rows] == [5, 6, 7, 8]
    assert [(r["prompt_index"], r["sample"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    adapter = trainer.adapter
    shape = latent_shape(adapter, 16)
    for row in rows:  # each file is DDIM of the trained network with the seed index.jsonl names
        expected = ddim_sample(adapter, adapter.network, [row["prompt"]], shape, steps=3, seed=row["seed"])[0]
        assert np.array_equal(pixels(tmp_path / "a", row), expected)
    # The trained weights were loaded: the untrained model draws other images from the same seed.
    fresh = Trainer(
        load_config(
            None,
            [
                "model.config=sd15-tiny",
                "data.num_pairs=8",
                "data.resolution=16",
                f"train.output_dir={tmp_path / 'fresh'}",
            ],
        ),
        progress=False,
    )
    untrained = ddim_sample(
        fresh.adapter, fresh.adapter.network, [rows[0]["prompt"]], shape, steps=3, seed=5
    )[0]
    assert not np.array_equal(pixels(tmp_path / "a", rows[0]), untrained)
    # Same seed -> the same files; another seed -> other images.
    sample(tmp_path / "run", prompts, tmp_path / "b", n=2, seed=5, steps=3, batch=1, progress=False)
    sample(tmp_path / "run", prompts, tmp_path / "c", n=2, seed=6, steps=3, batch=4, progress=False)
    again, other = read_index(tmp_path / "b"), read_index(tmp_path / "c")
    assert all(
        np.array_equal(pixels(tmp_path / "a", r), pixels(tmp_path / "b", s))
        for r, s in zip(rows, again, strict=True)
    )
    assert not np.array_equal(pixels(tmp_path / "a", rows[0]), pixels(tmp_path / "c", other[0]))
    assert np.array_equal(pixels(tmp_path / "a", rows[1]), pixels(tmp_path / "c", other[0]))  # both seed 6


def test_a_lora_run_is_rebuilt_with_its_adapters(tmp_path):
    trainer = train_tiny(tmp_path / "run", "model.lora_rank=4", "reference.mode=adapter")
    saved = tmp_path / "run" / "checkpoints" / "step-000001"
    sample(saved, prompt_file(tmp_path, PROMPTS[:1]), tmp_path / "out", n=1, steps=3, progress=False)
    row = read_index(tmp_path / "out")[0]
    adapter = trainer.adapter
    expected = ddim_sample(
        adapter, adapter.network, [row["prompt"]], latent_shape(adapter, 16), steps=3, seed=0
    )[0]
    assert np.array_equal(pixels(tmp_path / "out", row), expected)
    adapter.network.disable_adapters()  # without the LoRA weights the image differs
    base = ddim_sample(adapter, adapter.network, [row["prompt"]], latent_shape(adapter, 16), steps=3, seed=0)[
        0
    ]
    assert not np.array_equal(pixels(tmp_path / "out", row), base)


def test_a_flow_matching_run_samples_by_euler_steps_independent_of_batching(tmp_path):
    train_tiny(tmp_path / "run", "model.family=sd3", "model.config=sd3-tiny")
    prompts = prompt_file(tmp_path)
    assert (
        main(
            [
                "sample",
                str(tmp_path / "run"),
                "--prompts",
                str(prompts),
                "--out",
                str(tmp_path / "one"),
                "--n",
                "2",
                "--steps",
                "4",
                "--batch",
                "1",
                "-q",
            ]
        )
        == 0
    )
    sample(tmp_path / "run", prompts, tmp_path / "all", n=2, steps=4, batch=4, progress=False)
    one, batched = read_index(tmp_path / "one"), read_index(tmp_path / "all")
    images = [pixels(tmp_path / "one", r).astype(int) for r in one]
    assert images[0].shape == (16, 16, 3) and not np.array_equal(images[0], images[1])
    for image, row in zip(images, batched, strict=True):  # same seeds, other batches: same pixels
        assert np.abs(image - pixels(tmp_path / "all", row)).max() <= 1


def tiny_sd_pipeline(folder, tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = write_clip_tokenizer(tmp_path / "tok", " ".join(PROMPTS).split())
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        layers_per_block=1,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            max_position_embeddings=tokenizer.model_max_length,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)


def test_a_diffusers_folder_samples_through_its_pipeline_seeded_per_image(tmp_path):
    tiny_sd_pipeline(tmp_path / "sd", tmp_path)
    prompts = prompt_file(tmp_path)
    options = {"n": 2, "steps": 2, "height": 16, "width": 16, "progress": False}
    summary = sample(tmp_path / "sd", prompts, tmp_path / "a", batch=4, **options)
    sample(tmp_path / "sd", prompts, tmp_path / "b", batch=1, **options)
    assert summary["family"] == "sd15" and summary["kind"] == "diffusers"
    a, b = read_index(tmp_path / "a"), read_index(tmp_path / "b")
    first = [pixels(tmp_path / "a", r).astype(int) for r in a]
    assert first[0].shape == (16, 16, 3) and not np.array_equal(first[0], first[1])
    for image, row in zip(first, b, strict=True):
        assert np.abs(image - pixels(tmp_path / "b", row)).max() <= 1


def test_a_lora_run_on_a_real_model_folder_samples_through_the_pipeline_with_its_adapters(tmp_path):
    from diffusers import StableDiffusionPipeline

    tiny_sd_pipeline(tmp_path / "sd", tmp_path)
    trainer = train_tiny(
        tmp_path / "run", f"model.path={tmp_path / 'sd'}", "model.lora_rank=2", "reference.mode=adapter"
    )
    options = {"height": 16, "width": 16, "num_inference_steps": 2, "output_type": "np"}
    sample(
        tmp_path / "run",
        prompt_file(tmp_path, PROMPTS[:1]),
        tmp_path / "out",
        n=1,
        steps=2,
        height=16,
        width=16,
        progress=False,
    )
    written = pixels(tmp_path / "out", read_index(tmp_path / "out")[0]).astype(int)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", unet=trainer.adapter.network)
    trained = pipe(PROMPTS[:1], generator=[torch.Generator().manual_seed(0)], **options).images[0]
    assert np.abs(written - np.round(trained * 255)).max() <= 1
    base = StableDiffusionPipeline.from_pretrained(tmp_path / "sd")(
        PROMPTS[:1], generator=[torch.Generator().manual_seed(0)], **options
    ).images[0]
    assert np.abs(written - np.round(base * 255)).max() > 1  # the LoRA weights changed the image


def test_a_pipeline_a_folder_names_that_is_not_a_known_family_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text(json.dumps({"_class_name": ["my_code", "MyPipeline"]}))
    with pytest.raises(RunError, match="is not one of StableDiffusionPipeline"):
        sample(tmp_path / "m", prompt_file(tmp_path), tmp_path / "out", progress=False)


def test_bad_sources_and_prompt_files_are_clear_errors(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(RunError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red circle"}\n{"text": "x"}\n')
    with pytest.raises(RunError, match=r"item 2 has no \"prompt\""):
        read_prompts(tmp_path / "p.jsonl")
    assert (
        main(["sample", str(tmp_path), "--prompts", str(prompt_file(tmp_path)), "--out", str(tmp_path / "o")])
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("vipo: error:") and "not a run folder" in err


def test_videos_are_written_as_playable_files(tmp_path):
    import av

    frames = np.random.default_rng(0).integers(0, 255, (5, 16, 18, 3), dtype=np.uint8)
    path = write_video(frames, tmp_path / "clip", fps=8)
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 5 and decoded[0].shape == (16, 18, 3)
