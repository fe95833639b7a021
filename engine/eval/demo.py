"""`vipo demo`: the paper's two stages on a tiny SD-style model, on CPU, in a few minutes.

Data: procedural pairs about a shape, its colour and its position; the winner follows the
prompt, the loser breaks one attribute (`data.regime` noisy / shuffled give the paper's
conflicting and over-simple regimes). Model: the tiny SD1.5-shaped UNet of
configs/models/sd15-tiny.json, random weights, pixel space. Stage 1 fine-tunes on winners
only (SFT); stage 2 runs Poly-DPO with policy and reference both starting from stage 1.

The report folder holds the curves, a sample grid before and after the preference stage,
and the held-out preference accuracy: the share of clean held-out pairs whose winner the
policy's implicit reward ranks above the loser (0.5 at the start of stage 2, where the policy
is the reference).
"""

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from vipo.loaders.procedural import ProceduralPairs

from ..checkpoint import latest_checkpoint
from ..config import DemoConfig, RunConfig, to_dict
from ..trainer import Trainer
from .evaluate import held_out_accuracy
from .report import image_grid, metric_series, plot_stages, read_metrics
from .sampling import ddim_sample

log = logging.getLogger(__name__)


def _stage_configs(cfg: RunConfig, demo: DemoConfig, out: Path) -> tuple[RunConfig, RunConfig]:
    replace = dataclasses.replace
    sft = replace(
        cfg,
        loss=replace(cfg.loss, objective="sft", winners_only=True),
        optim=replace(cfg.optim, lr=demo.sft_lr),
        reference=replace(cfg.reference, mode="copy"),
        model=replace(cfg.model, lora_rank=0),
        train=replace(
            cfg.train, max_steps=demo.sft_steps, output_dir=str(out / "sft"), checkpoint_every_steps=0
        ),
    )
    dpo = replace(cfg, train=replace(cfg.train, output_dir=str(out / "dpo")))
    return sft, dpo


def held_out_pairs(cfg: RunConfig, demo: DemoConfig) -> ProceduralPairs:
    """Clean pairs drawn with the run's seed + 1: never trained on, whatever the training regime."""
    return ProceduralPairs(demo.held_out_pairs, cfg.data.resolution, "clean", seed=cfg.train.seed + 1)


def stage_two_config(cfg: RunConfig, demo: DemoConfig, out: Path) -> RunConfig:
    """Stage 2's run (in out/dpo): policy and reference both start from out/sft's last checkpoint."""
    checkpoint = latest_checkpoint(out / "sft")
    if checkpoint is None:
        raise FileNotFoundError(f"no stage 1 checkpoint in {out / 'sft'}")
    dpo = _stage_configs(cfg, demo, out)[1]
    return dataclasses.replace(dpo, model=dataclasses.replace(dpo.model, init_from=str(checkpoint)))


def train_stage_one(cfg: RunConfig, demo: DemoConfig, out: Path, *, progress: bool = True) -> dict:
    """Stage 1, SFT on winners, in out/sft (a fresh folder); its training summary."""
    sft_cfg = _stage_configs(cfg, demo, out)[0]
    log.info("stage 1: SFT on winners, %d steps", sft_cfg.train.max_steps)
    with Trainer(sft_cfg, progress=progress) as trainer:
        return trainer.train()


def plot_demo_curves(cfg: RunConfig, out: Path, png: Path, demo: DemoConfig | None = None) -> Path:
    """Both stages on one page: stage 1's SFT loss over stage 2's loss, accuracy, margin and
    winner error change, each stage under its own heading (from out/sft and out/dpo)."""
    demo = demo or DemoConfig()
    objective = f"{cfg.loss.objective} (alpha {cfg.loss.alpha:g}, beta {cfg.loss.beta:g})"
    sft_rows, dpo_rows = read_metrics(out / "sft"), read_metrics(out / "dpo")
    stages = {
        f"Stage 1: SFT on winners, {demo.sft_steps} steps": metric_series(sft_rows, ["loss"]),
        f"Stage 2: {objective} from stage 1, {cfg.train.max_steps} steps": metric_series(
            dpo_rows, ["loss", "accuracy", "margin", "winner_change"]
        ),
    }
    return plot_stages(stages, png, title=f"vipo demo: SFT then {objective}")


def run_demo(cfg: RunConfig, demo: DemoConfig | None = None, *, progress: bool = True) -> dict:
    """Stage 1 SFT on winners, stage 2 the recipe's objective from stage 1's weights; the report."""
    demo = demo or DemoConfig()
    out = Path(cfg.train.output_dir)
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    for stage in (out / "sft", out / "dpo"):  # the demo starts over: its own earlier stage runs go
        if stage.exists():
            log.info("replacing the earlier demo run in %s", stage)
            shutil.rmtree(stage)

    train_stage_one(cfg, demo, out, progress=progress)
    dpo_cfg = stage_two_config(cfg, demo, out)

    log.info(
        "stage 2: %s (alpha %g, beta %g), %d steps",
        cfg.loss.objective,
        cfg.loss.alpha,
        cfg.loss.beta,
        cfg.train.max_steps,
    )
    trainer = Trainer(dpo_cfg, progress=progress)
    held_out = held_out_pairs(cfg, demo)
    before = held_out_accuracy(trainer.adapter, trainer.reference, held_out)
    prompts = [held_out[i].prompt for i in range(min(demo.sample_prompts, len(held_out)))]
    shape = (trainer.adapter.network.config.in_channels, cfg.data.resolution, cfg.data.resolution)
    samples_before = ddim_sample(
        trainer.adapter, trainer.adapter.network, prompts, shape, seed=cfg.train.seed
    )
    summary = trainer.train()
    after = held_out_accuracy(trainer.adapter, trainer.reference, held_out)
    samples_after = ddim_sample(trainer.adapter, trainer.adapter.network, prompts, shape, seed=cfg.train.seed)

    plot_demo_curves(cfg, out, report / "curves.png", demo)
    image_grid(
        [np.stack([held_out[i].winner for i in range(len(prompts))]), samples_before, samples_after],
        ["prompt's winner", "after SFT", f"after {cfg.loss.objective}"],
        report / "samples.png",
        col_labels=prompts,
    )
    result = {
        "held_out_accuracy_before": before["accuracy"],
        "held_out_accuracy_after": after["accuracy"],
        "held_out_pairs": after["pairs"],
        "winner_change_after": after["winner_change"],
        "loser_change_after": after["loser_change"],
        "stage2_last": summary["last"],
        "stage2_seconds": summary["seconds"],
        "report": str(report),
        "config": {**to_dict(cfg), "demo": to_dict(demo)},
    }
    (report / "summary.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result
