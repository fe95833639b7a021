"""The reference objective (vipo.kernels.reference) against formulas written out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from vipo.kernels import PolyDPOLoss, beta_from, poly_dpo_loss, reference

from vipo_testing import assert_close


def official_diffusion_dpo_loss(model_pred, ref_pred, target, beta):
    """The loss lines of the official Diffusion-DPO train.py, in float64."""
    # [2B] predictions (N = 1) become [2B, 1] so that `dims` is never empty.
    model_pred, ref_pred, target = (
        x.double().reshape(x.shape[0], -1) for x in (model_pred, ref_pred, target)
    )
    dims = list(range(1, model_pred.dim()))
    model_losses = (model_pred - target).pow(2).mean(dim=dims)
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_losses = (ref_pred - target).pow(2).mean(dim=dims)
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    inside_term = -0.5 * beta * (model_diff - ref_diff)
    return -1 * F.logsigmoid(inside_term).mean(), inside_term


def _batch(pairs, shape, dtype, spread=0.05):
    """policy, reference, target with the policy near the reference (as in training)."""
    target = torch.randn(2 * pairs, *shape)
    ref = target + torch.randn_like(target)
    policy = ref + spread * torch.randn_like(target)
    return policy.to(dtype), ref.to(dtype), target.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(), (7,), (4, 16, 16), (16, 3, 5, 7)])
@pytest.mark.parametrize("pairs", [1, 3])
def test_loss_matches_official_formula_when_alpha_is_zero(seed, dtype, shape, pairs):
    policy, ref, target = _batch(pairs, shape, dtype)
    beta = 5000.0
    expected, expected_z = official_diffusion_dpo_loss(policy, ref, target, beta)
    out = reference.poly_dpo_loss(policy, target, ref_pred=ref, beta=beta, alpha=0.0)
    # Inputs are exactly representable in every dtype; only float32 accumulation differs: each
    # error carries a relative rounding of a few float32 eps, which beta amplifies in z.
    assert out.loss.dtype == torch.float32
    tol = 0.5 * beta * 4e-6 * out.policy_err.abs().max().item()
    assert_close(out.logits, expected_z, atol=tol, rtol=1e-5, name="logits")
    assert_close(out.loss, expected, atol=tol, rtol=1e-5, name="loss")


def test_float64_inputs_are_computed_in_float64(seed):
    policy, ref, target = _batch(2, (4, 8, 8), torch.float64)
    expected, _ = official_diffusion_dpo_loss(policy, ref, target, 5000.0)
    out = reference.poly_dpo_loss(policy, target, ref_pred=ref, beta=5000.0)
    assert out.loss.dtype == torch.float64
    # float32 would be off by ~1e-3 here (see the test above); float64 by ~1e-10.
    tol = 0.5 * 5000.0 * 1e-12 * out.policy_err.abs().max().item()
    assert_close(out.loss, expected, atol=tol, rtol=1e-12, name="loss")


@pytest.mark.parametrize("alpha", [-1.0, -0.5, 0.0, 0.5, 2.0, 8.0])
def test_gradient_wrt_logit_is_paper_eq10(seed, alpha):
    pairs, beta = 64, 500.0
    policy_err = (torch.rand(2 * pairs, dtype=torch.float64) * 0.02).requires_grad_(True)
    ref_err = torch.rand(2 * pairs, dtype=torch.float64) * 0.02
    out = reference.poly_dpo_from_errors(policy_err, ref_err, beta=beta, alpha=alpha)
    out.loss.backward()
    # dz/de_pol[w] = -0.5 beta, and loss is a mean over pairs: recover dL/dz per pair.
    dl_dz = policy_err.grad[:pairs] * pairs / (-0.5 * beta)
    p = torch.sigmoid(out.logits)
    assert_close(dl_dz, -(1 - p) * (1 + alpha * p), atol=1e-12, rtol=1e-9, name="dL/dz")
    assert_close(policy_err.grad[pairs:], -policy_err.grad[:pairs], atol=1e-15, name="loser grad")


@pytest.mark.parametrize("alpha", [-1.0, 0.0, 8.0])
def test_loss_is_eq9_per_pair(seed, alpha):
    policy_err = torch.rand(10, dtype=torch.float64)
    ref_err = torch.rand(10, dtype=torch.float64)
    out = reference.poly_dpo_from_errors(policy_err, ref_err, beta=3.0, alpha=alpha)
    p = torch.sigmoid(out.logits)
    assert_close(out.loss, (-torch.log(p) + alpha * (1 - p)).mean(), atol=1e-12, rtol=1e-12)
    assert_close(out.prob, p, atol=0)
    assert out.accuracy.item() == (out.logits > 0).double().mean().item()
    assert_close(out.margin, out.logits.mean() / 3.0, atol=1e-15)


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("alpha", [-1.0, 0.0, 8.0])
def test_huge_logits_give_finite_loss_and_gradient(sign, alpha):
    pairs = 4
    policy_err = torch.zeros(2 * pairs, requires_grad=True)
    ref_err = torch.zeros(2 * pairs)
    # d = ref_err[l] - ref_err[w] -> z = -0.5 beta d; pick |z| = 1e4.
    ref_err[pairs:] = sign * 2.0
    out = reference.poly_dpo_from_errors(policy_err, ref_err, beta=1e4, alpha=alpha)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(policy_err.grad).all()
    z = out.logits[0].item()
    assert abs(z) == pytest.approx(1e4)
    if z < 0:  # p -> 0: loss -> -z + alpha, gradient saturates at -(1 + 0)
        assert out.loss.item() == pytest.approx(-z + alpha, rel=1e-6)
        dl_dz = policy_err.grad[0].item() * pairs / (-0.5 * 1e4)
        assert dl_dz == pytest.approx(-1.0, rel=1e-6)
    else:  # p -> 1: loss and gradient vanish
        assert out.loss.item() == pytest.approx(0.0, abs=1e-30)
        assert policy_err.grad.abs().max().item() == 0.0


def test_ref_err_path_equals_ref_pred_path(seed):
    policy, ref, target = _batch(3, (4, 9, 9), torch.float32)
    ref_err = reference.sample_errors(ref, target)
    a = reference.poly_dpo_loss(policy, target, ref_pred=ref, beta=800.0, alpha=8.0)
    b = reference.poly_dpo_loss(policy, target, ref_err=ref_err, beta=800.0, alpha=8.0)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_only_policy_pred_receives_gradient(seed):
    policy, ref, target = _batch(2, (3, 4), torch.float32)
    policy.requires_grad_(True)
    ref.requires_grad_(True)
    out = reference.poly_dpo_loss(policy, target, ref_pred=ref, beta=100.0, alpha=1.0)
    out.loss.backward()
    assert policy.grad is not None and policy.grad.abs().sum() > 0
    assert ref.grad is None
    for metric in out[1:]:
        assert not metric.requires_grad
    # A target that requires grad is refused (the fused path could not give it one either).
    with pytest.raises(ValueError, match="target requires grad"):
        reference.poly_dpo_loss(policy, target.requires_grad_(True), ref_pred=ref, beta=100.0)


def test_sample_errors_is_weighted_mean_over_every_non_batch_dim(seed):
    pred = torch.randn(4, 2, 3, 5, 6)  # a 5-D video batch
    target = torch.randn_like(pred)
    weight = torch.rand(4, 1, 3, 1, 1)  # per-frame weights
    got = reference.sample_errors(pred, target, weight)
    expected = torch.stack(
        [
            (weight[i].double() * (pred[i].double() - target[i].double()) ** 2).sum() / (2 * 3 * 5 * 6)
            for i in range(4)
        ]
    )
    # float32 squares summed in float64: the sum adds no rounding of its own.
    assert got.shape == (4,) and got.dtype == torch.float64
    assert_close(got, expected, atol=0, rtol=1e-7)


def test_pair_weight_scales_each_logit(seed):
    policy, ref, target = _batch(3, (5,), torch.float64)
    k = torch.tensor([0.0, 1.0, 2.5], dtype=torch.float64)
    plain = reference.poly_dpo_loss(policy, target, ref_pred=ref, beta=10.0)
    weighted = reference.poly_dpo_loss(policy, target, ref_pred=ref, beta=10.0, pair_weight=k)
    assert_close(weighted.logits, plain.logits * k, atol=1e-12)


def test_module_equals_functional(seed):
    policy, ref, target = _batch(2, (4, 4), torch.float32)
    module = PolyDPOLoss(beta=300.0, alpha=8.0)
    a = module(policy, target, ref_pred=ref)
    b = poly_dpo_loss(policy, target, ref_pred=ref, beta=300.0, alpha=8.0)
    assert torch.equal(a.loss, b.loss)
    assert "beta=300.0, alpha=8.0" in repr(module)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(policy=(3, 4)), "2B > 0"),
        (dict(target=(2, 5)), "target has shape"),
        (dict(ref=(2, 5)), "ref_pred has shape"),
        (dict(both=True), "exactly one of ref_pred"),
        (dict(neither=True), "exactly one of ref_pred"),
        (dict(beta=float("inf")), "beta must be finite"),
        (dict(alpha=float("nan")), "alpha must be finite"),
        (dict(ref_err=(3,)), "ref_err must have shape"),
        (dict(pair_weight=(2,)), "pair_weight must have shape"),
        (dict(elem_weight=(2, 4, 2)), "more dims than pred"),
        (dict(policy=(2, 1), elem_weight=(2, 4)), "would enlarge"),
        (dict(elem_weight=(2, 3)), "does not broadcast"),
    ],
)
def test_bad_inputs_are_refused_with_a_clear_error(kwargs, message):
    policy = torch.randn(*kwargs.get("policy", (2, 4)))
    target = torch.randn(*kwargs.get("target", tuple(policy.shape)))
    ref = torch.randn(*kwargs.get("ref", tuple(policy.shape)))
    args = dict(beta=kwargs.get("beta", 1.0), alpha=kwargs.get("alpha", 0.0))
    if "ref_err" in kwargs:
        args["ref_err"] = torch.randn(*kwargs["ref_err"])
    elif kwargs.get("both"):
        args.update(ref_pred=ref, ref_err=torch.randn(2))
    elif not kwargs.get("neither"):
        args["ref_pred"] = ref
    if "pair_weight" in kwargs:
        args["pair_weight"] = torch.randn(*kwargs["pair_weight"])
    if "elem_weight" in kwargs:
        args["elem_weight"] = torch.randn(*kwargs["elem_weight"])
    with pytest.raises((ValueError, TypeError), match=message):
        reference.poly_dpo_loss(policy, target, **args)


def diffusers_sd15_lines(model_pred, ref_preds, target, beta_dpo, dtype):
    """huggingface/diffusers examples/research_projects/diffusion_dpo/train_diffusion_dpo.py, its
    loss lines (`.float()` there is `.to(dtype)` here: float32 as written, float64 as the truth)."""
    model_losses = F.mse_loss(model_pred.to(dtype), target.to(dtype), reduction="none")
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_loss = F.mse_loss(ref_preds.to(dtype), target.to(dtype), reduction="none")
    ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
    ref_losses_w, ref_losses_l = ref_loss.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    logits = ref_diff - model_diff
    loss = -1 * F.logsigmoid(beta_dpo * logits).mean()
    implicit_acc = (logits > 0).sum().float() / logits.size(0)
    implicit_acc += 0.5 * (logits == 0).sum().float() / logits.size(0)
    return loss, implicit_acc


def diffusers_sdxl_lines(model_pred, ref_preds, target, beta_dpo, dtype):
    """The same folder's train_diffusion_dpo_sdxl.py, its loss lines (`.float()` -> `.to(dtype)`)."""
    model_losses = F.mse_loss(model_pred.to(dtype), target.to(dtype), reduction="none")
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_loss = F.mse_loss(ref_preds.to(dtype), target.to(dtype), reduction="none")
    ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
    ref_losses_w, ref_losses_l = ref_loss.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    loss = -1 * F.logsigmoid(inside_term).mean()
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    implicit_acc += 0.5 * (inside_term == 0).sum().float() / inside_term.size(0)
    return loss, implicit_acc


@pytest.mark.parametrize(
    "convention, lines, beta_dpo",
    [("diffusers-sd15", diffusers_sd15_lines, 2500.0), ("diffusers-sdxl", diffusers_sdxl_lines, 5000.0)],
)
def test_each_diffusers_script_converts_to_the_same_loss_and_accuracy(seed, convention, lines, beta_dpo):
    """vipo on float32 inputs against the script's lines in float64: no farther than the script's
    own float32 lines are, and the same implicit accuracy with ties="half" (one pair is a tie)."""
    policy, ref, target = (x.float() for x in _batch(4, (4, 8, 8), torch.float64))
    ref[1], ref[5] = policy[1], policy[5]  # pair 1: policy = reference, z = 0
    truth, accuracy = lines(policy, ref, target, beta_dpo, torch.float64)
    theirs, _ = lines(policy, ref, target, beta_dpo, torch.float32)
    ours = poly_dpo_loss(policy, target, ref_pred=ref, beta=beta_from(convention, beta_dpo), ties="half")
    ours_err, theirs_err = abs(ours.loss.item() - truth.item()), abs(theirs.item() - truth.item())
    assert ours_err <= theirs_err + 1e-6 * max(1.0, truth.item()), (ours_err, theirs_err)
    assert ours.accuracy.item() == accuracy.item() and (ours.logits == 0).sum() == 1
    official = poly_dpo_loss(policy, target, ref_pred=ref, beta=beta_from(convention, beta_dpo))
    assert official.accuracy.item() == accuracy.item() - 0.5 / 4  # the default counts the tie as wrong


def test_diffusers_alone_is_refused_as_ambiguous():
    with pytest.raises(ValueError, match="'diffusers' is ambiguous.*'diffusers-sd15'.*'diffusers-sdxl'"):
        beta_from("diffusers", 2500.0)
    assert beta_from("diffusers-sd15", 2500.0) == 5000.0 and beta_from("diffusers-sdxl", 5000.0) == 5000.0


def test_ties_must_be_zero_or_half_on_both_paths(seed):
    policy, ref, target = _batch(1, (4, 8, 8), torch.float32)
    for call in (poly_dpo_loss, reference.poly_dpo_loss):
        with pytest.raises(ValueError, match="ties must be 'zero' .* or 'half' .*, got 'third'"):
            call(policy, target, ref_pred=ref, beta=1.0, ties="third")


def test_sum_convention_beta_converts_to_the_same_loss(seed):
    policy, ref, target = _batch(2, (4, 8, 8), torch.float64)
    n = 4 * 8 * 8
    beta_sum = 0.01
    model = (policy - target).pow(2).sum(dim=[1, 2, 3])
    refe = (ref - target).pow(2).sum(dim=[1, 2, 3])
    z = -0.5 * beta_sum * ((model[:2] - model[2:]) - (refe[:2] - refe[2:]))
    theirs = -F.logsigmoid(z).mean()
    ours = reference.poly_dpo_loss(
        policy, target, ref_pred=ref, beta=beta_from("sum", beta_sum, elements_per_sample=n)
    )
    assert_close(ours.loss, theirs, atol=1e-10, rtol=1e-10)


def test_beta_from_refuses_unknown_conventions_and_missing_sizes():
    with pytest.raises(ValueError, match="unknown beta convention 'trl'"):
        beta_from("trl", 1.0)
    with pytest.raises(ValueError, match="elements_per_sample"):
        beta_from("sum", 1.0)
    with pytest.raises(ValueError, match="finite"):
        beta_from("official", math.inf)
