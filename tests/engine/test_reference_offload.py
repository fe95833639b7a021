"""reference.offload: the copy reference's weights in host memory between its passes, copied to the
device for each pass (HostWeights)."""

import pytest
import torch
from torch import nn

from vipo.engine.config import ConfigError, load_config
from vipo.engine.reference import HostWeights, pin_host
from vipo.engine.trainer import Trainer

from vipo_testing import changed, snapshot

TINY = "configs/train/tiny-sd15-poly.yaml"


def offload_config(tmp_path, *overrides):
    return load_config(
        TINY,
        [
            f"train.output_dir={tmp_path}",
            "train.batch_pairs=2",
            "train.max_steps=2",
            "reference.offload=true",
            *overrides,
        ],
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.lora_rank=4", "reference.mode=adapter"],
            "reference.offload is for reference.mode=copy, got 'adapter'",
        ),
        (["parallel.strategy=fsdp"], "got 'fsdp': parallel.cpu_offload=true keeps the reference's shards"),
        (["parallel.strategy=zero3"], "got 'zero3': zero3 already partitions the copy"),
    ],
)
def test_an_offloaded_reference_outside_its_settings_is_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        offload_config(tmp_path, *overrides)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)
        self.c = nn.Linear(3, 3).to(torch.bfloat16)
        self.d = nn.Linear(4, 3)
        self.d.weight = self.b.weight  # one parameter under two names
        self.register_buffer("scale", torch.full((3,), 2.0))

    def forward(self, x):
        h = self.a(x)
        return (self.b(h) + self.d(h) + self.c(x.bfloat16()).float()) * self.scale


def storage_of(tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def test_between_passes_the_weights_are_views_of_one_host_buffer_per_dtype_and_a_pass_reads_copies():
    torch.manual_seed(0)
    network = Tied().requires_grad_(False)
    x = torch.randn(5, 3)
    expected, before = network(x), snapshot(network)
    params = list(network.parameters())
    host = HostWeights(network, pin=False)
    flats = {storage_of(flat) for flat in host.flats}
    assert {flat.dtype for flat in host.flats} == {torch.float32, torch.bfloat16}
    assert host.nbytes == sum(p.numel() * p.element_size() for p in params)  # the tied weight once
    assert all(storage_of(p) in flats for p in params) and not changed(before, network)
    with host.on(torch.device("cpu")):
        assert not any(storage_of(p) in flats for p in params)  # each its own device tensor
        assert len({storage_of(p) for p in params}) == len(params)
        assert network.d.weight is network.b.weight  # still tied: one copy for both names
        assert not changed(before, network)
        torch.testing.assert_close(network(x), expected, rtol=0, atol=0)
    assert all(storage_of(p) in flats for p in params)
    with pytest.raises(RuntimeError, match="in the pass"), host.on(torch.device("cpu")):
        raise RuntimeError("in the pass")
    assert all(storage_of(p) in flats for p in params)  # put back after a failed pass too
    assert storage_of(network.scale) not in flats  # buffers stay where they were


def test_host_buffers_are_pinned_for_a_gpu_and_not_for_a_cpu_run():
    assert pin_host(torch.device("cuda", 3)) and not pin_host(torch.device("cpu"))


@pytest.mark.parametrize(
    "precision", [[], ["train.mixed_precision=bf16", "reference.dtype=bfloat16"]], ids=["fp32", "bf16"]
)
def test_an_offloaded_reference_trains_exactly_as_the_resident_one(tmp_path, precision):
    runs = {}
    for offload in (False, True):
        cfg = offload_config(tmp_path / str(offload), *precision, f"reference.offload={str(offload).lower()}")
        trainer = Trainer(cfg, progress=False)
        frozen = snapshot(trainer.reference.network)
        losses = [trainer.train_step()["loss"] for _ in range(2)]
        assert not changed(frozen, trainer.reference.network)
        runs[offload] = losses, snapshot(trainer.adapter.network), trainer.reference
    (resident_losses, resident_policy, resident), (losses, policy, offloaded) = runs[False], runs[True]
    assert resident.host is None and offloaded.host is not None
    flats = {storage_of(flat) for flat in offloaded.host.flats}
    assert all(storage_of(p) in flats for p in offloaded.network.parameters())  # on the host after the steps
    assert torch.equal(torch.stack(losses), torch.stack(resident_losses))
    assert all(torch.equal(policy[key], value) for key, value in resident_policy.items())


def test_a_compiled_copy_is_not_recompiled_when_each_pass_reads_new_device_tensors():
    """train.compile compiles the copy reference too: its guards hold across passes whose weights
    are fresh copies (the backend does not matter to the guards; eager keeps the test fast)."""
    torch._dynamo.reset()
    network = Tied().requires_grad_(False)
    host = HostWeights(network, pin=False)
    compiled = torch.compile(network, backend="eager")
    x = torch.randn(5, 3)
    with torch._dynamo.config.patch(error_on_recompile=True):
        outputs = []
        for _ in range(3):
            with host.on(torch.device("cpu")), torch.no_grad():
                outputs.append(compiled(x))
    assert all(torch.equal(out, outputs[0]) for out in outputs)
    torch._dynamo.reset()
