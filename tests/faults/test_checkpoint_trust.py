"""A run folder or a checkpoint from someone else never runs code: every vector through which a
crafted pickle reached `pickle.load` / `torch.load(weights_only=False)` is tried with a payload
that would create a file, and the file must not appear.

Vectors: DCP's `.metadata` (plain pickle.load in torch) and its non-tensor entries
(`DefaultLoadPlanner.load_bytes`), DeepSpeed's model and optimizer states (its checkpoint engine
and `zero_to_fp32`), our own optimizer.pt and config.yaml; each through `vipo train --resume`,
`vipo export` and `model.init_from`. The attacker controls the whole folder, so each crafted
checkpoint carries a manifest that matches it: the integrity check passes and the loaders
themselves must refuse.
"""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from vipo.engine.config import load_config, to_dict
from vipo.engine.integrity import write_manifest
from vipo.engine.safe_load import UntrustedCheckpoint, deepspeed_loads
from vipo.engine.trainer import Trainer

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRITON_INTERPRET": "1",
    "DS_ACCELERATOR": "cpu",
}


class Payload:
    """Unpickling this creates `marker`: the proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def tiny(out: Path, *overrides):
    return load_config(
        None,
        [
            "model.config=sd15-tiny",
            "data.num_pairs=16",
            "data.resolution=16",
            "train.batch_pairs=2",
            "train.max_steps=2",
            "train.log_every_steps=1",
            "loss.beta=500",
            "optim.lr=1e-4",
            f"train.output_dir={out}",
            *overrides,
        ],
    )


def crafted_checkpoint(run: Path, fmt: str, cfg, extra: dict | None = None) -> Path:
    """A checkpoints/step-000001 folder of format `fmt` with a valid state.json, config.yaml and
    a manifest that matches whatever else the test put in it."""
    folder = run / "checkpoints" / "step-000001"
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "step": 1,
        "format": fmt,
        "world_size": 1,
        "nonfinite_total": 0,
        "nonfinite_in_row": 0,
        "sampler": {},
        "manifest": "manifest.json",
        **(extra or {}),
    }
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    save_file({"noise_generator": torch.Generator().get_state()}, folder / "rng.safetensors")
    torch.save({"scheduler": {}}, folder / "scheduler.pt")
    write_manifest(folder)
    (run / "checkpoints" / "latest").write_text(folder.name)
    return folder


def dcp_metadata_payload(run: Path, cfg, marker: Path) -> Path:
    folder = crafted_checkpoint(run, "dcp", cfg)
    (folder / "dcp").mkdir()
    (folder / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    write_manifest(folder)
    return folder


def deepspeed_payload(run: Path, cfg, marker: Path) -> Path:
    folder = crafted_checkpoint(run, "deepspeed", cfg)
    states = folder / "deepspeed"
    states.mkdir()
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"module": {}, "payload": Payload(marker)}, states / name)
    write_manifest(folder)
    return folder


def vipo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vipo.engine", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_refused(proc: subprocess.CompletedProcess, marker: Path, *names: str) -> None:
    assert not marker.exists(), "the payload ran"
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("vipo: error:")]
    assert len(error) == 1 and "refused" in error[0] and all(n in error[0] for n in names), proc.stderr[
        -3000:
    ]


@pytest.mark.parametrize("vector", ["resume", "export", "init_from"])
def test_a_crafted_dcp_metadata_pickle_never_runs(tmp_path, vector):
    marker = tmp_path / "pwned"
    run = tmp_path / "foreign"
    cfg = tiny(run)
    folder = dcp_metadata_payload(run, cfg, marker)
    recipe = tmp_path / "recipe.yaml"
    if vector == "resume":
        recipe.write_text(yaml.safe_dump(to_dict(cfg)))
        proc = vipo("train", str(recipe), "--resume", "-q", cwd=tmp_path)
    elif vector == "export":
        proc = vipo("export", str(run), "--out", str(tmp_path / "exported"), cwd=tmp_path)
    else:
        mine = tiny(tmp_path / "mine", f"model.init_from={folder}")
        recipe.write_text(yaml.safe_dump(to_dict(mine)))
        proc = vipo("train", str(recipe), "-q", cwd=tmp_path)
    assert_refused(proc, marker, ".metadata", "pathlib.Path.touch")  # the file, and the global it asked for


@pytest.mark.parametrize("vector", ["export", "init_from"])
def test_crafted_deepspeed_states_never_run(tmp_path, vector):
    pytest.importorskip("deepspeed")
    marker = tmp_path / "pwned"
    run = tmp_path / "foreign"
    cfg = tiny(run)
    folder = deepspeed_payload(run, cfg, marker)
    if vector == "export":
        proc = vipo("export", str(run), "--out", str(tmp_path / "exported"), cwd=tmp_path)
    else:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(to_dict(tiny(tmp_path / "mine", f"model.init_from={folder}"))))
        proc = vipo("train", str(recipe), "-q", cwd=tmp_path)
    assert_refused(proc, marker, "_states.pt", "asks to load")  # torch.save pickles the payload via getattr


def test_deepspeeds_own_checkpoint_engine_loads_weights_only_inside_the_guard(tmp_path):
    """`vipo train --resume` under zero2/zero3 reads through DeepSpeed's engine, whose
    TorchCheckpointEngine.load calls torch.load(weights_only=False): the guard covers it, and a
    real ZeRO optimizer state (tensors, LossScaler, ZeroStageEnum, fragment_address) still loads."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    marker = tmp_path / "pwned"
    crafted = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": Payload(marker)}, crafted)
    genuine = tmp_path / "genuine.pt"
    state = {
        "loss_scaler": LossScaler(1.0),
        "zero_stage": ZeroStageEnum.gradients,
        "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
        "partition": torch.ones(4),
    }
    torch.save({"optimizer_state_dict": state}, genuine)
    engine = TorchCheckpointEngine()
    with deepspeed_loads():
        with pytest.raises(UntrustedCheckpoint, match="optim_states.pt: refused: it asks to load"):
            engine.load(str(crafted), map_location="cpu")
        loaded = engine.load(str(genuine), map_location="cpu")["optimizer_state_dict"]
    assert not marker.exists()
    assert loaded["zero_stage"] == ZeroStageEnum.gradients and torch.equal(loaded["partition"], torch.ones(4))
    assert torch.load is not None and torch.load.__name__ == "load"  # the guard is gone afterwards


def test_a_crafted_dcp_optimizer_entry_never_runs(tmp_path):
    """The second DCP vector: a non-tensor entry (an optimizer hyper-parameter), which torch's
    DefaultLoadPlanner reads with torch.load(weights_only=False), inside a real checkpoint."""
    import torch.distributed.checkpoint as dcp

    from vipo.engine.checkpoint import _dcp_state

    marker = tmp_path / "pwned"
    run = tmp_path / "foreign"
    cfg = tiny(run)
    with Trainer(cfg, progress=False) as trainer:
        trainer.train_step()
        state = _dcp_state(trainer.network, trainer.optimizer)
        group = state["optimizer"]["param_groups"][0]
        group["lr"] = Payload(marker)  # pickled by torch.save into a .distcp file
        folder = crafted_checkpoint(run, "dcp", cfg)
        dcp.save(state, checkpoint_id=folder / "dcp", no_dist=True)
        (folder / "state.json").write_text(
            json.dumps(
                {
                    "step": 1,
                    "format": "dcp",
                    "world_size": 1,
                    "nonfinite_total": 0,
                    "nonfinite_in_row": 0,
                    "sampler": trainer.batches.state_dict(),
                    "manifest": "manifest.json",
                }
            )
        )
        write_manifest(folder)
    with (
        Trainer(cfg, progress=False) as trainer,
        pytest.raises(UntrustedCheckpoint, match=r"param_groups.*refused: it asks to load"),
    ):
        trainer.train(resume=True)
    assert not marker.exists()


def test_a_crafted_optimizer_pt_is_refused_by_the_weights_only_load(tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    with Trainer(tiny(run, "train.checkpoint_every_steps=1"), progress=False) as trainer:
        trainer.train()
    folder = run / "checkpoints" / "step-000002"
    torch.save({"optimizer": Payload(marker), "scheduler": {}}, folder / "optimizer.pt")
    write_manifest(folder)  # the attacker rewrites the manifest too
    with Trainer(tiny(run, "train.max_steps=3"), progress=False) as trainer:
        with pytest.raises(UntrustedCheckpoint, match=r"optimizer.pt: refused: it asks to load getattr"):
            trainer.train(resume=True)
    assert not marker.exists()


def test_a_yaml_tag_in_a_checkpoint_config_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    with Trainer(tiny(run), progress=False) as trainer:
        trainer.train()
    folder = run / "checkpoints" / "step-000002"
    (folder / "config.yaml").write_text(f"model: !!python/object/apply:pathlib.Path.touch [[{marker}]]\n")
    write_manifest(folder)
    proc = vipo("export", str(run), "--out", str(tmp_path / "exported"), cwd=tmp_path)
    assert not marker.exists()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "config.yaml" in proc.stderr, (
        proc.stderr
    )
