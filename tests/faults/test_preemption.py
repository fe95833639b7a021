"""Preemption and kills: SIGTERM (a cluster's time limit, `docker stop`), Ctrl-C and SLURM's
`--signal` save a checkpoint at the next step boundary and end with a clear line and 128 + the
signal; under torchrun every rank saves the same step; a rank killed with SIGKILL ends the run
in bounded time with the last checkpoint whole. Each resume gives the losses of an uninterrupted
run.
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vipo.engine.config import load_config
from vipo.engine.integrity import check
from vipo.engine.trainer import Trainer

RECIPE = """\
model: {config: sd15-tiny}
data: {num_pairs: 64, resolution: 16}
loss: {beta: 500.0}
optim: {lr: 1.0e-4}
train: {batch_pairs: 2, max_steps: 200, log_every_steps: 1}
"""


def env() -> dict:
    keep = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTEST_CURRENT_TEST")
    }
    return {
        **keep,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TRITON_INTERPRET": "1",
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    log = open(cwd / "log.txt", "w")
    return subprocess.Popen(
        args, cwd=cwd, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_for_rows(proc: subprocess.Popen, run: Path, count: int, timeout: float = 420) -> None:
    deadline = time.monotonic() + timeout
    while len(rows(run)) < count:
        assert proc.poll() is None, (
            f"the run ended early ({proc.returncode}): {(run.parent / 'log.txt').read_text()[-3000:]}"
        )
        assert time.monotonic() < deadline, "no metrics in time"
        time.sleep(0.05)


def uninterrupted(tmp_path: Path, steps: int, *overrides) -> list[dict]:
    """The same recipe trained in one go, with one thread as the launched processes use."""
    run = tmp_path / "whole"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(
            tmp_path / "recipe.yaml", [f"train.output_dir={run}", f"train.max_steps={steps}", *overrides]
        )
        with Trainer(cfg, progress=False) as trainer:
            trainer.train()
    finally:
        torch.set_num_threads(threads)
    return rows(run)


def assert_same_losses(got: list[dict], expected: list[dict]) -> None:
    by_step = {r["step"]: r for r in got}
    assert sorted(by_step) == [r["step"] for r in expected], "one row per step, none twice"
    for ref in expected:
        for key in ("loss", "grad_norm"):
            assert by_step[ref["step"]][key] == pytest.approx(ref[key], rel=2e-4, abs=1e-6), (
                ref["step"],
                key,
            )


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_stop_signal_saves_at_the_step_boundary_and_the_resume_continues_exactly(recipe, tmp_path, signum):
    run = tmp_path / "run"
    train = [sys.executable, "-m", "vipo.engine", "train", str(recipe), f"train.output_dir={run}", "-q"]
    proc = start(train, tmp_path)
    wait_for_rows(proc, run, 3)
    proc.send_signal(signum)
    proc.wait(timeout=120)
    output = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 128 + signum, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    stopped = [line for line in output.splitlines() if f"stopped by {signum.name}" in line]
    assert len(stopped) == 1 and "continue with --resume" in stopped[0], output[-3000:]
    step = int(stopped[0].split(" at step ")[1].split()[0])
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
    assert latest.name == f"step-{step:06d}" and check(latest) is None
    resumed = subprocess.run(
        [*train[:5], f"train.output_dir={run}", f"train.max_steps={step + 2}", "-q", "--resume"],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_losses(rows(run), uninterrupted(tmp_path, step + 2))


def test_without_periodic_checkpoints_the_start_warns_and_timed_checkpoints_save(recipe, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        cfg = load_config(recipe, [f"train.output_dir={tmp_path / 'a'}", "train.max_steps=1"])
        with Trainer(cfg, progress=False) as trainer:
            trainer.train()
    assert "a crash loses the run's progress" in caplog.text
    caplog.clear()
    # Every 30 ms: each of the 3 steps of this run is due.
    cfg = load_config(
        recipe,
        [f"train.output_dir={tmp_path / 'b'}", "train.max_steps=3", "train.checkpoint_every_minutes=0.0005"],
    )
    with caplog.at_level(logging.WARNING), Trainer(cfg, progress=False) as trainer:
        trainer.train()
    assert "a crash loses" not in caplog.text
    saved = sorted(p.name for p in (tmp_path / "b" / "checkpoints").glob("step-*"))
    assert len(saved) >= 2 and saved[-1] == "step-000003"


def torchrun(*args: str) -> list[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        f"--master_port={port}",
        *args,
    ]


# DDP only: the stop step is agreed over the process group whatever the strategy, and DeepSpeed's
# own save and resume are tested in test_parallel (two more DeepSpeed start-ups here cost over
# two minutes of CI's 2 cores).
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp"])
def test_sigterm_to_torchrun_saves_the_same_step_on_every_rank_and_resumes_exactly(
    recipe, tmp_path, strategy
):
    run = tmp_path / "run"
    common = [
        "-m",
        "vipo.engine",
        "train",
        str(recipe),
        f"train.output_dir={run}",
        f"parallel.strategy={strategy}",
        "train.batch_pairs=4",
    ]
    proc = start(torchrun(*common, "-q"), tmp_path)
    wait_for_rows(proc, run, 2)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
    proc.wait(timeout=120)
    output = (tmp_path / "log.txt").read_text()
    assert proc.returncode != 0  # torchrun reports its workers' stop as a failure
    stopped = [line for line in output.splitlines() if "stopped by SIGTERM" in line]
    assert len(stopped) == 1, output[-4000:]  # rank 0 alone speaks
    step = int(stopped[0].split(" at step ")[1].split()[0])
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
    assert latest.name == f"step-{step:06d}" and check(latest) is None
    resumed = subprocess.run(
        torchrun(*common, f"train.max_steps={step + 2}", "-q", "--resume"),
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_losses(rows(run), uninterrupted(tmp_path, step + 2, "train.batch_pairs=4"))


@pytest.mark.slow
def test_a_rank_killed_mid_run_ends_the_run_and_the_last_checkpoint_resumes_exactly(recipe, tmp_path):
    run = tmp_path / "run"
    common = [
        "-m",
        "vipo.engine",
        "train",
        str(recipe),
        f"train.output_dir={run}",
        "parallel.strategy=fsdp",
        "train.batch_pairs=4",
        "train.checkpoint_every_steps=2",
    ]
    proc = start(torchrun(*common, "-q"), tmp_path)
    wait_for_rows(proc, run, 5)
    workers = subprocess.run(
        ["pgrep", "-f", "-P", str(proc.pid), "vipo.engine"], capture_output=True, text=True
    )
    pids = [int(p) for p in workers.stdout.split()]
    assert len(pids) == 2, workers.stdout
    os.kill(pids[-1], signal.SIGKILL)
    began = time.monotonic()
    proc.wait(timeout=180)
    assert proc.returncode != 0 and time.monotonic() - began < 180
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
    assert check(latest) is None  # whole, whatever the kill interrupted
    step = int(latest.name.split("-")[1])
    resumed = subprocess.run(
        torchrun(*common, f"train.max_steps={step + 2}", "-q", "--resume"),
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not list((run / "checkpoints").glob(".step-*"))  # a save the kill interrupted is cleared
    expected = uninterrupted(tmp_path, step + 2, "train.batch_pairs=4")
    got = [r for r in rows(run) if r["step"] <= step + 2]
    assert_same_losses(got, expected)


@pytest.mark.slow
def test_a_cache_build_with_a_rank_killed_completes_on_rerun_with_the_same_shards(recipe, tmp_path):
    """`vipo cache` on 2 ranks (torchrun sets RANK / WORLD_SIZE), one killed mid-build: the rerun
    keeps every finished shard, rebuilds the rest, and the cache equals one built in one go."""
    from safetensors import safe_open

    from vipo.engine.data.cache import open_cache

    def contents(folder: Path) -> dict:
        found = {}
        for shard in sorted(folder.glob("shard-*.safetensors")):
            with safe_open(str(shard), framework="pt") as handle:
                found[shard.name] = {key: handle.get_tensor(key).clone() for key in handle.keys()}
        return found

    cache = tmp_path / "cache"
    command = [
        "-m",
        "vipo.engine",
        "cache",
        str(recipe),
        f"data.cache={cache}",
        "data.num_pairs=1000",  # ~1.5 s of encoding at 16 px: the kill lands mid-build
        "--pairs-per-shard",
        "8",
        "-q",
    ]
    proc = start(torchrun(*command), tmp_path)
    deadline = time.monotonic() + 240
    while len(list(cache.glob("shard-*.safetensors"))) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
        time.sleep(0.01)
    workers = subprocess.run(
        ["pgrep", "-f", "-P", str(proc.pid), "vipo.engine"], capture_output=True, text=True
    )
    os.kill(int(workers.stdout.split()[-1]), signal.SIGKILL)
    proc.wait(timeout=180)
    finished = {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*.safetensors")}
    assert 3 <= len(finished) < 125
    rerun = subprocess.run(
        [sys.executable, *command], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0 and "is complete" in rerun.stdout, rerun.stderr[-3000:]
    assert {name: (cache / name).stat().st_mtime_ns for name in finished} == finished  # kept, not rewritten
    clean = tmp_path / "clean"
    once = subprocess.run(
        [sys.executable, *command[:4], f"data.cache={clean}", *command[5:]],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert once.returncode == 0, once.stderr[-3000:]
    got, expected = contents(cache), contents(clean)
    assert got.keys() == expected.keys() and len(got) == 125
    for name in expected:
        assert got[name].keys() == expected[name].keys()
        assert all(torch.equal(got[name][k], expected[name][k]) for k in expected[name]), name
    cfg = load_config(recipe, [f"data.cache={cache}", "data.num_pairs=1000"])
    assert len(open_cache(cfg)) == 1000
