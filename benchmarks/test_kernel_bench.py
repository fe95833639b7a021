"""pytest-benchmark view of the kernel comparison (GPU only):

    pytest benchmarks/test_kernel_bench.py --benchmark-json benchmarks/results/kernel-bench.json

bench_kernel.py is the script that writes the committed results; this file gives the same
comparison in pytest-benchmark's format (grouped by shape, one row per provider).
"""

import pytest
import torch

from vipo.benchmarks.bench_kernel import eager_poly_dpo, fused_poly_dpo
from vipo.benchmarks.registry import KERNEL_SHAPES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROVIDERS = {"fused": fused_poly_dpo, "eager": eager_poly_dpo, "compiled_eager": None}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("name", list(KERNEL_SHAPES))
def test_poly_dpo_forward_backward(benchmark, name, provider):
    shape, _ = KERNEL_SHAPES[name]
    benchmark.group = name
    fn = PROVIDERS[provider] or torch.compile(eager_poly_dpo)
    target = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    ref_pred = target + torch.randn_like(target)
    policy_pred = (ref_pred + 0.01 * torch.randn_like(target)).requires_grad_(True)

    def step():
        policy_pred.grad = None
        fn(policy_pred, target, ref_pred).backward()
        torch.cuda.synchronize()

    step()
    benchmark.pedantic(step, rounds=50, warmup_rounds=5)
