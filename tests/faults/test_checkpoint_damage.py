"""Damaged, missing and half-written checkpoints: no work is lost, nothing wrong is loaded, and
each case ends in one line naming the file.

One template run is trained once (4 steps, checkpoints at steps 2 and 4); each test copies it and
breaks something. "Falls back" means: a warning names the damaged file, the run resumes from the
previous good checkpoint, and its losses equal those of an uninterrupted run step for step.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vipo.engine.config import load_config
from vipo.engine.errors import RunError
from vipo.engine.integrity import check, resolve_checkpoint
from vipo.engine.stopping import RunFolder
from vipo.engine.trainer import Trainer

from vipo_testing import changed, snapshot

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRITON_INTERPRET": "1",
    "DS_ACCELERATOR": "cpu",
}
RECIPE = """\
model: {config: sd15-tiny}
data: {num_pairs: 16, resolution: 16}
loss: {beta: 500.0}
optim: {lr: 1.0e-4}
train: {batch_pairs: 2, max_steps: 6, log_every_steps: 1, checkpoint_every_steps: 2}
"""


def config(out: Path, *overrides):
    recipe = out.parent / f"{out.name}.yaml"
    recipe.write_text(RECIPE)
    return load_config(recipe, [f"train.output_dir={out}", *overrides])


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("template") / "run"
    with Trainer(config(run, "train.max_steps=4"), progress=False) as trainer:
        trainer.train()
    return run


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict]:
    run = tmp_path_factory.mktemp("whole") / "run"
    with Trainer(config(run), progress=False) as trainer:
        trainer.train()
    return rows(run)


@pytest.fixture
def run(template, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(template, copy)
    (tmp_path / "run.yaml").write_text(RECIPE)
    return copy


def resume(run: Path) -> dict:
    with Trainer(config(run), progress=False) as trainer:
        return trainer.train(resume=True)


def assert_continues_like_uninterrupted(run: Path, uninterrupted: list[dict], from_step: int) -> None:
    got = {r["step"]: r for r in rows(run)}
    assert sorted(got) == list(range(1, 7)), "one row per step, none twice"
    for ref in uninterrupted:
        if ref["step"] > from_step:
            assert got[ref["step"]]["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-7), ref["step"]
            assert got[ref["step"]]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), ref["step"]


def vipo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vipo.engine", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


# -- latest -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pointer", ["missing", "dangling", "garbage"])
def test_a_missing_or_dangling_latest_resumes_from_the_newest_complete_checkpoint(
    run, uninterrupted, pointer, caplog
):
    latest = run / "checkpoints" / "latest"
    if pointer == "missing":
        latest.unlink()
    elif pointer == "dangling":
        latest.write_text("step-000009")
    else:
        latest.write_bytes(os.urandom(64))
    before = (run / "checkpoints" / "step-000004" / "model.safetensors").read_bytes()
    with caplog.at_level(logging.WARNING):
        summary = resume(run)
    assert summary["steps_this_run"] == 2  # from step 4, not from 0
    assert "newest complete checkpoint" in caplog.text
    assert_continues_like_uninterrupted(run, uninterrupted, from_step=4)
    # Nothing was overwritten on the way: step 4 is the file it was.
    assert (run / "checkpoints" / "step-000004" / "model.safetensors").read_bytes() == before


def test_a_fresh_run_refuses_a_folder_that_holds_checkpoints(run):
    before = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    with (
        Trainer(config(run), progress=False) as trainer,
        pytest.raises(RunError, match=r"already holds .*--resume"),
    ):
        trainer.train()
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == before


# -- integrity ----------------------------------------------------------------------------------

FILES = ("model.safetensors", "optimizer.pt", "rng.safetensors", "state.json", "config.yaml", "manifest.json")


def damage(file: Path, how: str) -> None:
    data = file.read_bytes()
    if how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "zeroed":
        file.write_bytes(bytes(len(data)))
    elif how == "deleted":
        file.unlink()
    elif how == "flipped":  # 256 bytes in the middle, size unchanged
        mid = len(data) // 2
        file.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 256]) + data[mid + 256 :])
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated", "zeroed", "deleted", "flipped"])
@pytest.mark.parametrize("name", FILES)
def test_every_damaged_file_is_named_and_the_previous_checkpoint_is_used(run, name, how, caplog):
    newest = run / "checkpoints" / "step-000004"
    damage(newest / name, how)
    assert check(newest) is not None
    with caplog.at_level(logging.WARNING):
        found = resolve_checkpoint(run)
    assert found == run / "checkpoints" / "step-000002"
    warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warnings) == 1 and name in warnings[0] and "step-000004" in warnings[0]
    # Moved aside: no later save overwrites it, no later resume picks it.
    assert not newest.exists() and (run / "checkpoints" / "step-000004.damaged").is_dir()


def test_flipped_weights_resume_from_the_previous_checkpoint_with_one_warning(run, uninterrupted):
    """The case found: 256 flipped bytes resumed into a loss of 7.3e6 with exit status 0."""
    damage(run / "checkpoints" / "step-000004" / "model.safetensors", "flipped")
    proc = vipo(
        "train", str(run.parent / "run.yaml"), f"train.output_dir={run}", "--resume", "-q", cwd=run.parent
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "damaged" in line]
    assert len(warned) == 1 and "model.safetensors" in warned[0] and "SHA-256" in warned[0], proc.stderr[
        -2000:
    ]
    assert_continues_like_uninterrupted(run, uninterrupted, from_step=2)


def test_when_no_checkpoint_passes_the_run_stops_in_one_line(run):
    for step in ("step-000002", "step-000004"):
        damage(run / "checkpoints" / step / "optimizer.pt", "zeroed")
    proc = vipo(
        "train", str(run.parent / "run.yaml"), f"train.output_dir={run}", "--resume", "-q", cwd=run.parent
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vipo: error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (
        len(errors) == 1
        and "no checkpoint passes its integrity check" in errors[0]
        and "optimizer.pt" in errors[0]
    )


def test_export_and_init_from_check_integrity_too(run, tmp_path):
    damage(run / "checkpoints" / "step-000004" / "model.safetensors", "flipped")
    # A run folder: the newest good checkpoint, with a warning; the run folder is not modified.
    proc = vipo("export", str(run), "--out", str(tmp_path / "exported"), cwd=tmp_path)
    assert proc.returncode == 0 and "model.safetensors" in proc.stderr, proc.stderr[-3000:]
    assert (run / "checkpoints" / "step-000004").is_dir()
    # A damaged checkpoint named explicitly: refused, naming the file.
    step = run / "checkpoints" / "step-000004"
    with pytest.raises(
        RunError, match=r"model.init_from: checkpoint .*step-000004 is damaged .*model.safetensors"
    ):
        Trainer(config(tmp_path / "stage2", f"model.init_from={step}"), progress=False)
    proc = vipo("export", str(run), "--step", "4", "--out", str(tmp_path / "exported4"), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "model.safetensors" in proc.stderr


def test_a_legacy_checkpoint_without_a_manifest_still_resumes(run, uninterrupted, caplog):
    for step in ("step-000002", "step-000004"):
        folder = run / "checkpoints" / step
        (folder / "manifest.json").unlink()
        state = json.loads((folder / "state.json").read_text())
        del state["manifest"]
        (folder / "state.json").write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING):
        resume(run)
    assert "without a manifest" in caplog.text
    assert_continues_like_uninterrupted(run, uninterrupted, from_step=4)


# -- leftovers ----------------------------------------------------------------------------------


def test_partial_saves_of_dead_writers_are_cleared_and_a_moved_aside_checkpoint_is_restored(run):
    root = run / "checkpoints"
    (root / ".step-000006.tmp-4242").mkdir()
    (root / ".step-000006.tmp-4242" / "model.safetensors").write_bytes(os.urandom(4096))
    (root / ".step-000006.tmp").mkdir()  # a sharded save's temporary
    (root / ".latest.tmp-4242").write_text("step-000006")
    # A save of step 4 again that died between its two renames: the old step 4 is the only copy.
    os.replace(root / "step-000004", root / ".step-000004.old-4242")
    with RunFolder(run):
        pass
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002", "step-000004"]
    assert check(root / "step-000004") is None


def test_a_second_run_cannot_train_in_a_folder_in_use(run):
    with RunFolder(run), pytest.raises(RunError, match=r"in use by another run \(pid \d+"):
        with RunFolder(run):
            pass


def test_a_resume_drops_the_rows_logged_after_the_last_checkpoint_and_a_torn_line(run, uninterrupted):
    # The stopped run logged step 5 (and half of step 6) after its step-4 checkpoint.
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"step": 5, "loss": 123.0}) + "\n" + '{"step": 6, "lo')
    resume(run)
    assert_continues_like_uninterrupted(run, uninterrupted, from_step=4)


# -- non-finite steps ---------------------------------------------------------------------------


def test_a_resume_after_a_non_finite_stop_starts_from_the_last_good_checkpoint(
    run, monkeypatch, uninterrupted
):
    from vipo.engine import trainer as trainer_module

    real = trainer_module.forward_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls["n"] += 1
        return loss * float("nan"), {**metrics, "loss": metrics["loss"] * float("nan")}

    monkeypatch.setattr(trainer_module, "forward_loss", poisoned)
    with Trainer(config(run, "train.max_nonfinite_steps=2"), progress=False) as trainer:
        with pytest.raises(RunError, match="2 non-finite steps in a row at step 6"):
            trainer.train(resume=True)
    assert (run / "checkpoints" / "latest").read_text() == "step-000004"
    assert (run / "checkpoints" / "step-000006.nonfinite").is_dir()
    monkeypatch.setattr(trainer_module, "forward_loss", real)
    with Trainer(config(run), progress=False) as trainer:
        trainer.train(resume=True)
        assert trainer.nonfinite_total == 0 and trainer.nonfinite_in_row == 0  # the poisoned steps are gone
    got = {r["step"]: r for r in rows(run)}
    assert got[6]["loss"] == pytest.approx(uninterrupted[5]["loss"], rel=1e-5)


def test_a_non_finite_gradient_norm_with_a_finite_loss_skips_the_update(tmp_path):
    with Trainer(config(tmp_path / "run", "train.max_steps=1"), progress=False) as trainer:
        param = next(p for p in trainer.network.parameters() if p.requires_grad)
        param.register_hook(lambda grad: grad * float("inf"))
        before = snapshot(trainer.network)
        metrics = trainer.train_step()
        assert torch.isfinite(metrics["loss"]) and not torch.isfinite(metrics["grad_norm"])
        assert not changed(before, trainer.network)
        assert trainer.nonfinite_total == 1 and trainer.nonfinite_in_row == 1


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_says_so(run, monkeypatch, uninterrupted):
    import errno

    from vipo.engine import checkpoint as checkpoint_module

    real = checkpoint_module.save_file

    def full(tensors, path, *args, **kwargs):
        if Path(path).name == "rng.safetensors":  # model.safetensors already written: mid-save
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", full)
    with Trainer(config(run), progress=False) as trainer:
        with pytest.raises(
            RunError, match=r"step 6 .* failed \(No space left on device\); the previous checkpoint"
        ):
            trainer.train(resume=True)
    assert (run / "checkpoints" / "latest").read_text() == "step-000004"
    assert check(run / "checkpoints" / "step-000004") is None
    assert list((run / "checkpoints").glob(".step-000006.tmp-*"))  # the partial save, until the next start
    monkeypatch.setattr(checkpoint_module, "save_file", real)
    resume(run)
    assert not list((run / "checkpoints").glob(".step-*"))
    assert_continues_like_uninterrupted(run, uninterrupted, from_step=4)
