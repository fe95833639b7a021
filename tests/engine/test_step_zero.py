"""Before any update the policy is its reference: z = 0 exactly for every pair, so the loss is
log 2, the margin 0 and no pair counts as won, for every family, precision and reference mode.

With beta in the thousands any difference between the two passes is amplified into a bias: SDXL
with bf16 autocast and the copy reference started at loss 0.596 and accuracy 1.0 when the policy
ran in train mode and its copy in eval mode (a dropout of p = 0 returns a new tensor in train
mode only, the layout of proj_in's input changed, and CPU bf16 GEMMs round by layout).
"""

import math

import pytest
import torch

from vipo.engine.objectives import forward_loss
from vipo.engine.trainer import Trainer

from vipo_testing import tiny_family_config

LOG_2 = math.log(2.0)


def first_step(cfg):
    with Trainer(cfg, progress=False) as trainer:
        batch = trainer.next_batch()
        with trainer.autocast():
            loss, metrics = forward_loss(
                trainer.objective,
                trainer.adapter,
                trainer.strategy.policy,
                trainer.reference,
                batch,
                trainer.noise,
                cfg.loss,
            )
    return loss, metrics


@pytest.mark.parametrize("reference", ["copy", "adapter"])
@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux", "wan"])
def test_the_first_step_has_z_zero_exactly(tmp_path, family, precision, reference):
    extra = ["model.lora_rank=4"] if reference == "adapter" else []
    cfg = tiny_family_config(
        tmp_path,
        family,
        "loss.beta=5000",
        f"train.mixed_precision={precision}",
        f"reference.mode={reference}",
        *extra,
    )
    loss, metrics = first_step(cfg)
    assert float(loss) == float(torch.tensor(LOG_2))  # softplus(0) in float32, exactly
    assert float(metrics["margin"]) == 0.0 and float(metrics["accuracy"]) == 0.0
    assert float(metrics["e_pol_w"]) == float(metrics["e_ref_w"]) and float(metrics["e_pol_l"]) == float(
        metrics["e_ref_l"]
    )


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_the_first_step_from_a_precomputed_table_has_z_zero_exactly(tmp_path, precision):
    from vipo.engine.data.cache import run_cache
    from vipo.engine.reference.precomputed import score_reference

    cfg = tiny_family_config(
        tmp_path / "run",
        "sd15",
        "loss.beta=5000",
        f"train.mixed_precision={precision}",
        f"data.cache={tmp_path / 'cache'}",
        "reference.mode=precomputed",
    )
    run_cache(cfg, pairs_per_shard=8, progress=False)
    score_reference(cfg, 1, progress=False)
    loss, metrics = first_step(cfg)
    assert float(loss) == float(torch.tensor(LOG_2)) and float(metrics["margin"]) == 0.0
