"""The eager reference and the fused kernel refuse the same inputs with the same words: a swap
from one path to the other (CPU tests to GPU runs) never turns an error into a silent result."""

import pytest
import torch

from vipo.kernels import poly_dpo_loss, reference, sample_errors
from vipo.kernels.poly_dpo import use_fused

pytestmark = pytest.mark.skipif(
    not use_fused(torch.empty(2)), reason="needs TRITON_INTERPRET=1 (tests/conftest.py)"
)


def inputs():
    policy = torch.randn(4, 5, requires_grad=True)
    target, ref = torch.randn(4, 5), torch.randn(4, 5)
    return policy, target, ref


BAD = {
    "integer ref_pred": lambda p, t, r: dict(ref_pred=torch.ones(4, 5, dtype=torch.int64)),
    "integer target": lambda p, t, r: dict(target=torch.ones(4, 5, dtype=torch.int64), ref_pred=r),
    "integer ref_err": lambda p, t, r: dict(ref_err=torch.ones(4, dtype=torch.int64)),
    "ref_err of the wrong length": lambda p, t, r: dict(ref_err=torch.ones(3)),
    "target that requires grad": lambda p, t, r: dict(target=t.clone().requires_grad_(True), ref_pred=r),
    "bool pair_weight": lambda p, t, r: dict(ref_pred=r, pair_weight=torch.ones(2, dtype=torch.bool)),
    "pair_weight of the wrong length": lambda p, t, r: dict(ref_pred=r, pair_weight=torch.ones(3)),
    "integer elem_weight": lambda p, t, r: dict(ref_pred=r, elem_weight=torch.ones(4, 5, dtype=torch.int64)),
    "elem_weight that enlarges": lambda p, t, r: dict(ref_pred=r, elem_weight=torch.ones(2, 4, 5)),
    "ref_pred of another shape": lambda p, t, r: dict(ref_pred=torch.randn(4, 6)),
    "both references": lambda p, t, r: dict(ref_pred=r, ref_err=torch.ones(4)),
    "no reference": lambda p, t, r: dict(),
    "infinite beta": lambda p, t, r: dict(ref_pred=r, beta=float("inf")),
    "tensor beta": lambda p, t, r: dict(ref_pred=r, beta=torch.tensor(1.0)),
    "nan alpha": lambda p, t, r: dict(ref_pred=r, alpha=float("nan")),
    "unknown loss_type": lambda p, t, r: dict(ref_pred=r, loss_type="robust"),
    "alpha with the hinge loss_type": lambda p, t, r: dict(ref_pred=r, alpha=8.0, loss_type="hinge"),
    "ipo with zero beta": lambda p, t, r: dict(ref_pred=r, beta=0.0, loss_type="ipo"),
    "unknown ties": lambda p, t, r: dict(ref_pred=r, ties="third"),
    "odd rows": lambda p, t, r: dict(
        policy_pred=torch.randn(3, 5), target=torch.randn(3, 5), ref_pred=torch.randn(3, 5)
    ),
}


def outcome(fn, **kwargs):
    try:
        fn(**kwargs)
    except (TypeError, ValueError) as err:
        return type(err).__name__, str(err)
    return "ok", ""


@pytest.mark.parametrize("case", list(BAD))
def test_both_paths_refuse_a_bad_input_alike_and_name_the_argument(case):
    policy, target, ref = inputs()
    kwargs = {"policy_pred": policy, "target": target, "beta": 1.0, **BAD[case](policy, target, ref)}
    eager, fused = outcome(reference.poly_dpo_loss, **kwargs), outcome(poly_dpo_loss, **kwargs)
    assert eager[0] != "ok", f"{case}: accepted"
    assert eager == fused
    named = (
        case.split(" ")[-1]
        if case.split(" ")[-1]
        in (
            "ref_pred",
            "target",
            "ref_err",
            "pair_weight",
            "elem_weight",
            "beta",
            "alpha",
            "loss_type",
            "ties",
        )
        else None
    )
    if named:
        assert named in eager[1], eager


def test_sample_errors_refuses_alike_on_both_paths():
    for pred, target in (
        (torch.ones(4, 5, dtype=torch.int64), torch.randn(4, 5)),
        (torch.randn(4, 5), torch.ones(4, 5, dtype=torch.int32)),
        (torch.randn(3, 5), torch.randn(3, 5)),
    ):
        assert outcome(reference.sample_errors, pred=pred, target=target) == outcome(
            sample_errors, pred=pred, target=target
        )
        assert outcome(sample_errors, pred=pred, target=target)[0] != "ok"
