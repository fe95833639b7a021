"""Samples sharded over processes (context parallelism): `sample_errors` and `poly_dpo_loss` with
`reduce_group` give, on every rank, the loss of the unsharded samples, and each rank the gradient
of its own elements. Two gloo processes; shards of unequal size (37 tokens split 20 / 17); the
fused kernels (through the interpreter) and the eager path; float64 reference and autograd as truth.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vipo.kernels import poly_dpo as dispatch
from vipo.kernels import poly_dpo_loss, reference, sample_errors

TOKENS, SPLIT, WIDTH, PAIRS = 37, 20, 6, 3
CASES = [
    # (path, dtype, reference given as, loss_type, alpha)
    ("fused", torch.float32, "ref_pred", "sigmoid", 8.0),
    ("fused", torch.float32, "ref_err", "sigmoid", 0.0),
    ("fused", torch.bfloat16, "ref_pred", "sigmoid", 2.0),
    ("fused", torch.float32, "ref_pred", "hinge", 0.0),
    ("fused", torch.float16, "ref_err", "ipo", 0.0),
    ("eager", torch.float32, "ref_pred", "sigmoid", 8.0),
    ("eager", torch.bfloat16, "ref_err", "sigmoid", 0.0),
]


def make_inputs(seed: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    shape = (2 * PAIRS, TOKENS, WIDTH)
    target = torch.randn(shape, generator=g).to(dtype)
    ref = (target.float() + 0.3 * torch.randn(shape, generator=g)).to(dtype)
    policy = (ref.float() + 0.05 * torch.randn(shape, generator=g)).to(dtype)
    return policy, target, ref


def shard(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x[:, :SPLIT] if rank == 0 else x[:, SPLIT:]


def worker(rank: int, port: int, seed: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    group = dist.new_group([0, 1])
    results = []
    try:
        for i, (path, dtype, given, loss_type, alpha) in enumerate(CASES):
            dispatch.use_fused = (lambda t: False) if path == "eager" else dispatch_use_fused
            policy, target, ref = (shard(x, rank) for x in make_inputs(seed + i, dtype))
            policy = policy.clone().requires_grad_(True)
            beta = 50.0 if loss_type != "sigmoid" else 2000.0
            kwargs = dict(beta=beta, alpha=alpha, loss_type=loss_type, ties="half", reduce_group=group)
            if given == "ref_pred":
                kwargs["ref_pred"] = ref
            else:
                kwargs["ref_err"] = sample_errors(ref, target, reduce_group=group)
            out = poly_dpo_loss(policy, target, **kwargs)
            out.loss.backward()
            errors = sample_errors(policy.detach(), target, reduce_group=group)
            results.append(
                {
                    "loss": out.loss.detach(),
                    "logits": out.logits,
                    "accuracy": out.accuracy,
                    "policy_err": out.policy_err,
                    "errors": errors,
                    "grad": policy.grad,
                }
            )
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


dispatch_use_fused = dispatch.use_fused


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    seed = int.from_bytes(os.urandom(4), "little")
    out = tmp_path_factory.mktemp("reduce")
    mp.spawn(worker, args=(free_port(), seed, str(out)), nprocs=2, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return seed, ranks


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}" for c in CASES])
def test_sharded_loss_is_the_whole_samples_loss(sharded, case):
    seed, ranks = sharded
    path, dtype, given, loss_type, alpha = CASES[case]
    policy, target, ref = make_inputs(seed + case, dtype)
    beta = 50.0 if loss_type != "sigmoid" else 2000.0
    truth_pred = policy.double().requires_grad_(True)
    truth = reference.poly_dpo_loss(
        truth_pred, target.double(), ref_pred=ref.double(), beta=beta, alpha=alpha, loss_type=loss_type
    )
    truth.loss.backward()
    r0, r1 = ranks[0][case], ranks[1][case]
    # Every rank holds the same whole-batch result, to the bit.
    for key in ("loss", "logits", "accuracy", "policy_err", "errors"):
        assert torch.equal(r0[key], r1[key]), key
    # Errors of the whole samples, from the two shards' partial sums (the fused kernel squares in
    # float64, the eager path in float32).
    rtol = 1e-12 if path == "fused" else 1e-7
    torch.testing.assert_close(r0["errors"], truth.policy_err, rtol=rtol, atol=0)
    torch.testing.assert_close(r0["loss"].double(), truth.loss.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(r0["logits"].double(), truth.logits, rtol=1e-5, atol=1e-5)
    # Each rank's gradient is that of its own elements; together the whole gradient.
    grad = torch.cat([r0["grad"], r1["grad"]], dim=1)
    assert grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    scale = truth_pred.grad.abs().max()
    assert (grad.double() - truth_pred.grad).abs().max() <= tol * scale, (path, dtype)


def test_the_unsharded_call_on_one_shard_is_not_the_whole_loss(sharded):
    """The comparison above can fail: one shard's loss alone is another number."""
    seed, _ = sharded
    policy, target, ref = make_inputs(seed, torch.float32)
    whole = poly_dpo_loss(policy, target, ref_pred=ref, beta=2000.0, alpha=8.0)
    part = poly_dpo_loss(shard(policy, 0), shard(target, 0), ref_pred=shard(ref, 0), beta=2000.0, alpha=8.0)
    assert not torch.allclose(whole.loss, part.loss, rtol=1e-3)


def test_reduce_group_without_a_process_group_is_refused():
    pred = torch.randn(2, 4)
    with pytest.raises(ValueError, match="reduce_group needs an initialised"):
        sample_errors(pred, pred.clone(), reduce_group=object())
