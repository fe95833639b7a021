"""`vipo export`: a trained run becomes a diffusers folder that loads and predicts as it trained."""

import pytest
import torch

from vipo.engine.cli import main
from vipo.engine.config import load_config
from vipo.engine.errors import RunError
from vipo.engine.export import export_run, load_trained
from vipo.engine.trainer import Trainer

from vipo_testing import assert_close, make_sd15_folder


def train_tiny(out_dir, *overrides):
    cfg = load_config(
        None,
        [
            "data.num_pairs=8",
            "data.resolution=16",
            "train.batch_pairs=2",
            "train.max_steps=2",
            "optim.lr=1e-3",
            "loss.beta=500",
            f"train.output_dir={out_dir}",
            *overrides,
        ],
    )
    trainer = Trainer(cfg, progress=False)
    trainer.train()
    return trainer


def unet_output(unet, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=gen)
    cond = torch.randn(2, 5, c.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=cond).sample


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    return make_sd15_folder(tmp_path_factory.mktemp("models") / "tiny-sd15")


def test_a_lora_run_on_a_diffusers_folder_exports_a_pipeline_with_the_lora_merged(tmp_path, sd15_folder):
    from diffusers import StableDiffusionPipeline

    trainer = train_tiny(
        tmp_path / "run", f"model.path={sd15_folder}", "model.lora_rank=4", "reference.mode=adapter"
    )
    trained = unet_output(trainer.adapter.network)
    out = export_run(tmp_path / "run", tmp_path / "export")
    pipeline = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert not any("lora" in name for name, _ in pipeline.unet.named_parameters())
    assert_close(unet_output(pipeline.unet), trained, atol=1e-5, name="merged unet")
    original = StableDiffusionPipeline.from_pretrained(sd15_folder, safety_checker=None)
    assert (unet_output(original.unet) - trained).abs().max() > 1e-4  # the LoRA did train something
    for part in ("text_encoder", "vae", "tokenizer", "scheduler", "model_index.json"):
        assert (out / part).exists(), part


def test_a_full_fine_tune_exports_exactly_the_trained_weights(tmp_path):
    from diffusers import UNet2DConditionModel

    trainer = train_tiny(tmp_path / "run", "model.config=sd15-tiny")
    out = export_run(tmp_path / "run", tmp_path / "export")
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    trained = trainer.adapter.network.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in unet.state_dict().items())
    assert not (out / "text_encoder").exists()  # random-weight build: only the denoiser is real output


def test_lora_only_export_loads_back_onto_the_base_model(tmp_path):
    train_tiny(tmp_path / "run", "model.lora_rank=4", "reference.mode=adapter")
    out = export_run(tmp_path / "run", tmp_path / "lora", lora_only=True)
    adapter, _ = load_trained(tmp_path / "run" / "checkpoints" / "step-000002")
    expected = unet_output(adapter.network)
    torch.manual_seed(0)  # the run's seed: the same random base weights
    from vipo.engine.models import build_model

    base = build_model(load_config(None, ["model.config=sd15-tiny"]).model, torch.device("cpu")).network
    base.load_lora_adapter(out / "pytorch_lora_weights.safetensors", prefix="unet", adapter_name="default")
    assert "default" in base.peft_config
    assert_close(unet_output(base), expected, atol=1e-5, name="base + exported lora")


def test_export_errors_name_the_problem(tmp_path, capsys):
    train_tiny(tmp_path / "run", "model.config=sd15-tiny")
    with pytest.raises(RunError, match=r"no checkpoint at step 7 \(found: step-000002\)"):
        export_run(tmp_path / "run", tmp_path / "a", step=7)
    with pytest.raises(RunError, match="there is no LoRA"):
        export_run(tmp_path / "run", tmp_path / "b", lora_only=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(RunError, match="not empty"):
        export_run(tmp_path / "run", tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c")]) == 1
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.parametrize(
    "part, damage",
    [("tokenizer/tokenizer.json", b"{broken"), ("text_encoder/config.json", b"not json"), ("unet", None)],
)
def test_a_diffusers_folder_with_a_damaged_part_is_one_error_naming_that_part(
    tmp_path, sd15_folder, part, damage
):
    import shutil

    from vipo.engine.models import build_model

    root = tmp_path / "model"
    shutil.copytree(sd15_folder, root)
    target = root / part
    if damage is None:  # the weights file of a part gone
        for weights in target.glob("*.safetensors"):
            weights.unlink()
    else:
        target.write_bytes(damage)
    cfg = load_config(None, [f"model.path={root}", "data.resolution=16"])
    with pytest.raises(
        RunError,
        match=rf"{root / part.split('/')[0]}: \w+ could not load it \(\w+(Error)?: .*\); model.path must be a complete diffusers folder",
    ):
        build_model(cfg.model, torch.device("cpu"))
