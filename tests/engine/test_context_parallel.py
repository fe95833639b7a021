"""Context parallelism (parallel.context_parallel): each sample's tokens split over ranks.

The token shard a rank's loss reads is the one diffusers' split gives that rank's transformer
(checked against the model's own unpatchify), and on gloo processes tiny Wan trains with
ulysses = 2 like one process with the same global batch: under DDP and resumed (copy reference),
under FSDP with activation checkpointing and the LoRA-off reference, and on 4 ranks as 2 data
groups x 2 with the precomputed reference.
"""

import json
from pathlib import Path

import pytest
import torch
from test_parallel import assert_same_curve, launch, one_thread, read_metrics

from vipo.engine.config import ConfigError, load_config
from vipo.engine.context_parallel import ContextParallel, setup
from vipo.engine.errors import RunError
from vipo.engine.parallel import World

from vipo_testing import tiny_adapter

RECIPE = """\
model: {family: wan, config: wan-tiny}
data: {num_pairs: 16, resolution: 16}
loss: {beta: 500.0}
optim: {lr: 1.0e-4, eps: 1.0e-6}
train: {batch_pairs: 2, grad_accum_steps: 2, max_steps: 4, log_every_steps: 1, checkpoint_every_steps: 2}
"""


def train_on(n: int, recipe: Path, run: Path, *overrides: str) -> list[str]:
    """`vipo train` on n processes, context-parallel over pairs of ranks."""
    import sys

    return [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"),
        *("-m", "vipo.engine", "train", str(recipe), f"train.output_dir={run}"),
        *("parallel.context_parallel.ulysses=2", *overrides),
    ]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "wan.yaml"
    path.write_text(RECIPE)
    return path


def one_process(recipe: Path, out: Path, *overrides: str) -> list[dict]:
    from vipo.engine.trainer import Trainer

    cfg = load_config(recipe, [f"train.output_dir={out}", *overrides])
    with one_thread(), Trainer(cfg, progress=False) as trainer:
        trainer.train()
    return read_metrics(out)


# -- the token shard ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [2, 3])
def test_each_ranks_shard_is_the_tokens_its_transformer_holds(size):
    """Wan's output is built from tokens by its own unpatchify: make every token's output its
    index, and each rank's shard must hold exactly the indices diffusers' split gives it."""
    network = tiny_adapter("wan").network.eval()
    x = torch.randn(2, 4, 3, 12, 8)  # 3 frames of 6 x 4 patches: 72 tokens
    tokens = 3 * 6 * 4
    marker = torch.arange(tokens, dtype=torch.float32).view(1, tokens, 1)
    hook = network.proj_out.register_forward_hook(lambda m, i, out: marker.expand_as(out).contiguous())
    try:
        with torch.no_grad():
            (out,) = network(
                hidden_states=x,
                timestep=torch.tensor([10.0, 20.0]),
                encoder_hidden_states=torch.zeros(2, 4, 32),
                return_dict=False,
            )
    finally:
        hook.remove()
    shards = [
        ContextParallel(size, 1, None, None, rank, patch=tuple(network.config.patch_size)).shard(out)
        for rank in range(size)
    ]
    per_rank = tokens // size
    for rank, shard in enumerate(shards):
        assert shard.shape == (2, per_rank, 4 * 1 * 2 * 2)
        expected = torch.arange(rank * per_rank, (rank + 1) * per_rank, dtype=torch.float32)
        assert torch.equal(shard, expected.view(1, -1, 1).expand_as(shard)), rank


def test_flux_shards_are_the_packed_tokens_its_transformer_holds():
    """FLUX's adapter packs 2x2 latent patches into tokens and unpacks the output: each rank's
    shard of the unpacked prediction must be its own run of image tokens."""
    flux = tiny_adapter("flux")
    network = flux.network.eval()
    tokens = 4 * 4  # 8 x 8 latents
    marker = torch.arange(tokens, dtype=torch.float32).view(1, tokens, 1)
    hook = network.proj_out.register_forward_hook(lambda m, i, out: marker.expand_as(out).contiguous())
    cond = flux.encode_prompts(["a red circle", "a blue square"])
    try:
        with torch.no_grad():
            pred = flux.predict(network, torch.randn(2, 16, 8, 8), torch.tensor([0.3, 0.7]), cond)
    finally:
        hook.remove()
    for rank in range(2):
        context = ContextParallel(2, 1, None, None, rank)
        context.check(network, "flux", "sdpa")
        shard = context.shard(pred)
        expected = torch.arange(rank * 8, (rank + 1) * 8, dtype=torch.float32).view(1, -1, 1)
        assert shard.shape == (2, 8, 64) and torch.equal(shard, expected.expand_as(shard))


def test_a_token_count_the_group_does_not_divide_is_one_error():
    context = ContextParallel(4, 1, None, None, 0, patch=(1, 2, 2))
    with pytest.raises(RunError, match=r"18 tokens \(1x3x6 patches\) into 4 equal shards"):
        context.shard(torch.zeros(2, 4, 1, 6, 12))


# -- settings refused in one line -------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.context_parallel.ulysses=2"], "needs parallel.strategy ddp or fsdp, got 'none'"),
        (["parallel.strategy=zero2", "parallel.context_parallel.ulysses=2"], "got 'zero2'"),
        (["parallel.strategy=ddp", "parallel.context_parallel.ring=0"], "ring must be >= 1"),
        (
            ["parallel.strategy=ddp", "parallel.context_parallel.ulysses=2", "train.compile=blocks"],
            "does not run under train.compile",
        ),
    ],
)
def test_config_refuses(recipe, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(recipe, overrides)


@pytest.mark.parametrize(
    "ulysses, ring, family, attention, message",
    [
        (4, 1, "wan", "sdpa", r"ulysses=4 must divide the model's 2 attention heads \(one of \[1, 2\]\)"),
        (1, 2, "wan", "sdpa", "ring=2 needs model.attention=flash_attn"),
        (2, 1, "sd3", "sdpa", "works for wan, flux; model.family is 'sd3'"),
    ],
)
def test_the_model_check_refuses(ulysses, ring, family, attention, message):
    network = tiny_adapter("wan").network
    with pytest.raises(ConfigError, match=message):
        ContextParallel(ulysses, ring, None, None, 0).check(network, family, attention)


def test_a_group_that_does_not_divide_the_processes_is_refused(recipe):
    cfg = load_config(recipe, ["parallel.strategy=ddp", "parallel.context_parallel.ulysses=2"])
    with pytest.raises(RunError, match="ulysses x ring = 2 must divide the 3 processes"):
        setup(cfg.parallel, World(rank=0, size=3))
    assert setup(load_config(recipe).parallel, World()) is None


# -- training on gloo processes ---------------------------------------------------------------


@pytest.mark.slow
def test_ulysses_2_under_ddp_trains_like_one_process_and_resumes(recipe, tmp_path):
    expected = one_process(recipe, tmp_path / "one")
    run = tmp_path / "run"
    launch(train_on(2, recipe, run, "parallel.strategy=ddp", "train.max_steps=2", "-q"), tmp_path)
    launch(train_on(2, recipe, run, "parallel.strategy=ddp", "--resume", "-q"), tmp_path)
    assert (run / "checkpoints" / "latest").read_text() == "step-000004"
    assert_same_curve(read_metrics(run), expected, "ddp, ulysses 2, resumed at step 2")


@pytest.mark.slow
def test_flux_with_ulysses_2_trains_like_one_process(recipe, tmp_path):
    flux = ["model.family=flux", "model.config=flux-tiny", "train.max_steps=2"]
    expected = one_process(recipe, tmp_path / "one", *flux)
    run = tmp_path / "run"
    launch(train_on(2, recipe, run, "parallel.strategy=ddp", *flux, "-q"), tmp_path)
    assert_same_curve(read_metrics(run), expected, "flux, ddp, ulysses 2")


@pytest.mark.slow
def test_ulysses_2_under_fsdp_with_the_adapter_reference_trains_like_one_process(recipe, tmp_path):
    lora = ["model.lora_rank=4", "reference.mode=adapter", "optim.lr=1.0e-3"]
    expected = one_process(recipe, tmp_path / "one", *lora)
    run = tmp_path / "run"
    overrides = ("parallel.strategy=fsdp", "model.gradient_checkpointing=true", *lora, "-q")
    launch(train_on(2, recipe, run, *overrides), tmp_path)
    rows = read_metrics(run)
    assert rows[-1]["loss"] != rows[0]["loss"]  # the LoRA weights moved the policy off its reference
    assert_same_curve(rows, expected, "fsdp, ulysses 2, adapter reference")


@pytest.mark.slow
def test_two_data_groups_of_two_context_ranks_with_the_precomputed_reference_train_like_one_process(
    recipe, tmp_path
):
    """4 ranks: data 2 x ulysses 2. Each data group draws its half of the batch; the table's
    reference errors are whole-sample ones, the policy's come from each group's two shards."""
    from vipo.engine.data.cache import run_cache
    from vipo.engine.reference.precomputed import score_reference

    cached = [f"data.cache={tmp_path / 'cache'}", "reference.mode=precomputed", "train.batch_pairs=4"]
    cfg = load_config(recipe, [f"train.output_dir={tmp_path / 'one'}", *cached])
    run_cache(cfg, pairs_per_shard=4, progress=False)
    score_reference(cfg, 2, progress=False)
    expected = one_process(recipe, tmp_path / "one", *cached)
    run = tmp_path / "run"
    out = launch(train_on(4, recipe, run, "parallel.strategy=ddp", *cached), tmp_path)
    assert "2 data groups x 2 ranks (ulysses 2 x ring 1)" in out
    rows = read_metrics(run)
    # Step 1 is a tie (policy = reference), but the table's errors were summed unsharded and the
    # policy's from two shards: z is 0 to float64 rounding only, so which ties count as right is
    # rounding. Its loss and gradient norm, and every later step, match.
    for key in ("loss", "grad_norm"):
        assert rows[0][key] == pytest.approx(expected[0][key], rel=1e-4), key
    assert_same_curve(rows[1:], expected[1:], "ddp, data 2 x ulysses 2, precomputed reference")
    assert json.loads((run / "config.json").read_text())["parallel"]["context_parallel"]["ulysses"] == 2


# -- the recipes -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vipo-wan-poly", "vipo-wan14b-poly", "vipo-wan14b-lora-poly"])
def test_video_recipes_split_every_bucket_into_equal_shards(name):
    """Each bucket's clips (Wan's VAE: 4x fewer frames after the first, 8x smaller frames) give a
    token count the context group divides, and Ulysses divides the architecture's heads."""
    from vipo.configs import find_recipe
    from vipo.engine.models import load_architecture

    cfg = load_config(find_recipe(name))
    cp = cfg.parallel.context_parallel
    arch = load_architecture(cfg.model.config if cfg.model.config.startswith("wan") else "wan2.1-t2v-1.3b")
    pt, ph, pw = arch["transformer"]["patch_size"]
    assert cp.ulysses > 1 and arch["transformer"]["num_attention_heads"] % cp.ulysses == 0
    frames = 1 + (cfg.data.num_frames - 1) // 4
    for width, height in cfg.data.buckets:
        tokens = (frames // pt) * (height // 8 // ph) * (width // 8 // pw)
        assert tokens == 75_600 and tokens % (cp.ulysses * cp.ring) == 0, (width, height)
    assert cfg.train.batch_pairs * cfg.train.grad_accum_steps == 256


def test_a_context_group_shares_its_pairs_and_every_group_trains_one_bucket_a_step():
    """4 ranks as 2 data groups x 2: the ranks of a group take the same pairs; both groups take the
    same bucket at each step (16:9 and 1:1 clips never meet in one step, where the per-sample mean
    would weigh them alike anyway)."""
    from vipo.loaders.buckets import BucketBatchSampler

    buckets = [0] * 12 + [1] * 12  # e.g. 1280x720 and 960x960
    worlds = [World(rank=r, size=4, context=2) for r in range(4)]
    samplers = [
        BucketBatchSampler(buckets, 2, seed=5, rank=w.data_rank, world_size=w.data_size) for w in worlds
    ]
    for _ in range(6):
        batches = [s.next_batch() for s in samplers]
        assert batches[0] == batches[1] and batches[2] == batches[3]
        assert not set(batches[0]) & set(batches[2])
        assert len({s.last_bucket for s in samplers}) == 1


def test_only_a_cpu_mesh_counts_the_cpu_as_a_device_for_diffusers():
    from vipo.engine.context_parallel import device_count_for

    real = torch.accelerator.device_count
    with device_count_for("cuda"):
        assert torch.accelerator.device_count is real  # a GPU rank's count is left alone
    with device_count_for("cpu"):
        assert torch.accelerator.device_count() == 1
    assert torch.accelerator.device_count is real
