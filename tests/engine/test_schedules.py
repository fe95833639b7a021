"""optim.schedule and optim.optimizer through the Trainer's own construction: every schedule runs
at diffusers' get_scheduler values, the default at the warm-up-then-constant values it always
had, a resume continues the same LR sequence, and what cannot run is refused in one line."""

import json
import signal
import sys
import warnings

import pytest
import torch
from diffusers.optimization import get_scheduler

from vipo.configs import builtin_recipes, find_recipe
from vipo.engine import trainer as trainer_module
from vipo.engine.config import ConfigError, RunConfig, read_recipe
from vipo.engine.errors import RunError
from vipo.engine.optim import check_optimizer
from vipo.engine.stopping import Stopped
from vipo.engine.trainer import Trainer

from vipo_testing import tiny_family_config

SFT = "loss.objective=sft"  # no reference: the cheapest step; the schedule is the objective's alike


def tiny(tmp_path, *overrides):
    return tiny_family_config(tmp_path, "sd15", SFT, *overrides)


def stepped_lrs(scheduler, steps: int) -> list[float]:
    """The LR each of `steps` updates runs at, stepping the schedule as train_step does."""
    lrs = []
    with warnings.catch_warnings():  # no optimizer.step() in between: torch warns, rightly, here only
        warnings.simplefilter("ignore")
        for _ in range(steps):
            lrs.append(scheduler.get_last_lr()[0])
            scheduler.step()
    return lrs


def diffusers_lrs(name: str, lr: float, steps: int, **kwargs) -> list[float]:
    """diffusers' own get_scheduler on a plain AdamW of one parameter."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    return stepped_lrs(get_scheduler(name, optimizer, **kwargs), steps)


def logged(run_dir, key: str) -> list:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows]


def test_the_default_schedule_is_the_warm_up_then_constant_of_every_recipe(tmp_path):
    assert RunConfig().optim.schedule == "warmup_constant"
    for recipe in builtin_recipes():  # none names a schedule: each keeps its warm-up as it was
        assert "schedule" not in read_recipe(find_recipe(recipe)).get("optim", {}), recipe
    with Trainer(tiny(tmp_path, "optim.warmup_steps=3", "train.max_steps=6"), progress=False) as trainer:
        # The update k runs at lr * min(1, k / warmup): the first already moves, full LR from k = 3.
        expected = [trainer.lr * min(1.0, k / 3) for k in range(1, 7)]
        assert stepped_lrs(trainer.scheduler, 6) == pytest.approx(expected, rel=1e-12)
    with Trainer(tiny(tmp_path / "flat", "train.max_steps=4"), progress=False) as trainer:
        assert stepped_lrs(trainer.scheduler, 4) == [trainer.lr] * 4  # no warm-up: constant


def test_the_default_warm_up_may_outlast_a_short_run(tmp_path):
    # A smoke run of a recipe (demo: 10 warm-up steps) with train.max_steps=2 is as valid as before.
    cfg = tiny(tmp_path, "optim.warmup_steps=10", "train.max_steps=2")
    assert cfg.optim.warmup_steps > cfg.train.max_steps


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("constant", {}),
        ("constant_with_warmup", {}),
        ("linear", {}),
        ("cosine", {}),
        ("cosine_with_restarts", {"num_cycles": 2}),
        ("polynomial", {"power": 2.0}),
    ],
)
def test_each_schedule_runs_at_the_values_of_diffusers_get_scheduler(tmp_path, name, extra):
    warmup = 0 if name == "constant" else 2
    overrides = [f"optim.schedule={name}", f"optim.warmup_steps={warmup}", "train.max_steps=9"]
    overrides += [f"optim.{key}={value}" for key, value in extra.items()]
    with Trainer(tiny(tmp_path, *overrides), progress=False) as trainer:
        actual = stepped_lrs(trainer.scheduler, 9)
        expected = diffusers_lrs(name, trainer.lr, 9, num_warmup_steps=warmup, num_training_steps=9, **extra)
    assert actual == pytest.approx(expected, rel=1e-12, abs=0.0)
    assert name == "constant" or len(set(actual)) >= 3  # a schedule that moves, not a vacuous match
    assert actual[0] == (trainer.lr if name == "constant" else 0.0)  # diffusers' warm-up starts at LR 0


def _stop_at(trainer: Trainer, step: int) -> None:
    """A SIGTERM seen after `step`: the run saves its checkpoint and stops, as on a cluster."""
    real = trainer._stop_or_save_due
    trainer._stop_or_save_due = lambda stops: (
        (int(signal.SIGTERM), False) if trainer.step == step else real(stops)
    )


def test_a_resume_mid_warm_up_and_mid_cosine_continues_the_same_lr_sequence(tmp_path):
    overrides = ["optim.schedule=cosine", "optim.warmup_steps=3", "train.max_steps=7"]
    straight = tmp_path / "straight"
    with Trainer(tiny(straight, *overrides), progress=False) as trainer:
        trainer.train()
        lr = trainer.lr
        assert trainer.scheduler.state_dict()["lr_lambdas"] == [None]  # no code in a checkpoint
    expected = diffusers_lrs("cosine", lr, 7, num_warmup_steps=3, num_training_steps=7)
    assert logged(straight, "lr") == pytest.approx(expected, rel=1e-6)  # metrics: the LR each update ran at

    split = tmp_path / "split"
    for stop, resume in ((2, False), (5, True)):  # in the warm-up, then in the cosine
        with Trainer(tiny(split, *overrides), progress=False) as trainer:
            _stop_at(trainer, stop)
            with pytest.raises(Stopped):
                trainer.train(resume=resume)
    with Trainer(tiny(split, *overrides), progress=False) as trainer:
        trainer.train(resume=True)
    assert logged(split, "step") == list(range(1, 8))
    assert logged(split, "lr") == logged(straight, "lr")
    assert logged(split, "loss") == pytest.approx(logged(straight, "loss"), rel=1e-5, abs=1e-7)


def test_a_checkpoint_resumes_only_with_the_optimizer_that_wrote_it(tmp_path, monkeypatch):
    with Trainer(tiny(tmp_path, "train.max_steps=1"), progress=False) as trainer:
        trainer.train()
    real = trainer_module.checkpoint_state
    monkeypatch.setattr(
        trainer_module, "checkpoint_state", lambda path: {**real(path), "optimizer": "adamw8bit"}
    )
    with Trainer(tiny(tmp_path, "train.max_steps=2"), progress=False) as trainer:
        with pytest.raises(RunError, match="optim.optimizer=adamw8bit; resume with it"):
            trainer.resume()


def test_adamw8bit_trains_on_the_cpu_with_one_byte_moments_and_resumes_the_same_run(tmp_path):
    """bitsandbytes' own AdamW8bit (>= 0.50 runs on the CPU): its state is uint8 with a scale per
    block, the weights move, and a run stopped after step 2 resumes from a checkpoint holding
    that state (loaded with weights_only=True) to the losses of the straight run."""
    bnb = pytest.importorskip("bitsandbytes")
    overrides = ["optim.optimizer=adamw8bit", "optim.lr=1e-4", "train.max_steps=4"]
    straight = tmp_path / "straight"
    with Trainer(tiny(straight, *overrides), progress=False) as trainer:
        assert isinstance(trainer.optimizer, bnb.optim.AdamW8bit)
        before = [p.detach().clone() for p in trainer.params]
        trainer.train()
        states = [trainer.optimizer.state[p] for p in trainer.params]
        big = [s for p, s in zip(trainer.params, states, strict=True) if p.numel() >= 4096]
        assert big and all(s["state1"].dtype == s["state2"].dtype == torch.uint8 for s in big)
        assert all(
            s["absmax1"].numel() == -(-p.numel() // 256)
            for p, s in zip(trainer.params, states, strict=True)
            if "absmax1" in s
        )
        moved = sum(not torch.equal(a, p) for a, p in zip(before, trainer.params, strict=True))
        assert moved == len(before)
    split = tmp_path / "split"
    with Trainer(tiny(split, *overrides), progress=False) as trainer:
        _stop_at(trainer, 2)
        with pytest.raises(Stopped):
            trainer.train()
    with Trainer(tiny(split, *overrides), progress=False) as trainer:
        trainer.train(resume=True)
        loaded = [trainer.optimizer.state[p] for p in trainer.params if p.numel() >= 4096]
        assert loaded and all(s["state1"].dtype == torch.uint8 for s in loaded)  # still one byte
    assert logged(split, "step") == [1, 2, 3, 4]
    losses = logged(straight, "loss")
    assert len(set(losses)) > 1
    assert logged(split, "loss") == pytest.approx(losses, rel=1e-5, abs=1e-7)


def test_adamw8bit_is_refused_in_one_line_where_bitsandbytes_cannot_run_it(tmp_path, monkeypatch):
    import importlib.metadata

    cfg = tiny(tmp_path, "optim.optimizer=adamw8bit")
    with pytest.raises(ConfigError, match="runs on a CUDA GPU or the CPU, not mps"):
        check_optimizer(cfg.optim, "none", torch.device("mps"))
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.45.5")
    with pytest.raises(ConfigError, match="on the CPU needs .*bitsandbytes 0.45.5 is installed"):
        check_optimizer(cfg.optim, "none", torch.device("cpu"))
    check_optimizer(cfg.optim, "none", torch.device("cuda"))  # 0.45 runs it on CUDA


def test_adamw8bit_without_bitsandbytes_names_the_install(tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("built before the optimizer check")

    monkeypatch.setattr(trainer_module, "build_adapter", never)
    monkeypatch.setattr(trainer_module, "build_source", never)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # find_spec: not installed
    cfg = tiny(tmp_path, "optim.optimizer=adamw8bit")
    with pytest.raises(ConfigError) as err:  # refused before any model or data is built
        Trainer(cfg, progress=False)
    message = str(err.value)
    assert "bitsandbytes is not installed" in message and "vipo[bnb]" in message and "\n" not in message
    with pytest.raises(ConfigError, match="bitsandbytes is not installed"):
        check_optimizer(cfg.optim, "none", torch.device("cuda"))


@pytest.mark.gpu
def test_adamw8bit_trains_a_step_on_a_gpu(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    cfg = tiny(tmp_path, "optim.optimizer=adamw8bit", "optim.schedule=cosine", "train.max_steps=3")
    with Trainer(cfg, progress=False) as trainer:
        assert isinstance(trainer.optimizer, bnb.optim.AdamW8bit)
        assert torch.isfinite(trainer.train_step()["loss"])


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["optim.schedule=cosine", "train.max_steps=0"], ["optim.schedule=cosine", "train.max_steps is 0"]),
        (
            ["optim.schedule=linear", "optim.warmup_steps=8", "train.max_steps=8"],
            ["optim.warmup_steps=8", "train.max_steps=8", "optim.schedule=linear"],
        ),
        (["optim.schedule=cosine", "optim.warmup_steps=-1"], ["optim.warmup_steps", ">= 0", "-1"]),
        (
            ["optim.schedule=constant", "optim.warmup_steps=5"],
            ["optim.schedule=constant", "optim.warmup_steps=5"],
        ),
        (["optim.schedule=step"], ["optim.schedule", "'cosine'", "'step'"]),
        (["optim.schedule=cosine_with_restarts", "optim.num_cycles=0"], ["optim.num_cycles", ">= 1"]),
        (["optim.schedule=polynomial", "optim.power=0"], ["optim.power", "> 0"]),
        (["optim.schedule=polynomial", "optim.lr=1e-9"], ["optim.schedule=polynomial", "optim.lr=1e-09"]),
        (["optim.optimizer=sgd"], ["optim.optimizer", "'adamw8bit'", "'sgd'"]),
        (["optim.optimizer=adamw8bit", "parallel.strategy=fsdp"], ["optim.optimizer=adamw8bit", "fsdp"]),
        (["optim.optimizer=adamw8bit", "parallel.strategy=zero2"], ["optim.optimizer=adamw8bit", "zero2"]),
    ],
)
def test_a_bad_schedule_or_optimizer_setting_is_a_config_error_naming_the_key(tmp_path, overrides, names):
    with pytest.raises(ConfigError) as err:
        tiny(tmp_path, *overrides)
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"


def test_the_start_up_memory_check_counts_adamw8bit_state_as_bitsandbytes_allocates_it():
    from vipo.engine.optim import import_bitsandbytes
    from vipo.engine.plan.budget import bytes_to_come

    bnb = import_bitsandbytes()
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (8192, 4096, 4095, 10, 1000 * 257)]
    parts = bytes_to_come(params, "none", "adamw8bit")
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()  # bitsandbytes makes its state at the first step
    allocated = {
        id(t): t.numel() * t.element_size()
        for state in optimizer.state.values()
        for key, t in state.items()
        if torch.is_tensor(t) and not key.startswith("qmap")  # two 256-entry maps, shared by all
    }
    assert parts == {
        "gradients": 4 * sum(p.numel() for p in params),
        "AdamW8bit state": sum(allocated.values()),
    }
    assert bytes_to_come(params, "none")["AdamW state"] == 2 * 4 * sum(p.numel() for p in params)
