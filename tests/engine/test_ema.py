"""train.ema_decay: an EMA of the trained weights, saved in checkpoints, resumed, exported."""

import pytest
import torch

from vipo.engine.config import ConfigError, load_config
from vipo.engine.errors import RunError
from vipo.engine.export import export_run
from vipo.engine.trainer import Trainer


def tiny(out_dir, *overrides):
    return load_config(
        None,
        [
            "model.config=sd15-tiny",
            "data.num_pairs=16",
            "data.resolution=16",
            "train.batch_pairs=2",
            "train.max_steps=4",
            "train.checkpoint_every_steps=2",
            "loss.beta=500",
            "optim.lr=1e-3",
            "train.ema_decay=0.7",
            f"train.output_dir={out_dir}",
            *overrides,
        ],
    )


def trained(network):
    return {n: p.detach().float().clone() for n, p in network.named_parameters() if p.requires_grad}


def test_the_ema_is_the_running_lerp_of_the_weights_after_each_update(tmp_path):
    trainer = Trainer(tiny(tmp_path), progress=False)
    expected = trained(trainer.adapter.network)
    for _ in range(3):
        trainer.train_step()
        for name, value in trained(trainer.adapter.network).items():
            expected[name] = expected[name] + 0.3 * (value - expected[name])
    ema = trainer.ema.state_dict()
    assert set(ema) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(ema[name], value, rtol=1e-6, atol=1e-7, msg=name)
    moved = trained(trainer.adapter.network)
    assert any(not torch.allclose(ema[n], moved[n]) for n in moved)  # it lags the weights


def test_the_ema_survives_a_resume_exactly_and_is_what_export_ema_writes(tmp_path):
    from diffusers import UNet2DConditionModel

    straight = Trainer(tiny(tmp_path / "straight"), progress=False)
    straight.train()
    Trainer(tiny(tmp_path / "split", "train.max_steps=2"), progress=False).train()
    resumed = Trainer(tiny(tmp_path / "split"), progress=False)
    resumed.train(resume=True)
    a, b = straight.ema.state_dict(), resumed.ema.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "split" / "checkpoints" / "step-000004" / "ema.safetensors").is_file()
    out = export_run(tmp_path / "split", tmp_path / "export", ema=True)
    unet = dict(UNet2DConditionModel.from_pretrained(out / "unet").named_parameters())
    assert all(torch.equal(unet[k].float(), b[k]) for k in b)
    plain = export_run(tmp_path / "split", tmp_path / "export-plain")
    weights = dict(UNet2DConditionModel.from_pretrained(plain / "unet").named_parameters())
    assert any(not torch.equal(weights[k].float(), b[k]) for k in b)


def test_export_ema_of_a_run_without_it_is_one_clear_error(tmp_path):
    Trainer(tiny(tmp_path / "run", "train.ema_decay=0", "train.max_steps=2"), progress=False).train()
    with pytest.raises(RunError, match="no ema.safetensors"):
        export_run(tmp_path / "run", tmp_path / "export", ema=True)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["train.ema_decay=1.0"], "train.ema_decay must be in"),
        (["train.ema_decay=-0.1"], "train.ema_decay must be in"),
        (["train.ema_decay=0.99", "parallel.strategy=zero2"], "train.ema_decay is built for"),
    ],
)
def test_bad_ema_settings_are_refused_by_name(tmp_path, overrides, words):
    with pytest.raises(ConfigError, match=words):
        tiny(tmp_path, *overrides)


@pytest.mark.slow
def test_the_ema_under_fsdp_is_sharded_resumed_and_exported_like_one_process(tmp_path):
    """2 FSDP ranks (stopped at step 2 and resumed) against one process: the EMA each writes and
    `vipo export --ema` reads is the same average, within the noise two ranks' rounding leaves."""
    from test_parallel import launch, one_thread, torchrun

    with one_thread():
        Trainer(tiny(tmp_path / "one", "optim.eps=1e-6"), progress=False).train()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: {config: sd15-tiny}\ndata: {num_pairs: 16, resolution: 16}\nloss: {beta: 500.0}\n"
        "optim: {lr: 1.0e-3, eps: 1.0e-6}\n"
        "train: {batch_pairs: 2, max_steps: 4, checkpoint_every_steps: 2, ema_decay: 0.7}\n"
    )
    run = tmp_path / "run"
    command = torchrun(
        "-m", "vipo.engine", "train", str(recipe), f"train.output_dir={run}", "parallel.strategy=fsdp"
    )
    launch([*command, "train.max_steps=2", "-q"], tmp_path)
    launch([*command, "--resume", "-q"], tmp_path)
    from safetensors.torch import load_file

    two = load_file(run / "checkpoints" / "step-000004" / "ema.safetensors")
    one = load_file(tmp_path / "one" / "checkpoints" / "step-000004" / "ema.safetensors")
    initial = trained(Trainer(tiny(tmp_path / "fresh"), progress=False).adapter.network)
    assert set(two) == set(one)
    flat = lambda state: torch.cat([state[k].flatten().double() for k in sorted(one)])  # noqa: E731
    moved = (flat(one) - flat(initial)).norm()
    assert moved > 0 and (flat(two) - flat(one)).norm() / moved < 0.02
    from diffusers import UNet2DConditionModel

    unet = dict(
        UNet2DConditionModel.from_pretrained(
            export_run(run, tmp_path / "export", ema=True) / "unet"
        ).named_parameters()
    )
    assert all(torch.equal(unet[k].float(), two[k]) for k in two)
