"""What every model family must do alike: a DPO step trains the policy and nothing frozen, an
SFT step needs no reference, a model folder missing parts is named, and the real architecture
configs have the published sizes (counted on the meta device)."""

import pytest
import torch

from vipo.engine.errors import RunError
from vipo.engine.models import build_model, load_architecture
from vipo.engine.trainer import Trainer

from vipo_testing import changed, snapshot, stored_numel, tiny_family_config

FAMILIES = ["sdxl", "sd3", "flux", "wan"]
FROZEN = {  # the parts of each family that no step may change
    "sdxl": {"text_encoder", "text_encoder_2"},
    "sd3": {"text_encoder", "text_encoder_2", "text_encoder_3"},
    "flux": {"text_encoder", "text_encoder_2", "vae"},
    "wan": {"text_encoder", "vae"},
}
PREDICTION = {"sdxl": "epsilon", "sd3": "flow", "flux": "flow", "wan": "flow"}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_dpo_step_changes_the_policy_and_nothing_frozen(tmp_path, family):
    trainer = Trainer(tiny_family_config(tmp_path, family), progress=False)
    adapter = trainer.adapter
    assert (adapter.family, adapter.prediction_type) == (family, PREDICTION[family])
    frozen = {name: getattr(adapter, name) for name in FROZEN[family]}
    assert all(module is not None for module in frozen.values())
    before = {name: snapshot(module) for name, module in frozen.items()}
    policy_before, reference_before = snapshot(adapter.network), snapshot(trainer.reference.network)
    metrics = trainer.train_step()
    assert torch.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert changed(policy_before, adapter.network)
    assert not changed(reference_before, trainer.reference.network)
    for name, module in frozen.items():
        assert not changed(before[name], module), name
        assert not any(p.requires_grad for p in module.parameters()), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("winners_only", ["true", "false"])
def test_an_sft_step_trains_without_a_reference(tmp_path, family, winners_only):
    cfg = tiny_family_config(tmp_path, family, "loss.objective=sft", f"loss.winners_only={winners_only}")
    trainer = Trainer(cfg, progress=False)
    assert trainer.reference is None
    before = snapshot(trainer.adapter.network)
    summary = trainer.train()
    assert summary["loss_is_finite"] and changed(before, trainer.adapter.network)


@pytest.mark.parametrize(
    ("family", "present", "named"),
    [
        (
            "sdxl",
            ["unet", "tokenizer"],
            "missing text_encoder/, text_encoder_2/, tokenizer_2/, vae/, scheduler/",
        ),
        (
            "sd3",
            ["transformer", "text_encoder", "tokenizer", "vae"],
            "missing text_encoder_2/, text_encoder_3/, tokenizer_2/, tokenizer_3/, scheduler/",
        ),
        (
            "flux",
            ["transformer", "tokenizer", "vae"],
            "missing text_encoder/, text_encoder_2/, tokenizer_2/, scheduler/",
        ),
        ("wan", ["transformer", "vae"], "missing text_encoder/, tokenizer/, scheduler/"),
    ],
)
def test_a_model_path_without_the_family_subfolders_names_them(tmp_path, family, present, named):
    for name in present:
        (tmp_path / name).mkdir()
    cfg = tiny_family_config(tmp_path, family, f"model.path={tmp_path}")
    with pytest.raises(RunError, match=named):
        build_model(cfg.model, torch.device("cpu"))


def _part(kind: str, config: dict):
    """A component of a real architecture config, built on the current (meta) device."""
    import diffusers
    import transformers

    if kind in (
        "UNet2DConditionModel",
        "SD3Transformer2DModel",
        "FluxTransformer2DModel",
        "WanTransformer3DModel",
        "AutoencoderKL",
        "AutoencoderKLWan",
    ):
        return getattr(diffusers, kind)(**config)
    config_class = {
        "CLIPTextModel": "CLIPTextConfig",
        "CLIPTextModelWithProjection": "CLIPTextConfig",
        "T5EncoderModel": "T5Config",
        "UMT5EncoderModel": "UMT5Config",
    }[kind]
    return getattr(transformers, kind)(getattr(transformers, config_class)(**config))


# (architecture, its config key, class, (low, high) parameters around the published checkpoint)
PUBLISHED = [
    ("sdxl", "unet", "UNet2DConditionModel", (2.55e9, 2.58e9)),
    ("sdxl", "text_encoder", "CLIPTextModel", (1.22e8, 1.25e8)),
    ("sdxl", "text_encoder_2", "CLIPTextModelWithProjection", (6.9e8, 7.0e8)),
    ("sdxl", "vae", "AutoencoderKL", (8.3e7, 8.4e7)),
    ("sd3.5-medium", "transformer", "SD3Transformer2DModel", (2.4e9, 2.55e9)),
    ("sd3.5-medium", "text_encoder_3", "T5EncoderModel", (4.7e9, 4.8e9)),
    ("sd3.5-medium", "vae", "AutoencoderKL", (8.3e7, 8.4e7)),
    ("flux1-dev", "transformer", "FluxTransformer2DModel", (11.8e9, 12.0e9)),
    ("flux1-dev", "text_encoder", "CLIPTextModel", (1.22e8, 1.25e8)),
    ("flux1-dev", "text_encoder_2", "T5EncoderModel", (4.7e9, 4.8e9)),
    ("flux1-dev", "vae", "AutoencoderKL", (8.3e7, 8.4e7)),
    ("wan2.1-t2v-1.3b", "transformer", "WanTransformer3DModel", (1.3e9, 1.6e9)),
    ("wan2.1-t2v-1.3b", "text_encoder", "UMT5EncoderModel", (5.6e9, 5.8e9)),
    ("wan2.1-t2v-1.3b", "vae", "AutoencoderKLWan", (1.26e8, 1.28e8)),
    ("wan2.1-t2v-14b", "transformer", "WanTransformer3DModel", (14.2e9, 14.4e9)),
]


@pytest.mark.parametrize(
    ("arch", "key", "kind", "published"), PUBLISHED, ids=[f"{a}-{k}" for a, k, _, _ in PUBLISHED]
)
def test_real_configs_have_the_published_sizes(arch, key, kind, published):
    with torch.device("meta"):  # shapes only: no memory, no init time
        size = stored_numel(_part(kind, load_architecture(arch)[key]))
    low, high = published
    assert low <= size <= high, size
