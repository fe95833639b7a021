"""FSDP start-up from rank 0's weights (parallel.meta_init): the other ranks make the denoiser on
the meta device from its config alone, shard it, and receive their shards from rank 0; buffers
FSDP does not shard (Wan's rotary tables, not even in the state dict) come from rank 0 too."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_parallel import assert_same_curve, launch, one_thread, read_metrics, torchrun

from vipo.engine.config import load_config
from vipo.engine.models import build_adapter

from vipo_testing import make_sd15_folder

RECIPE = """\
model: {{family: sd15, path: {path}}}
data: {{num_pairs: 16, resolution: 16}}
loss: {{beta: 500.0}}
optim: {{lr: 1.0e-4, eps: 1.0e-6}}
train: {{batch_pairs: 2, grad_accum_steps: 2, max_steps: 3, log_every_steps: 1, checkpoint_every_steps: 0}}
"""


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory) -> Path:
    return make_sd15_folder(tmp_path_factory.mktemp("model") / "sd15")


def test_a_meta_build_reads_no_denoiser_weights_and_loads_the_encoders(sd15_folder, monkeypatch):
    cfg = load_config(None, [f"model.path={sd15_folder}", "model.lora_rank=4"])
    from diffusers import UNet2DConditionModel

    def refuse(*args, **kwargs):
        raise AssertionError("the meta build read the UNet's weights")

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", refuse)
    adapter = build_adapter(cfg.model, torch.device("cpu"), seed=0, trainable=True, meta=True)
    assert all(p.is_meta for p in adapter.network.parameters())
    assert any("lora_" in name for name, _ in adapter.network.named_parameters())  # LoRA on meta too
    assert not any(p.is_meta for p in adapter.text_encoder.parameters())
    assert not any(p.is_meta for p in adapter.vae.parameters())
    # Random-weight builds (model.config) are made for real: rank 0's RNG draws would differ otherwise.
    tiny = build_adapter(load_config(None).model, torch.device("cpu"), seed=0, trainable=True, meta=True)
    assert not any(p.is_meta for p in tiny.network.parameters())


def test_a_meta_copy_has_the_structure_and_none_of_the_memory():
    from vipo.engine.reference import meta_copy

    from vipo_testing import tiny_adapter

    network = tiny_adapter("wan").network
    network.proj_out.requires_grad_(False)
    copy = meta_copy(network)
    assert [n for n, _ in copy.named_parameters()] == [n for n, _ in network.named_parameters()]
    assert [n for n, _ in copy.named_buffers()] == [n for n, _ in network.named_buffers()]
    assert all(p.is_meta for p in [*copy.parameters(), *copy.buffers()])
    assert [p.requires_grad for p in copy.parameters()] == [p.requires_grad for p in network.parameters()]
    assert not any(p.is_meta for p in network.parameters())  # the original keeps its weights


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _materialise_worker(rank: int, port: int, out: str) -> None:
    import json

    from diffusers import WanTransformer3DModel
    from torch.distributed.fsdp import fully_shard

    from vipo.configs import ROOT
    from vipo.engine.parallel import World, full_weights, materialise

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    world = World(rank=rank, size=2)
    arch = json.loads((ROOT / "models" / "wan-tiny.json").read_text())["transformer"]
    torch.manual_seed(1)
    if rank == 0:
        network = WanTransformer3DModel(**arch)
    else:
        with torch.device("meta"):
            network = WanTransformer3DModel(**arch)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(2)),
        timestep=torch.tensor([100.0, 900.0]),
        encoder_hidden_states=torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3)),
        return_dict=False,
    )
    with torch.no_grad():
        before = network(**inputs)[0] if rank == 0 else None
    full = full_weights(network, world)
    for block in network.blocks:
        fully_shard(block)
    fully_shard(network)
    materialise(network, full, world)
    with torch.no_grad():
        after = network(**inputs)[0]
    buffers = {name: b.clone() for name, b in network.named_buffers()}
    torch.save({"before": before, "after": after, "buffers": buffers}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_meta_ranks_receive_rank0s_weights_and_its_unsaved_buffers(tmp_path):
    mp.spawn(_materialise_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert "rope.freqs_cos" in r1["buffers"]  # persistent=False: not in any state dict
    for name, buffer in r0["buffers"].items():
        assert torch.equal(r1["buffers"][name], buffer), name
    torch.testing.assert_close(r0["after"], r0["before"], rtol=1e-6, atol=1e-6)
    assert torch.equal(r1["after"], r0["after"])


@pytest.mark.slow
def test_fsdp_started_from_rank0s_weights_trains_like_one_process(sd15_folder, tmp_path):
    recipe = tmp_path / "sd15.yaml"
    recipe.write_text(RECIPE.format(path=sd15_folder))
    from vipo.engine.trainer import Trainer

    with (
        one_thread(),
        Trainer(load_config(recipe, [f"train.output_dir={tmp_path / 'one'}"]), progress=False) as t,
    ):
        t.train()
    run = tmp_path / "run"
    out = launch(
        torchrun(
            "-m", "vipo.engine", "train", str(recipe), f"train.output_dir={run}", "parallel.strategy=fsdp"
        ),
        tmp_path,
    )
    # The policy and the copy reference, each sent from rank 0.
    assert out.count("sharded rank 0's 0.8M weights over 2 ranks (0.4M each)") == 2, out[-3000:]
    assert_same_curve(read_metrics(run), read_metrics(tmp_path / "one"), "fsdp from rank 0's weights")
