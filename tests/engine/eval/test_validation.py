"""train.validate_every_steps: a sample grid of fixed prompts and seeds and the held-out implicit
accuracy every N steps, in the step's metrics row and the run folder, without changing training."""

import json

import numpy as np
import pytest
from PIL import Image

from vipo.engine.config import ConfigError
from vipo.engine.trainer import Trainer

from vipo_testing import tiny_family_config


def config(tmp_path, name, *overrides):
    steps = ["train.max_steps=4", "train.log_every_steps=4", "optim.lr=1e-3"]
    return tiny_family_config(tmp_path / name, "sd15", *steps, *overrides)


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_validation_logs_a_grid_and_the_held_out_accuracy_and_leaves_training_alone(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    for name, extra in (
        ("plain", []),
        (
            "validated",
            ["train.validate_every_steps=2", f"train.validate_prompts={prompts}", "train.validate_pairs=8"],
        ),
    ):
        with Trainer(config(tmp_path, name, *extra), progress=False) as trainer:
            trainer.train()
    plain, validated = rows(tmp_path / "plain"), rows(tmp_path / "validated")
    # A row at each validation (step 2 is not a log step) with the validation's metrics.
    assert [r["step"] for r in validated] == [2, 4] and [r["step"] for r in plain] == [4]
    for row in validated:
        assert 0.0 <= row["val_accuracy"] <= 1.0 and "val_winner_change" in row
    # The training draws are untouched: the same losses and gradient norms as without validation.
    assert validated[-1]["loss"] == plain[-1]["loss"] and validated[-1]["grad_norm"] == plain[-1]["grad_norm"]
    # One grid per validation, one cell per prompt; the same seeds, other weights: other images.
    grids = [
        np.asarray(Image.open(tmp_path / "validated" / "validation" / f"step-{s:06d}.png")) for s in (2, 4)
    ]
    assert grids[0].shape == grids[1].shape and grids[0].shape[1] > 2 * 16 * 4
    assert not np.array_equal(grids[0], grids[1])


def test_a_run_on_a_diffusers_folder_samples_its_grid_through_the_pipeline_on_the_live_model(tmp_path):
    from vipo_testing import make_sd15_folder

    folder = make_sd15_folder(tmp_path / "sd15")
    path = [f"model.path={folder}", "train.max_steps=2", "train.log_every_steps=2"]
    validated = config(tmp_path, "validated", *path, "train.validate_every_steps=1", "train.validate_pairs=4")
    with Trainer(validated, progress=False) as trainer:
        dtypes = {p.dtype for p in trainer.adapter.text_encoder.parameters()}
        trainer.train()
        assert {p.dtype for p in trainer.adapter.text_encoder.parameters()} == dtypes  # nothing cast
    with Trainer(config(tmp_path, "plain", *path), progress=False) as trainer:
        trainer.train()
    assert rows(tmp_path / "validated")[-1]["loss"] == rows(tmp_path / "plain")[-1]["loss"]
    grids = sorted((tmp_path / "validated" / "validation").glob("step-*.png"))
    assert [g.name for g in grids] == ["step-000001.png", "step-000002.png"]
    assert np.asarray(Image.open(grids[0])).std() > 0  # an image, not a blank


def test_validation_without_a_prompt_file_uses_the_held_out_pairs_prompts(tmp_path):
    cfg = config(tmp_path, "run", "train.validate_every_steps=1", "train.validate_pairs=4")
    with Trainer(cfg, progress=False) as trainer:
        assert len(trainer.validator.prompts) == 4
        assert trainer.validator.prompts == [trainer.validator.pairs[i].prompt for i in range(4)]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.strategy=fsdp"], "strategies none and ddp without context parallelism, not fsdp"),
        (["train.validate_pairs=-1"], "must be >= 0"),
    ],
)
def test_validation_settings_are_checked(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, "run", "train.validate_every_steps=2", *overrides)
