"""The paper's recipes: each loads, and says what the paper says (batch, LR, steps, beta, alpha)."""

import pytest

from vipo.configs import builtin_recipes, find_recipe
from vipo.engine.config import load_config

# recipe: (objective, pairs per optimizer step, base LR, steps, beta, alpha), from the paper's appendix
PAPER = {
    "sd15-pickapic-poly": ("poly_dpo", 512, 4e-9, 4500, 5000.0, 8.0),
    "vipo-sd15-sft": ("sft", 512, 4e-9, 8000, None, None),
    "vipo-sd15-poly": ("poly_dpo", 512, 1e-9, 8000, 500.0, 0.0),
    "vipo-sdxl-sft": ("sft", 512, 2e-9, 4000, None, None),
    "vipo-sdxl-poly": ("poly_dpo", 512, 5e-10, 4000, 1000.0, 0.0),
    "vipo-sd35m-sft": ("sft", 2048, 1e-8, 4000, None, None),
    "vipo-sd35m-poly": ("poly_dpo", 512, 5e-9, 2000, 500.0, 0.0),
    "vipo-flux-sft": ("sft", 2048, 1e-9, 4000, None, None),
    "vipo-flux-poly": ("poly_dpo", 512, 5e-9, 2000, 500.0, 0.0),
    "vipo-wan-poly": ("poly_dpo", 256, 1e-8, 2000, 500.0, 0.0),
}


def test_every_paper_recipe_is_built_in():
    assert set(PAPER) <= set(builtin_recipes())


@pytest.mark.parametrize("name", sorted(PAPER))
def test_a_recipe_matches_the_paper(name):
    cfg = load_config(find_recipe(name))
    objective, batch, lr, steps, beta, alpha = PAPER[name]
    assert cfg.loss.objective == objective
    assert cfg.train.batch_pairs * cfg.train.grad_accum_steps == batch
    assert cfg.optim.lr == pytest.approx(lr) and cfg.optim.scale_lr
    assert cfg.train.max_steps == steps
    if beta is not None:
        assert (cfg.loss.beta, cfg.loss.alpha) == (beta, alpha)
    assert cfg.model.path and cfg.data.path  # real weights and data, pointed at local copies


@pytest.mark.parametrize(
    "name",
    [n for n in sorted(PAPER) if n.endswith("-poly") and n.startswith("vipo-") and n != "vipo-wan-poly"],
)
def test_vipo_stage_two_starts_from_stage_one(name):
    cfg = load_config(find_recipe(name))
    sft = load_config(find_recipe(name.replace("-poly", "-sft")))
    assert cfg.model.init_from == f"{sft.train.output_dir}/checkpoints/step-{sft.train.max_steps:06d}"
    assert (cfg.model.family, cfg.model.path) == (sft.model.family, sft.model.path)
