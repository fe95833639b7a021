"""Each peer trainer's own Diffusion-DPO loss lines against vipo with `beta_from` of its beta.

Every `*_lines` function below holds the loss lines of one script, copied from the file named in
its docstring and changed only to take tensors as arguments and to run in float64 (`.float()`
there is `.double()` here). The README's table of these conventions is checked to list every
key of `CONVENTIONS`.
"""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vipo.kernels import beta_from, reference
from vipo.kernels.conventions import CONVENTIONS

README = Path(__file__).resolve().parents[2] / "kernels" / "README.md"
TABLE_HEADING = "## Beta conventions of other trainers"
RTOL = 1e-10


def official_lines(model_pred, ref_pred, target, beta_dpo):
    """SalesforceAIResearch/DiffusionDPO train.py (run by launchers/sd15.sh and, with --sdxl, by
    launchers/sdxl.sh: the loss has no SDXL branch)."""
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    loss = -1 * F.logsigmoid(inside_term).mean()
    return loss, inside_term


def diffusers_sd15_lines(model_pred, ref_preds, target, beta_dpo, loss_type="sigmoid"):
    """huggingface/diffusers examples/research_projects/diffusion_dpo/train_diffusion_dpo.py.
    Returns its z, `beta_dpo * logits`."""
    model_losses = F.mse_loss(model_pred.double(), target.double(), reduction="none")
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_loss = F.mse_loss(ref_preds.double(), target.double(), reduction="none")
    ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
    ref_losses_w, ref_losses_l = ref_loss.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    logits = ref_diff - model_diff
    if loss_type == "sigmoid":
        loss = -1 * F.logsigmoid(beta_dpo * logits).mean()
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta_dpo * logits).mean()
    # Its "ipo" branch reads `args.beta`, which the script never defines: not run here.
    return loss, beta_dpo * logits


def diffusers_sdxl_lines(model_pred, ref_preds, target, beta_dpo):
    """huggingface/diffusers examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py."""
    model_losses = F.mse_loss(model_pred.double(), target.double(), reduction="none")
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_loss = F.mse_loss(ref_preds.double(), target.double(), reduction="none")
    ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
    ref_losses_w, ref_losses_l = ref_loss.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    loss = -1 * F.logsigmoid(inside_term).mean()
    return loss, inside_term


def simpletuner_lines(
    policy_win, policy_lose, ref_win, ref_lose, win_target, lose_target, beta, norm_type, mask
):
    """bghira/SimpleTuner simpletuner/helpers/distillation/flow_dpo/distiller.py,
    `compute_distill_loss` and `_per_sample_error` ("sum" and "mean"; `beta` is the value its
    `_beta_for_margin` returns: the configured one with auto_beta off, else picked per step)."""

    def _per_sample_error(prediction, target, mask):
        error = (prediction.double() - target.double()).pow(2)
        if mask is not None:
            mask_float = mask.double()
            error = error * mask_float
        reduction_dims = tuple(range(1, error.dim()))
        if norm_type == "sum":
            return error.sum(dim=reduction_dims)
        if norm_type == "mean":
            return error.mean(dim=reduction_dims)
        raise NotImplementedError(norm_type)

    policy_win_err = _per_sample_error(policy_win, win_target, mask)
    ref_win_err = _per_sample_error(ref_win, win_target, mask)
    policy_lose_err = _per_sample_error(policy_lose, lose_target, mask)
    ref_lose_err = _per_sample_error(ref_lose, lose_target, mask)
    win_adv = ref_win_err - policy_win_err
    lose_adv = policy_lose_err - ref_lose_err
    margin = win_adv + lose_adv
    logits = 0.5 * beta * margin.double()
    dpo_loss = -F.logsigmoid(logits).mean()
    return dpo_loss, logits


def videodpo_lines(pred, ref_pred, target, beta_dpo, dupfactor):
    """CIntellifusion/VideoDPO lvdm/models/ddpm3d.py, `dpo_loss` (the loss it returns; with the
    shipped `logvar_init=0.0`, `l_simple_weight=1.0` p_losses passes it on unchanged)."""
    model_losses = (pred - target).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    factor = dupfactor
    loss = (-1 * factor * F.logsigmoid(inside_term)).mean()
    return loss, inside_term, implicit_acc


def _batch(pairs, shape, vipo_beta, per_sample):
    """float64 policy, reference, target [2B, *shape], the policy near the reference, scaled so
    that vipo's z = -0.5 * vipo_beta * d is of order 1 (a saturated loss would hide a wrong
    factor); `per_sample` is the element count each error averages over."""
    # d is about 3 * spread * scale / sqrt(per_sample): z about 1.5 * vipo_beta * that.
    spread = min(0.5, per_sample**0.5 / vipo_beta)
    scale = per_sample**0.5 / (vipo_beta * spread)
    target = torch.randn(2 * pairs, *shape, dtype=torch.float64)
    ref = target + scale * torch.randn_like(target)
    policy = ref + spread * torch.randn_like(target)
    return policy, ref, target


def _assert_same(run, beta, loss, z):
    """vipo's loss and z (`run(beta)`) against the peer's, to 1e-10 relative (z: to its largest
    |z|); and `run` with beta off by a factor of 2 either way is refused by the same test."""
    z = z.reshape(-1)
    ours = run(beta)
    assert ours.loss.dtype == torch.float64 and ours.logits.shape == z.shape
    assert 0.05 < z.abs().max().item() < 100.0, z  # neither vanishing nor saturated
    assert abs(ours.loss.item() - loss.item()) <= RTOL * abs(loss.item()), (ours.loss.item(), loss.item())
    assert (ours.logits - z).abs().max().item() <= RTOL * z.abs().max().item(), (ours.logits, z)
    for wrong in (0.5 * beta, 2.0 * beta):
        assert abs(run(wrong).loss.item() - loss.item()) > 1e3 * RTOL * abs(loss.item()), wrong


def _vipo(policy, ref, target, **kwargs):
    return lambda beta: reference.poly_dpo_loss(policy, target, ref_pred=ref, beta=beta, alpha=0.0, **kwargs)


@pytest.mark.parametrize(
    "convention, lines, beta_dpo",
    [
        ("official", official_lines, 5000.0),  # launchers/sd15.sh, launchers/sdxl.sh: --beta_dpo 5000
        ("diffusers-sd15", diffusers_sd15_lines, 2500.0),  # its --beta_dpo default
        ("diffusers-sdxl", diffusers_sdxl_lines, 5000.0),  # its --beta_dpo default
    ],
)
def test_image_scripts_equal_vipo_with_converted_beta(seed, convention, lines, beta_dpo):
    beta = beta_from(convention, beta_dpo)
    policy, ref, target = _batch(3, (4, 8, 8), beta, per_sample=4 * 8 * 8)
    loss, z = lines(policy, ref, target, beta_dpo)
    _assert_same(_vipo(policy, ref, target), beta, loss, z)


def test_diffusers_sd15_hinge_equals_vipo_hinge(seed):
    beta = beta_from("diffusers-sd15", 2500.0)
    policy, ref, target = _batch(8, (4, 8, 8), beta, per_sample=4 * 8 * 8)
    loss, z = diffusers_sd15_lines(policy, ref, target, 2500.0, loss_type="hinge")
    _assert_same(_vipo(policy, ref, target, loss_type="hinge"), beta, loss, z)


@pytest.mark.parametrize(
    "norm_type, convention, masked",
    [("sum", "sum", False), ("sum", "sum", True), ("mean", "official", False)],
)
@pytest.mark.parametrize("shape", [(4, 8, 8), (4, 3, 6, 8)])  # an image, a video latent
def test_simpletuner_flow_dpo_equals_vipo_with_converted_beta(seed, norm_type, convention, masked, shape):
    """SimpleTuner runs winners and losers as separate [B, ...] batches: vipo gets them
    concatenated. Its beta is 1.0 (the ceiling of auto_beta's range); a mask is vipo's
    elem_weight, and the sum convention counts every element of the prediction."""
    pairs, n, beta_st = 4, 1, 1.0
    for size in shape:
        n *= size
    beta = beta_from(convention, beta_st, elements_per_sample=n)
    policy, ref, target = _batch(pairs, shape, beta, per_sample=n)
    mask = None
    if masked:  # [B, 1, H, W] (images) or [B, 1, 1, H, W] (video), as its _mask_for_loss makes
        mask = (torch.rand(pairs, 1, *([1] * (len(shape) - 3)), *shape[-2:]) > 0.3).double()
    pw, pl = policy.chunk(2)
    rw, rl = ref.chunk(2)
    tw, tl = target.chunk(2)
    loss, z = simpletuner_lines(pw, pl, rw, rl, tw, tl, beta_st, norm_type, mask)
    weight = None if mask is None else mask.repeat(2, *([1] * (mask.dim() - 1)))
    _assert_same(_vipo(policy, ref, target, elem_weight=weight), beta, loss, z)


def _columns(x):
    """[2B, C, F, H, W] -> [2B * W, C, F, H]: each width column a sample, pairs kept in order."""
    return x.movedim(-1, 1).flatten(0, 1)


@pytest.mark.parametrize("dupfactor", [1.0, 1.7])
def test_videodpo_equals_vipo_on_width_columns(seed, dupfactor):
    """VideoDPO's `.mean(dim=[1, 2, 3])` of a 5-D latent leaves [2B, W]: a logit per (pair,
    column). Its config trains with batch_size 1 (its `dupfactor` [B] does not broadcast against
    [B, W] otherwise); the dupfactor scales the loss, so vipo's loss is multiplied by it."""
    shape = (4, 3, 5, 6)  # C, F, H, W
    beta_dpo = 5000.0  # configs/vc2_dpo/config.yaml
    beta = beta_from("videodpo", beta_dpo)
    policy, ref, target = _batch(1, shape, beta, per_sample=4 * 3 * 5)
    loss, z, accuracy = videodpo_lines(
        policy, ref, target, beta_dpo, torch.tensor([dupfactor], dtype=torch.float64)
    )
    columns = _vipo(_columns(policy), _columns(ref), _columns(target))

    def run(b):
        out = columns(b)
        return out._replace(loss=dupfactor * out.loss)

    _assert_same(run, beta, loss, z)
    assert accuracy.item() == pytest.approx(
        shape[-1] * run(beta).accuracy.item(), abs=1e-6
    )  # it counts columns
    # vipo on the 5-D tensors as they are (an error per sample) is another loss at the same beta.
    whole = _vipo(policy, ref, target)(beta)
    assert abs(dupfactor * whole.loss.item() - loss.item()) > 1e-6 * abs(loss.item())


def _conventions_table(text):
    """The rows (lists of cells) of the first markdown table under TABLE_HEADING."""
    lines = text.splitlines()
    assert TABLE_HEADING in lines, f"kernels/README.md has no line {TABLE_HEADING!r}"
    section = []
    for line in lines[lines.index(TABLE_HEADING) + 1 :]:
        if line.startswith("## "):
            break
        section.append(line)
    table = [line.strip() for line in section if line.strip().startswith("|")]
    assert len(table) >= 3, f"no markdown table under {TABLE_HEADING!r}"
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table]
    assert all(re.fullmatch(r":?-+:?", cell) for cell in rows[1]), rows[1]
    return rows[0], rows[2:]


def test_readme_table_lists_every_convention():
    header, rows = _conventions_table(README.read_text())
    columns = [i for i, name in enumerate(header) if name.lower().startswith("vipo convention")]
    assert len(columns) == 1, header
    named = set()
    for row in rows:
        assert len(row) == len(header), row
        cell_names = re.findall(r"`([^`]+)`", row[columns[0]])
        assert cell_names, f"row without a `convention` name: {row}"
        named.update(cell_names)
    assert named <= set(CONVENTIONS), f"not in CONVENTIONS: {sorted(named - set(CONVENTIONS))}"
    assert set(CONVENTIONS) <= named, f"not in the table: {sorted(set(CONVENTIONS) - named)}"


def test_table_parser_finds_a_missing_row():
    text = (
        f"# x\n\n{TABLE_HEADING}\n\n| peer | vipo convention | vipo beta = |\n|---|---|---|\n"
        "| a | `official` | beta |\n\n## next\n\n| b | `sum` | x |\n"
    )
    header, rows = _conventions_table(text)
    assert header[1] == "vipo convention" and rows == [["a", "`official`", "beta"]]
