"""`vipo plan`: the fake-tensor trace of one step against the same step on real CPU tensors, exact
byte counts from the model, the verdict, the batch search and the command line."""

import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from vipo.engine import plan
from vipo.engine.cli import main
from vipo.engine.config import ConfigError, load_config
from vipo.engine.errors import RunError
from vipo.engine.models import build_adapter

TINY = "configs/train/tiny-sd15-poly.yaml"


def tiny_config(tmp_path, *overrides):
    return load_config(TINY, [f"train.output_dir={tmp_path}/run", "train.batch_pairs=2", *overrides])


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    """One fake trace and the same step on real tensors, shared by the tests below."""
    cfg = plan.plan_config(tiny_config(tmp_path_factory.mktemp("plan")), 1)
    return cfg, plan.trace_step(cfg), plan.trace_step(cfg, fake=False)


def test_traced_peak_equals_the_real_cpu_allocation_of_the_same_step_within_10_percent(traces):
    _, fake, real = traces
    assert real.peak_bytes > 0
    assert abs(fake.peak_bytes / real.peak_bytes - 1) < 0.10
    assert fake.peak_phase == real.peak_phase


def test_parameter_gradient_and_optimizer_bytes_equal_exact_counts_from_the_model(traces):
    cfg, fake, real = traces
    adapter = build_adapter(cfg.model, torch.device("cpu"), seed=cfg.train.seed, trainable=True)
    params = [p for p in adapter.network.parameters() if p.requires_grad]
    trainable = sum(p.numel() * p.element_size() for p in params)
    for trace in (fake, real):
        assert trace.split["parameters"] == trainable  # a full fine-tune: every weight trains
        assert trace.split["reference"] == trainable  # reference.mode=copy: one frozen copy
        assert trace.after_step["Gradient"] == trainable  # one gradient per trainable weight
        # AdamW: exp_avg and exp_avg_sq like the weight, and a float32 step count per tensor
        assert trace.after_step["Optstate"] == 2 * trainable + 4 * len(params)
        assert trace.split["optimizer"] == 2 * trainable + 4 * len(params)  # resident all step long


def test_trace_matches_real_tensors_under_bf16_autocast_checkpointing_and_a_lora_reference(tmp_path):
    settings = ["train.mixed_precision=bf16", "model.gradient_checkpointing=true"]
    cfg = tiny_config(tmp_path, *settings, "model.lora_rank=4", "reference.mode=adapter")
    cfg = plan.plan_config(cfg, 1)
    fake, real = plan.trace_step(cfg), plan.trace_step(cfg, fake=False)
    assert abs(fake.peak_bytes / real.peak_bytes - 1) < 0.10
    lora = fake.exact["trainable"]
    assert 0 < lora < fake.exact["policy"] / 10  # only the LoRA weights train
    assert fake.split["reference"] == 0  # the policy with its LoRA off: no second network
    assert fake.after_step["Gradient"] == real.after_step["Gradient"] == lora
    assert fake.after_step["Optstate"] == 2 * lora + 4 * fake.exact["trainable_tensors"]


def test_adamw8bit_is_traced_with_bitsandbytes_own_state_and_matches_real_tensors(traces, tmp_path):
    """optim.optimizer=adamw8bit: bitsandbytes' AdamW8bit built and stepped on fake tensors (its
    update is a custom op with a fake kernel), its state counted as it allocates it."""
    from vipo.engine.plan.budget import _adamw8bit_state

    pytest.importorskip("bitsandbytes")
    _, adamw, _ = traces
    cfg = plan.plan_config(tiny_config(tmp_path, "optim.optimizer=adamw8bit"), 1)
    fake, real = plan.trace_step(cfg), plan.trace_step(cfg, fake=False)
    assert abs(fake.peak_bytes / real.peak_bytes - 1) < 0.10
    assert fake.phase_peaks["optimizer"] == real.phase_peaks["optimizer"]
    adapter = build_adapter(cfg.model, torch.device("cpu"), seed=cfg.train.seed, trainable=True)
    params = [p for p in adapter.network.parameters() if p.requires_grad]
    qmaps = 2 * 256 * 4  # two float32 quantization maps, shared by every parameter
    for trace in (fake, real):
        assert trace.after_step["Optstate"] == _adamw8bit_state(params) + qmaps
    # one byte a moment for the tensors of >= 4096 elements instead of AdamW's four
    saved = adamw.after_step["Optstate"] - fake.after_step["Optstate"]
    big = sum(p.numel() for p in params if p.numel() >= 4096)
    assert 2 * 3 * big * 0.95 < saved < 2 * 3 * big + 4 * len(params)
    assert fake.peak_bytes < adamw.peak_bytes


def test_with_accumulation_the_earlier_micro_batches_gradients_are_resident(traces, tmp_path):
    _, one, _ = traces
    accumulated = plan.trace_step(plan.plan_config(tiny_config(tmp_path, "train.grad_accum_steps=2"), 1))
    assert accumulated.phase_peaks["data"] == one.phase_peaks["data"] + one.exact["trainable"]
    assert accumulated.peak_bytes > one.peak_bytes


def test_the_peak_split_adds_up_to_the_peak(traces):
    _, fake, _ = traces
    assert sum(fake.split.values()) == fake.peak_bytes
    assert max(fake.phase_peaks.values()) == fake.peak_bytes
    assert fake.phase_peaks[fake.peak_phase] == fake.peak_bytes


def test_attention_is_traced_through_the_flash_kernel_and_no_softmax_matrix(traces):
    _, fake, _ = traces
    forward = fake.attention_ops["policy_forward"]
    assert forward.get("aten._scaled_dot_product_flash_attention_for_cpu.default", 0) > 0
    assert not any("softmax" in name for name in forward)  # the math path would softmax S x S scores
    backward = fake.attention_ops["backward"]
    assert backward.get("aten._scaled_dot_product_flash_attention_for_cpu_backward.default", 0) > 0


def test_checkpointing_a_deep_wan_leaves_one_recomputed_block_alive_in_backward(tmp_path):
    """Wan's blocks share inputs (text states, time embedding), so a gradient hook on a recomputed
    block's tensors fires only after the last block: the trace must hold no such hooks (the FLOP
    counter tracks no modules), or every recomputed block counts at once, as without checkpointing
    (the Wan 720p plan read 683 GiB). Real tensors, one of 12 blocks recomputed at a time."""
    from vipo.engine.models.base import load_architecture

    arch = load_architecture("wan-tiny")
    arch["transformer"].update(num_layers=12, ffn_dim=256, attention_head_dim=32)
    (tmp_path / "wan-deep.json").write_text(json.dumps(arch))
    peaks = {}
    for checkpointing in (True, False):
        cfg = load_config(
            None,
            [
                "model.family=wan",
                f"model.config={tmp_path / 'wan-deep.json'}",
                "data.resolution=64",
                "data.num_frames=9",
                "train.batch_pairs=1",
                f"model.gradient_checkpointing={str(checkpointing).lower()}",
                f"train.output_dir={tmp_path}/run",
            ],
        )
        trace = plan.trace_step(plan.plan_config(cfg, 1), fake=False)
        peaks[checkpointing] = trace.phase_peaks
    # Without checkpointing the forward holds every block's activations; with it, the forward
    # holds block inputs and the backward adds one recomputed block (and the gradients).
    assert peaks[False]["policy_forward"] > 4 * peaks[True]["policy_forward"]
    assert peaks[True]["backward"] < 0.4 * peaks[False]["backward"]


def test_flops_count_the_reference_and_three_policy_passes(traces):
    _, fake, real = traces
    assert fake.flops == real.flops
    reference, forward, backward = (fake.flops[p] for p in ("reference", "policy_forward", "backward"))
    assert reference == forward > 0  # the same network on the same inputs
    assert backward == pytest.approx(2 * forward, rel=0.05)  # no checkpointing: backward is 2 forwards


@pytest.mark.parametrize("name, policy", sorted(plan.CUDA_FP32_OPS.items()))
def test_the_emulated_autocast_policy_matches_cuda_autocast(name, policy):
    x = torch.randn(2, 8, 4, 4).bfloat16()
    calls = {
        "group_norm": lambda t: F.group_norm(t, 2),
        "layer_norm": lambda t: F.layer_norm(t, (4,)),
        "native_layer_norm": lambda t: torch.ops.aten.native_layer_norm(t, [4], None, None, 1e-5)[0],
        "rms_norm": lambda t: F.rms_norm(t, (4,)),
        "upsample_nearest2d": lambda t: F.interpolate(t, scale_factor=2.0, mode="nearest"),
        "upsample_bilinear2d": lambda t: F.interpolate(t, scale_factor=2.0, mode="bilinear"),
        "softmax.int": lambda t: t.softmax(-1),
        "log_softmax.int": lambda t: t.log_softmax(-1),
    }
    with torch.autocast("cpu", dtype=torch.bfloat16), plan.cuda_autocast_policy():
        emulated = calls[name](x).dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert calls[name](x).dtype == torch.bfloat16  # CPU autocast alone keeps bf16: the gap closed
    was = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    try:  # CUDA autocast's own kernels, on fake CUDA tensors (no GPU needed)
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", torch.bfloat16)
        with FakeTensorMode():
            on_cuda = calls[name](torch.empty(2, 8, 4, 4, device="cuda", dtype=torch.bfloat16)).dtype
    finally:
        torch.set_autocast_enabled("cuda", was[0])
        torch.set_autocast_dtype("cuda", was[1])
    assert emulated == on_cuda == torch.float32


def test_a_too_small_gpu_is_refused_with_the_overflow_named_and_a_larger_one_fits(traces, tmp_path, capsys):
    _, fake, _ = traces
    args = ["plan", TINY, f"train.output_dir={tmp_path}/run", "train.batch_pairs=2"]
    assert main([*args, "--gpu-memory", "1MB"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit --gpu-memory 1MB" in err
    over = (fake.peak_bytes - 10**6) / 2**30
    assert f"over by {over:.2f} GiB" in err
    # what would help, from the trace: the tiny recipe has encoders on the GPU, 2 pairs, no LoRA
    encoders = f"{fake.split['encoders'] / 2**30:.2f} GiB of encoders"
    assert f"to try: a latent cache (`vipo cache`, then data.cache=...): -{encoders}" in err
    assert "fewer pairs per GPU" in err and "model.lora_rank=64" in err
    assert "parallel.strategy=fsdp" not in err  # one GPU: nothing to shard over
    assert main([*args, "--gpu-memory", str(fake.peak_bytes), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["overflow_bytes"] == 0 and out["peak_bytes_per_gpu"] == fake.peak_bytes
    for key in ("peak_phase", "split_bytes", "phase_peak_bytes", "flops_per_pair", "flops_per_phase"):
        assert key in out
    assert out["peak_phase"] in plan.PHASES and out["flops_per_pair"] > 0


def test_batch_search_traces_until_the_next_batch_does_not_fit(traces, tmp_path):
    _, two_pairs, _ = traces  # the tiny recipe at 2 pairs, checkpointing off
    limit = two_pairs.peak_bytes - 1
    found = plan.largest_batch(tiny_config(tmp_path), 1, limit, checkpointing=False)
    assert found["pairs"] == 1
    assert found["traced"][1] <= limit < found["traced"][2] == two_pairs.peak_bytes  # batch + 1 does not fit


@pytest.mark.parametrize("largest", [0, 1, 2, 3, 5, 8, 13, 64, 100])
def test_the_search_returns_the_largest_size_that_fits_and_asks_few_sizes(largest):
    asked = []

    def fits(pairs):
        asked.append(pairs)
        return pairs <= largest

    assert plan.largest_fitting(fits, cap=64) == min(largest, 64)
    assert len(asked) <= 2 * 7 + 1  # log2(64) doublings and as many bisection steps
    assert len(asked) == len(set(asked))  # no size traced twice


def test_ddp_traces_a_replica_whose_gradients_are_ddps_buckets_and_matches_its_reducer(tmp_path):
    """ddp on 2 fake ranks, 2 pairs each: the trace's stand-in for DDP on fake tensors against DDP's
    own C++ reducer on real tensors (the fake group's), and one process with the same share."""
    cfg = tiny_config(tmp_path, "parallel.strategy=ddp", "train.batch_pairs=4")
    fake = plan.trace_rank(cfg, 2)
    with plan.fake_world(2):
        real = plan.trace_step(plan.plan_config(cfg, 2), fake=False)
    one = plan.trace_rank(tiny_config(tmp_path), 1)
    assert fake.pairs == real.pairs == one.pairs == 2
    assert fake.peak_phase == real.peak_phase and fake.phase_peaks.keys() == real.phase_peaks.keys()
    for phase, real_bytes in real.phase_peaks.items():
        assert abs(fake.phase_peaks[phase] / real_bytes - 1) < 0.02, phase
    trainable = fake.exact["trainable"]
    # The buckets hold every gradient from the wrap on (one process has none before its backward)
    # and keep them after the step (zeroed, not dropped): one copy of the gradients, not two.
    assert fake.phase_peaks["data"] == one.phase_peaks["data"] + trainable
    assert fake.after_step["Gradient"] == real.after_step["Gradient"] == trainable
    assert one.peak_bytes < fake.peak_bytes < one.peak_bytes + trainable
    assert fake.split["gradients"] == trainable


def rank0_shard_bytes(params, ranks: int) -> int:
    """FSDP2's dim-0 shard of rank 0: the first of torch.chunk's pieces, padded to ceil(d0 / N) rows."""
    return sum(-(-p.shape[0] // ranks) * (p.numel() // p.shape[0]) * p.element_size() for p in params)


@pytest.fixture(scope="module")
def fsdp_traces(tmp_path_factory):
    """The tiny recipe under fsdp on 4 fake ranks (2 pairs each), fake and real tensors."""
    out = tmp_path_factory.mktemp("fsdp")
    cfg = load_config(TINY, [f"train.output_dir={out}/run", "train.batch_pairs=8", "parallel.strategy=fsdp"])
    fake = plan.trace_rank(cfg, 4)
    with plan.fake_world(4):
        real = plan.trace_step(plan.plan_config(cfg, 4), fake=False)
    return cfg, fake, real


def test_fsdp_traces_rank_0_of_a_fake_group_and_matches_real_tensors(fsdp_traces):
    _, fake, real = fsdp_traces
    assert fake.pairs == real.pairs == 2  # 8 pairs over 4 ranks
    assert abs(fake.peak_bytes / real.peak_bytes - 1) < 0.10
    assert fake.peak_phase == real.peak_phase
    # Every phase, not only the peak's: DTensor's sharding propagation runs ops on fake tensors of
    # the global shapes, which the tracker once counted in the optimizer phase (clip, fused AdamW).
    assert fake.phase_peaks.keys() == real.phase_peaks.keys()
    for phase, real_bytes in real.phase_peaks.items():
        assert abs(fake.phase_peaks[phase] / real_bytes - 1) < 0.02, phase
    assert not torch.distributed.is_initialized()  # the fake group is gone after the trace


def test_a_fake_world_restores_the_launcher_variables_and_refuses_a_live_group(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with plan.fake_world(2):
        assert torch.distributed.get_world_size() == 2 and os.environ["WORLD_SIZE"] == "2"
        with pytest.raises(RuntimeError, match="no process group"), plan.fake_world(2):
            pass
    assert os.environ["RANK"] == "3" and "WORLD_SIZE" not in os.environ
    assert not torch.distributed.is_initialized()


def test_fsdp_holds_rank_0_shards_of_weights_gradients_and_adamw_state(fsdp_traces):
    cfg, fake, real = fsdp_traces
    adapter = build_adapter(cfg.model, torch.device("cpu"), seed=cfg.train.seed, trainable=True)
    params = [p for p in adapter.network.parameters() if p.requires_grad]
    whole = sum(p.numel() * p.element_size() for p in params)
    shard = rank0_shard_bytes(params, 4)
    assert whole / 4 <= shard < whole / 3  # the padding of small tensors is all that exceeds 1/4
    for trace in (fake, real):
        assert trace.exact["trainable"] == trace.exact["policy"] == shard
        assert trace.after_step["Gradient"] == shard  # sharded gradients (reduce-scattered)
        assert trace.after_step["Optstate"] == 2 * shard + 4 * len(params)  # AdamW on the shards only
        assert trace.exact["reference"] >= shard  # the copy reference is sharded like the policy


@pytest.fixture(scope="module")
def offload_traces(tmp_path_factory, fsdp_traces):
    """fsdp_traces' step with parallel.cpu_offload=true, fake and real tensors."""
    out = tmp_path_factory.mktemp("offload")
    args = [f"train.output_dir={out}/run", "train.batch_pairs=8", "parallel.strategy=fsdp"]
    cfg = load_config(TINY, [*args, "parallel.cpu_offload=true"])
    fake = plan.trace_rank(cfg, 4)
    with plan.fake_world(4):
        real = plan.trace_step(plan.plan_config(cfg, 4), fake=False)
    return cfg, fake, real


def test_cpu_offload_takes_the_shards_and_adamw_state_off_the_device(fsdp_traces, offload_traces):
    cfg, fake, real = offload_traces
    assert fake.pairs == real.pairs == 2
    assert abs(fake.peak_bytes / real.peak_bytes - 1) < 0.10 and fake.peak_phase == real.peak_phase
    for phase, real_bytes in real.phase_peaks.items():  # the data phase is a few batches' bytes now
        assert abs(fake.phase_peaks[phase] - real_bytes) < 0.02 * real.peak_bytes, phase
    adapter = build_adapter(cfg.model, torch.device("cpu"), seed=cfg.train.seed, trainable=True)
    shard = rank0_shard_bytes(list(adapter.network.parameters()), 4)
    for on_device, offloaded in zip(fsdp_traces[1:], (fake, real), strict=True):
        state = on_device.after_step["Optstate"]
        # Before the forward the device holds neither weight shards (policy, copy reference) nor AdamW state.
        assert on_device.phase_peaks["data"] - offloaded.phase_peaks["data"] == 2 * shard + state
        # The host holds them all, and each rank's gradient shard once the backward reduced it.
        assert offloaded.host_peak_bytes == 2 * shard + state + shard
        host = offloaded.host_split
        assert host["policy"] == host["reference"] == shard and host["optimizer"] == state
        assert 0 < host["gradients"] < offloaded.exact["trainable"]  # the peak is inside the backward
        # What left the device is what the host holds at the device's peak, and nothing else.
        assert on_device.peak_bytes - offloaded.peak_bytes == sum(host.values())
        assert on_device.peak_phase == offloaded.peak_phase == "backward"
        assert offloaded.split["parameters"] == 0
        # The reference's root stays gathered after its forward (reshard_after_forward=False): on the device.
        assert offloaded.split["reference"] == on_device.split["reference"] - shard > 0
        assert offloaded.split["optimizer"] == 0
        assert sum(offloaded.split.values()) == offloaded.peak_bytes
        assert offloaded.split["gradients"] == on_device.split["gradients"] - host["gradients"]
    # Without offload nothing is host memory.
    assert fsdp_traces[1].host_peak_bytes == 0 and fsdp_traces[1].host_split == {}


def test_host_memory_is_left_out_of_the_device_peak_from_the_trackers_start_until_it_is_freed():
    from vipo.engine.plan.tracking import StepMemTracker

    kib = 1024
    host, held = torch.zeros(256 * kib), torch.zeros(kib)  # 1 MiB of "AdamW state", 4 KiB on the device
    tracker = StepMemTracker()
    tracker.track_external(host, held)
    tracker.mark_host(host, "optimizer")
    with tracker:
        # The step's start is its largest moment when host memory is counted (a big offloaded model).
        temporary = torch.ones(4 * kib)
        del temporary
        del host
        assert tracker.host_kinds.total() == 0 and tracker.host_roles["optimizer"] == 0  # freed
    assert tracker.host_peak == 1024 * kib
    assert tracker.peak()["Total"] == 4 * kib + 16 * kib  # held + the temporary
    assert tracker.host_at_peak[1] == {"optimizer": 1024 * kib}


def test_an_offloaded_plan_names_its_host_memory_and_offload_is_a_remedy(
    fsdp_traces, offload_traces, monkeypatch
):
    traced = {False: fsdp_traces[1], True: offload_traces[1]}
    monkeypatch.setattr(plan, "trace_rank", lambda cfg, gpus: traced[cfg.parallel.cpu_offload])
    offloaded = plan.make_plan(offload_traces[0], gpus=4)
    assert (
        offloaded["cpu_offload"]
        and offloaded["host_peak_bytes_per_rank"] == offload_traces[1].host_peak_bytes
    )
    assert "host memory per rank (parallel.cpu_offload, left out above): up to" in plan.render(offloaded)
    assert not any("cpu_offload" in line for line in plan.remedies(offloaded))
    on_device = plan.make_plan(fsdp_traces[0], gpus=4)
    assert not on_device["cpu_offload"] and "host memory" not in plan.render(on_device)
    split = on_device["split_bytes"]
    held = split["parameters"] + split["reference"] + split["optimizer"]
    (line,) = [line for line in plan.remedies(on_device) if "cpu_offload" in line]
    assert f"at least -{held / 2**30:.2f} GiB" in line


@pytest.fixture(scope="module")
def reference_offload_traces(tmp_path_factory):
    """`traces`' step with reference.offload=true, fake and real tensors."""
    cfg = tiny_config(tmp_path_factory.mktemp("reference-offload"), "reference.offload=true")
    cfg = plan.plan_config(cfg, 1)
    return cfg, plan.trace_step(cfg), plan.trace_step(cfg, fake=False)


def test_an_offloaded_reference_leaves_the_device_before_the_policy_forward(traces, reference_offload_traces):
    _, fake, real = reference_offload_traces
    assert abs(fake.peak_bytes / real.peak_bytes - 1) < 0.10 and fake.peak_phase == real.peak_phase
    for phase, real_bytes in real.phase_peaks.items():
        assert abs(fake.phase_peaks[phase] - real_bytes) < 0.02 * real.peak_bytes, phase
    for resident, offloaded in zip(traces[1:], (fake, real), strict=True):
        copy = offloaded.host_peak_bytes  # the copy's weights (the tiny UNet has no buffers), on the host
        assert copy == offloaded.host_split["reference"] == offloaded.exact["reference"] > 0
        # Off the device from the data phase to the end, but for the reference pass, which copies them in.
        for phase in ("data", "policy_forward", "backward", "optimizer"):
            assert resident.phase_peaks[phase] - offloaded.phase_peaks[phase] == copy, phase
        assert offloaded.phase_peaks["reference"] == resident.phase_peaks["reference"]
        assert offloaded.split["reference"] == 0 and resident.split["reference"] == copy
        assert sum(offloaded.split.values()) == offloaded.peak_bytes
    assert traces[1].host_peak_bytes == 0


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_an_offloaded_replica_of_the_reference_leaves_every_ranks_device(tmp_path, strategy):
    args = ["train.batch_pairs=8", f"parallel.strategy={strategy}"]
    resident = plan.trace_rank(tiny_config(tmp_path, *args), 4)
    offloaded = plan.trace_rank(tiny_config(tmp_path, *args, "reference.offload=true"), 4)
    copy = offloaded.exact["reference"]
    assert offloaded.host_peak_bytes == copy > 0 and resident.host_peak_bytes == 0
    assert resident.peak_bytes - offloaded.peak_bytes == copy
    assert resident.phase_peaks["reference"] == offloaded.phase_peaks["reference"]


def test_an_offloaded_reference_is_named_and_offered_as_a_remedy(
    traces, reference_offload_traces, monkeypatch
):
    traced = {False: traces[1], True: reference_offload_traces[1]}
    monkeypatch.setattr(plan, "trace_rank", lambda cfg, gpus: traced[cfg.reference.offload])
    offloaded = plan.make_plan(reference_offload_traces[0])
    text = plan.render(offloaded)
    assert offloaded["reference_offload"] and "reference copy (offloaded)" in text
    assert "host memory per rank (reference.offload, left out above): up to" in text
    assert not any("reference.offload" in line for line in plan.remedies(offloaded))
    resident = plan.make_plan(traces[0])
    assert not resident["reference_offload"] and "host memory" not in plan.render(resident)
    (line,) = [line for line in plan.remedies(resident) if "reference.offload" in line]
    assert f"reference.offload=true: -{traces[1].split['reference'] / 2**30:.2f} GiB" in line


def context_parallel_traces(tmp_path, strategy: str):
    """A tiny Wan under `strategy` with Ulysses 2 on 4 GPUs (2 data groups of 2, one pair each),
    fake and real tensors, and the same pair a rank without context parallelism (all its tokens)."""
    recipe = tmp_path / "wan.yaml"
    recipe.write_text(
        "model: {family: wan, config: wan-tiny}\ndata: {num_pairs: 16, resolution: 16}\n"
        "train: {batch_pairs: 2, max_steps: 4}\n"
    )
    args = [f"train.output_dir={tmp_path}/run", f"parallel.strategy={strategy}"]
    cp = load_config(recipe, [*args, "parallel.context_parallel.ulysses=2"])
    fake = plan.trace_rank(cp, 4)
    with plan.fake_world(4):
        real = plan.trace_step(plan.plan_config(cp, 4), fake=False)
    assert not torch.distributed.is_initialized()
    assert fake.pairs == real.pairs == 1
    assert abs(fake.peak_bytes / real.peak_bytes - 1) < 0.10 and fake.peak_phase == real.peak_phase
    whole = plan.trace_rank(load_config(recipe, args), 4, pairs=1)
    assert fake.split["activations"] < whole.split["activations"]  # half the tokens a rank
    return cp, fake, whole


def test_context_parallel_under_fsdp_traces_a_shard_of_each_sample(tmp_path):
    cp, fake, _ = context_parallel_traces(tmp_path, "fsdp")
    with pytest.raises(ConfigError, match="must split evenly over 2 data groups of 2 GPUs"):
        plan.plan_config(dataclasses.replace(cp, train=dataclasses.replace(cp.train, batch_pairs=3)), 4)
    with pytest.raises(ConfigError, match="ulysses x ring = 2 must divide it"):
        plan.plan_config(cp, 3)
    assert sum(fake.attention_ops["policy_forward"].values()) > 0


def test_context_parallel_under_ddp_traces_a_replica_with_a_shard_of_each_sample(tmp_path):
    cp, fake, whole = context_parallel_traces(tmp_path, "ddp")
    # A whole replica: weights, gradients (DDP's buckets) and AdamW state as without context parallelism.
    for key in ("parameters", "reference", "gradients", "optimizer"):
        assert fake.split[key] == whole.split[key], key
    assert fake.exact == whole.exact and fake.split["gradients"] == fake.exact["trainable"]
    assert plan.plan_config(cp, 4).parallel.strategy == "ddp"  # not "none": the replica's context group


def test_gpu_memory_sizes_parse():
    assert plan.parse_bytes("80GiB") == 80 * 2**30
    assert plan.parse_bytes("40GB") == 40 * 10**9
    assert plan.parse_bytes("512 MiB") == 512 * 2**20
    with pytest.raises(plan.ConfigError):
        plan.parse_bytes("lots")


def test_help_and_a_bad_key_end_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_help:
        main(["plan", "--help"])
    assert exit_help.value.code == 0
    help_text = capsys.readouterr().out
    assert "--gpu-memory" in help_text and "--batch-search" in help_text and "--json" in help_text
    assert main(["plan", TINY, "optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optim.lrr" in err


def test_the_start_up_check_stops_a_run_whose_gradients_and_adamw_state_cannot_fit(tmp_path):
    from vipo.engine.plan.budget import GIB, bytes_to_come
    from vipo.engine.trainer import Trainer

    trainer = Trainer(load_config(None, [f"train.output_dir={tmp_path}"]), progress=False)
    trainable = sum(p.numel() * p.element_size() for p in trainer.network.parameters() if p.requires_grad)
    assert trainable > 0 and bytes_to_come(trainer.network.parameters(), "none") == {
        "gradients": trainable,
        "AdamW state": 2 * trainable,
    }
    # ddp: the gradients are views of DDP's buckets (parallel.apply_ddp), no second copy
    assert bytes_to_come(trainer.network.parameters(), "ddp") == bytes_to_come(
        trainer.network.parameters(), "none"
    )
    assert bytes_to_come(trainer.network.parameters(), "fsdp") is None  # not sharded yet
    assert bytes_to_come(trainer.network.parameters(), "zero3") is None  # DeepSpeed's own
    trainer.check_memory(3 * trainable)  # exactly enough
    with pytest.raises(RunError) as err:
        trainer.check_memory(3 * trainable - 1)
    message = str(err.value)
    assert (
        message.startswith("cpu: the first step needs")
        and "gradients" in message
        and "AdamW state" in message
    )
    assert (
        f"{(3 * trainable - 1) / GIB:.1f} GiB free" in message
        and "vipo plan RECIPE --batch-search" in message
    )


@pytest.mark.parametrize(
    ("strategy", "offload", "when"),
    [
        ("none", False, "before_wrap"),
        ("ddp", False, "before_wrap"),  # before DDP allocates its buckets (the gradients)
        ("fsdp", False, "after_wrap"),  # once the shards exist
        ("fsdp", True, None),  # gradients and AdamW state live on the host
        ("zero2", False, None),
        ("zero3", False, None),
    ],
)
def test_the_start_up_check_runs_where_its_bytes_are_known(strategy, offload, when):
    from vipo.engine.plan.budget import check_point

    assert check_point(strategy, offload) == when


def test_the_start_up_check_counts_this_ranks_fsdp_shards(tmp_path):
    from vipo.engine.plan.budget import bytes_to_come
    from vipo.engine.trainer import Trainer

    args = [f"train.output_dir={tmp_path}", "train.batch_pairs=8", "parallel.strategy=fsdp"]
    cfg = load_config(TINY, args)
    whole = build_adapter(cfg.model, torch.device("cpu"), seed=cfg.train.seed, trainable=True)
    shard = rank0_shard_bytes([p for p in whole.network.parameters() if p.requires_grad], 4)
    with plan.fake_world(4), Trainer(cfg, progress=False) as trainer:
        parts = bytes_to_come(trainer.network.parameters(), "fsdp")
        assert parts == {"gradients": shard, "AdamW state": 2 * shard}  # no DDP buckets
        trainer.check_memory(3 * shard)
        with pytest.raises(RunError, match=r"cpu: the first step needs .*\(parallel.cpu_offload=true\)"):
            trainer.check_memory(3 * shard - 1)


@pytest.mark.parametrize(
    ("recipe", "architecture"),
    [
        ("vipo-wan14b-poly", "wan2.1-t2v-14b"),  # names its architecture next to model.path
        ("vipo-wan-poly", "wan2.1-t2v-1.3b"),  # model.path alone: the family's released one
        ("vipo-sdxl-poly", "sdxl"),
        (TINY, "sd15-tiny"),  # no weights folder: the config it builds
    ],
)
def test_plans_and_dry_runs_size_the_architecture_a_recipe_names(recipe, architecture):
    from vipo.engine.cli import load_recipe
    from vipo.engine.plan.dry_run import _model

    cfg = load_recipe(recipe, [])
    gpus = 1 if cfg.parallel.strategy == "none" else 8
    assert plan.plan_config(cfg, gpus, pairs=1).model.config == architecture
    if recipe == "vipo-wan14b-poly":  # the dry run's parameter count is the 14B model's, not 1.3B's
        assert _model(cfg)["parameters"] > 13e9


def test_fsdp_from_a_latent_cache_probes_with_the_caches_shapes(tmp_path):
    """FSDP's first forward takes one cached sample (the encoders are freed), fake and real alike."""
    args = [f"train.output_dir={tmp_path}/run", "train.batch_pairs=8", "parallel.strategy=fsdp"]
    cfg = load_config(TINY, [*args, "data.cache=/nowhere/latent-cache"])
    fake = plan.trace_rank(cfg, 4)
    with plan.fake_world(4):
        real = plan.trace_step(plan.plan_config(cfg, 4), fake=False)
    assert fake.exact["encoders"] == real.exact["encoders"] == 0
    assert fake.flops.get("encode", 0) == 0
    assert abs(fake.peak_bytes / real.peak_bytes - 1) < 0.10
    uncached = plan.trace_rank(load_config(TINY, args), 4)
    assert fake.peak_bytes < uncached.peak_bytes


def test_remedies_name_what_the_trace_counted():
    gib = 2**30
    found = plan.remedies(
        {
            "strategy": "ddp",
            "gpus": 8,
            "split_bytes": {"encoders": 0, "reference": 10 * gib},
            "latent_cache": True,
            "reference_mode": "copy",
            "reference_dtype": "policy",
            "mixed_precision": "bf16",
            "model": {"gradient_checkpointing": True, "lora_rank": 64},
            "pairs_per_gpu": 1,
        }
    )
    assert found == [
        "parallel.strategy=fsdp (shards weights, gradients, AdamW state and the reference)",
        "reference.dtype=bfloat16: -5.00 GiB of the reference copy",
        "reference.offload=true: -10.00 GiB of the reference copy (copied from the host for each reference pass)",
    ]


def test_adamw8bit_is_a_remedy_with_the_bytes_it_takes_off_adamws_state():
    gib = 2**30
    full = {
        "strategy": "none",
        "gpus": 1,
        "split_bytes": {"optimizer": 8 * gib},  # float32 AdamW of 1 Gi elements
        "exact_bytes": {"trainable": 4 * gib},
        "latent_cache": True,
        "reference_mode": "adapter",
        "reference_dtype": "policy",
        "mixed_precision": "bf16",
        "model": {"gradient_checkpointing": True, "lora_rank": 0, "param_dtype": "float32"},
        "pairs_per_gpu": 1,
        "optimizer": "adamw",
    }
    assert "optim.optimizer=adamw8bit: about -6.00 GiB of AdamW state" in plan.remedies(full)
    bf16 = {**full, "split_bytes": {"optimizer": 4 * gib}, "exact_bytes": {"trainable": 2 * gib}}
    bf16["model"] = {**full["model"], "param_dtype": "bfloat16"}
    assert "optim.optimizer=adamw8bit: about -2.00 GiB of AdamW state" in plan.remedies(bf16)
    for other in ({"optimizer": "adamw8bit"}, {"strategy": "fsdp"}):
        assert not any("adamw8bit" in line for line in plan.remedies({**full, **other}))


# -- ZeRO: DeepSpeed's own engine on rank 0 of a fake group -------------------------------------


@pytest.mark.parametrize(
    "strategy, accum, precision",
    [("zero2", 1, "no"), ("zero3", 1, "no"), ("zero2", 2, "bf16"), ("zero3", 1, "bf16")],
)
def test_zero_traces_deepspeeds_engine_and_matches_real_tensors_in_every_phase(
    tmp_path, strategy, accum, precision
):
    """The tiny recipe on 4 fake ranks: deepspeed.initialize, its backward and step, fake and
    real tensors (the real run in the same process also checks that DeepSpeed's cached groups
    of the first fake world are dropped); with accumulation, after an untraced micro-batch."""
    linear, seed = F.linear, torch.manual_seed  # ZeRO-3's engine patches both for its process
    cfg = tiny_config(
        tmp_path,
        f"parallel.strategy={strategy}",
        "train.batch_pairs=8",
        f"train.grad_accum_steps={accum}",
        f"train.mixed_precision={precision}",
    )
    fake = plan.trace_rank(cfg, 4)
    with plan.fake_world(4):
        real = plan.trace_step(plan.plan_config(cfg, 4), fake=False)
    assert fake.pairs == real.pairs == 2
    assert fake.peak_phase == real.peak_phase == "backward"
    assert fake.phase_peaks.keys() == real.phase_peaks.keys()
    for phase, real_bytes in real.phase_peaks.items():  # the data phase holds a few KiB
        assert abs(fake.phase_peaks[phase] - real_bytes) <= max(0.02 * real_bytes, 64 * 1024), phase
    # DeepSpeed's gradient buckets of reduce_bucket_size (5e8) elements in the weights' dtype
    # (bf16 under mixed precision): ZeRO-2 with overlap_comm (the GPU config the plan traces)
    # holds two, ZeRO-3 one.
    width = 2 if precision == "bf16" else 4
    bucket = 500_000_000 * width
    buckets = 2 if strategy == "zero2" else 1
    assert buckets * bucket <= fake.peak_bytes < (buckets + 1) * bucket
    # What ZeRO holds from initialize on, in no module, is counted from the first phase: this
    # rank's fp32 partition and its AdamW state (3 x 4 bytes a parameter over 4 ranks), ZeRO-3's
    # bucket (made at initialize), the reference copy and ZeRO-2's whole policy weights.
    adapter = build_adapter(cfg.model, torch.device("cpu"), seed=cfg.train.seed, trainable=True)
    n = sum(p.numel() for p in adapter.network.parameters() if p.requires_grad)
    held = fake.exact["reference"] + 3 * 4 * n // 4 + (width * n if strategy == "zero2" else bucket)
    assert fake.phase_peaks["data"] >= held
    assert not torch.distributed.is_initialized()
    # ... which a later trace in the same process must not inherit (a baseline after zero3 saved less)
    assert torch.nn.functional.linear is linear and torch.manual_seed is seed


def test_a_zero_plans_json_is_all_that_stdout_holds(tmp_path, capsys):
    """DeepSpeed prints on its first start (the extensions it builds): to stderr, not into --json."""
    out = f"train.output_dir={tmp_path}/run"
    assert (
        main(["plan", TINY, "parallel.strategy=zero3", "train.batch_pairs=4", out, "--gpus", "2", "--json"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["strategy"] == "zero3" and report["gpus"] == 2 and report["pairs_per_gpu"] == 2


def test_zero_plans_refuse_offload_in_one_line(tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}))
    with pytest.raises(plan.RunError, match="offload_param in parallel.deepspeed_config"):
        plan.plan_config(
            tiny_config(tmp_path, "parallel.strategy=zero3", f"parallel.deepspeed_config={config}"), 2
        )
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "none"}}}))
    plan.plan_config(
        tiny_config(tmp_path, "parallel.strategy=zero3", f"parallel.deepspeed_config={config}"), 2
    )


def test_the_deepspeed_config_is_the_gpus_when_asked(tmp_path):
    from vipo.engine.parallel import World, deepspeed_config

    cfg = tiny_config(tmp_path, "parallel.strategy=zero2")
    world = World(rank=0, size=1, local_rank=0, device=torch.device("cpu"))
    on_cpu = deepspeed_config(cfg.parallel, cfg.train, cfg.optim, world)
    on_gpu = deepspeed_config(cfg.parallel, cfg.train, cfg.optim, world, gpu=True)
    assert (
        on_cpu["zero_optimization"]["overlap_comm"] is False
        and on_gpu["zero_optimization"]["overlap_comm"] is True
    )
