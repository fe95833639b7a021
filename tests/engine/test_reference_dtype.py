"""reference.dtype=bfloat16: the frozen copy's weights in bfloat16 under bf16 autocast."""

import pytest
import torch

from vipo.engine import plan
from vipo.engine.config import ConfigError, load_config
from vipo.engine.models import build_adapter
from vipo.engine.reference import CopyReference, cast_frozen
from vipo.engine.trainer import Trainer

from vipo_testing import changed, snapshot

TINY = "configs/train/tiny-sd15-poly.yaml"


def bf16_config(tmp_path, *overrides):
    return load_config(
        TINY,
        [
            f"train.output_dir={tmp_path}",
            "train.batch_pairs=2",
            "train.max_steps=2",
            "train.mixed_precision=bf16",
            "reference.dtype=bfloat16",
            *overrides,
        ],
    )


def weight_bytes(network) -> int:
    return sum(p.numel() * p.element_size() for p in network.parameters())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.mixed_precision=no"], "reference.dtype=bfloat16 needs train.mixed_precision=bf16"),
        (
            ["model.lora_rank=4", "reference.mode=adapter"],
            "reference.dtype=bfloat16 is for reference.mode=copy, got 'adapter'",
        ),
    ],
)
def test_a_bf16_reference_outside_its_settings_is_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        bf16_config(tmp_path, *overrides)


def test_the_bf16_copy_holds_half_the_bytes_and_trains_a_float32_policy(tmp_path):
    trainer = Trainer(bf16_config(tmp_path), progress=False)
    policy, reference = trainer.adapter.network, trainer.reference.network
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}
    assert 2 * weight_bytes(reference) == weight_bytes(policy)
    before, frozen = snapshot(policy), snapshot(reference)
    for _ in range(2):
        metrics = trainer.train_step()
        assert torch.isfinite(metrics["loss"])
    assert changed(before, policy) and not changed(frozen, reference)


def test_bf16_reference_errors_stay_close_to_the_float32_copys(tmp_path):
    """Under bf16 autocast the policy's float32 weights are cast to bfloat16 for every matmul and
    convolution: a bfloat16 copy changes only what runs in float32 (norms, biases added outside)."""
    trainer = Trainer(bf16_config(tmp_path), progress=False)
    adapter = trainer.adapter
    batch = trainer.next_batch()
    cond = adapter.encode_prompts(batch.prompts)
    cond = {key: torch.cat([value, value]) for key, value in cond.items()}
    latents = adapter.encode_pixels(batch.pixels)
    x_t, t, target = adapter.noisy_inputs(latents, torch.Generator().manual_seed(3))
    with torch.no_grad():  # norms start at exactly 1 and 0, which bfloat16 holds: move them off
        for name, param in adapter.network.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param), alpha=0.01)
    with trainer.autocast():
        full = CopyReference(adapter).errors(x_t, t, cond, target)
        half = CopyReference(adapter, dtype=torch.bfloat16).errors(x_t, t, cond, target)
    assert not torch.equal(full, half)  # the norms' bfloat16 weights did reach the forward
    torch.testing.assert_close(half, full, rtol=2e-2, atol=1e-4)


def test_modules_a_model_keeps_in_float32_stay_float32():
    cfg = load_config(None, ["model.family=wan", "model.config=wan-tiny", "data.num_frames=5"])
    network = build_adapter(cfg.model, torch.device("cpu"), seed=0, trainable=False).network
    keep = set(network._keep_in_fp32_modules)
    cast_frozen(network, torch.bfloat16)
    kept = {n for n, p in network.named_parameters() if keep.intersection(n.split("."))}
    assert kept and all(dict(network.named_parameters())[n].dtype == torch.float32 for n in kept)
    others = [p for n, p in network.named_parameters() if n not in kept]
    assert others and all(p.dtype == torch.bfloat16 for p in others)
    assert all(b.dtype != torch.bfloat16 for b in network.buffers())


def test_a_bf16_reference_is_sharded_under_fsdp_and_the_plan_counts_it(tmp_path):
    from vipo.engine.plan.trace import _bytes

    args = ["train.batch_pairs=8", "parallel.strategy=fsdp"]
    cfg = bf16_config(tmp_path, *args)
    with plan.fake_world(4), Trainer(plan.plan_config(cfg, 4), progress=False) as trainer:
        policy, reference = trainer.network, trainer.reference.network
        assert all(p.to_local().dtype == torch.bfloat16 for p in reference.parameters())
        assert 2 * _bytes(reference) == _bytes(policy)  # rank 0's bfloat16 shards of the same rows
    half = plan.trace_rank(cfg, 4)
    full = plan.trace_rank(bf16_config(tmp_path, *args, "reference.dtype=policy"), 4)
    assert half.exact["reference"] < 0.6 * full.exact["reference"]
    assert half.peak_bytes < full.peak_bytes
