"""Convert a beta written in another trainer's convention to vipo's.

vipo follows the official Diffusion-DPO code (SalesforceAIResearch/DiffusionDPO, train.py):
per-sample errors are means over every non-batch element and

    z = -0.5 * beta * ((e_pol[w] - e_pol[l]) - (e_ref[w] - e_ref[l]))

Each convention below was read from the code (or equation) named beside it.
"""

import math

CONVENTIONS = {
    # SalesforceAIResearch/DiffusionDPO train.py: `scale_term = -0.5 * args.beta_dpo;
    # inside_term = scale_term * (model_diff - ref_diff)`, errors `.mean(dim=[1,2,3])`.
    "official": "z = -0.5 * beta * (model_diff - ref_diff), errors averaged over elements",
    # huggingface/diffusers examples/research_projects/diffusion_dpo/train_diffusion_dpo.py (SD1.5):
    # `logits = ref_diff - model_diff; loss = -F.logsigmoid(args.beta_dpo * logits)`, errors
    # averaged over elements. Its beta 2500 is the official 5000.
    "diffusers-sd15": "z = beta * (ref_diff - model_diff), errors averaged over elements",
    # The same folder's train_diffusion_dpo_sdxl.py: `scale_term = -0.5 * args.beta_dpo;
    # inside_term = scale_term * (model_diff - ref_diff)`: the official convention.
    "diffusers-sdxl": "z = -0.5 * beta * (model_diff - ref_diff), errors averaged over elements",
    # The paper's Eq. 4 (and trainers that sum): squared L2 norms, i.e. errors summed over the
    # N elements of a sample, z = -0.5 * beta * (model_diff - ref_diff).
    # Also bghira/SimpleTuner simpletuner/helpers/distillation/flow_dpo/distiller.py (Flow-DPO):
    # `logits = 0.5 * beta * (win_adv + lose_adv)` with `win_adv + lose_adv = ref_diff - model_diff`
    # and errors `.sum(dim=reduction_dims)` under its default `norm_type="sum"` ("mean": official).
    "sum": "z = -0.5 * beta * (model_diff - ref_diff), errors summed over the N elements of a sample",
    # CIntellifusion/VideoDPO lvdm/models/ddpm3d.py `dpo_loss`: the official lines, errors
    # `.mean(dim=[1, 2, 3])` of a [2B, C, F, H, W] latent, which leaves one error per width column:
    # a logit per (pair, column), the loss their mean. Beta as is, on each column as a sample:
    # `pred.movedim(-1, 1).flatten(0, 1)` (and the same for target and ref_pred).
    "videodpo": "z = -0.5 * beta * (model_diff - ref_diff) per (pair, width column), "
    "errors averaged over C, F, H of [2B, C, F, H, W]",
}


def beta_from(convention: str, value: float, *, elements_per_sample: int | None = None) -> float:
    """The vipo (official) beta equal to `value` written in `convention`.

    >>> beta_from("diffusers-sd15", 2500.0)
    5000.0
    >>> beta_from("diffusers-sdxl", 5000.0)
    5000.0
    >>> beta_from("sum", 0.001, elements_per_sample=4 * 64 * 64)
    16.384
    >>> beta_from("videodpo", 5000.0)  # with each width column of the latent a sample (see CONVENTIONS)
    5000.0
    """
    if convention == "diffusers":  # its two scripts differ by a factor of 2
        raise ValueError(
            "beta convention 'diffusers' is ambiguous: diffusers' train_diffusion_dpo.py (SD1.5) writes "
            "z = beta * (ref_diff - model_diff), use 'diffusers-sd15' (beta x 2); its "
            "train_diffusion_dpo_sdxl.py writes the official -0.5 * beta, use 'diffusers-sdxl' (beta as is)"
        )
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown beta convention {convention!r}; known: {', '.join(CONVENTIONS)}")
    if not math.isfinite(value):
        raise ValueError(f"beta must be finite, got {value}")
    if convention in ("official", "diffusers-sdxl", "videodpo"):
        return float(value)
    if convention == "diffusers-sd15":
        return 2.0 * value
    if elements_per_sample is None or elements_per_sample < 1:
        raise ValueError(
            "the 'sum' convention needs elements_per_sample (the number of elements of one "
            "sample's prediction, e.g. C*H*W of the latent)"
        )
    return float(value) * elements_per_sample
