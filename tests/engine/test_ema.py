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
    ],
)
def test_bad_ema_settings_are_refused_by_name(tmp_path, overrides, words):
    with pytest.raises(ConfigError, match=words):
        tiny(tmp_path, *overrides)


ZERO_BF16 = r"""
import json, os, sys
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
strategy = sys.argv[3]
import torch
from deepspeed.utils import safe_get_full_fp32_param
from vipo.engine import ema as ema_module
from vipo.engine.config import load_config
from vipo.engine.trainer import Trainer

masters, modules = [], []
update = ema_module.PolicyEMA.update


def recording(self):
    masters.append([safe_get_full_fp32_param(p).clone() for p in self.params])
    if strategy == "zero2":  # zero3's module weights are partitioned away between forwards
        modules.append([p.detach().float().clone() for p in self.params])
    update(self)


ema_module.PolicyEMA.update = recording
overrides = ["model.config=sd15-tiny", "data.num_pairs=16", "data.resolution=16", "train.batch_pairs=2",
             "train.max_steps=3", "train.checkpoint_every_steps=0", "loss.beta=500", "optim.lr=1e-4",
             "train.ema_decay=0.7", f"parallel.strategy={strategy}", "train.mixed_precision=bf16",
             f"train.output_dir={sys.argv[1]}"]
with Trainer(load_config(None, overrides), progress=False) as trainer:
    first = [safe_get_full_fp32_param(p).clone() for p in trainer.ema.params]
    trainer.train()
    saved = trainer.ema.state_dict()
    dtypes = sorted({str(getattr(p, "ds_tensor", p).dtype) for p in trainer.ema.params})
    names = trainer.ema.names


def ema(trajectory):
    shadow = [t.clone() for t in first]
    for step in trajectory:
        torch._foreach_lerp_(shadow, step, 1 - 0.7)
    return shadow


def off(expected):
    return max((saved[n] - e.view_as(saved[n])).abs().max().item() for n, e in zip(names, expected))


print(json.dumps({"dtypes": dtypes, "steps": len(masters), "off_master": off(ema(masters)),
                  "off_module": off(ema(modules)) if modules else None}))
"""


# zero3 in bf16 (its fp32 partitions, get_local_fp32_param) passed the same check when run by hand
# (strategy="zero3"); left out of CI for time: ZeRO-3's EMA layout is checked by the 2-rank test.
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero2"])
def test_under_bf16_zero_the_ema_follows_the_fp32_master_not_the_bf16_weights(tmp_path, strategy):
    """DeepSpeed's bf16 mode trains bf16 module weights from an fp32 master copy: the shadow is
    the running lerp of the master (DeepSpeed's own safe_get_full_fp32_param), not of the bf16
    copies, whose rounding an lr-sized update falls under."""
    import json
    import os
    import socket
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", ZERO_BF16, str(tmp_path / "run"), port, strategy],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["dtypes"] == ["torch.bfloat16"] and found["steps"] == 3
    assert found["off_master"] < 1e-6  # the lerp of the fp32 master, exactly up to float32 rounding
    if strategy == "zero2":
        assert found["off_module"] > 100 * max(found["off_master"], 1e-7)  # not that of the bf16 weights
