"""Fused Poly-DPO forward+backward against the eager formula and its torch.compile.

    python benchmarks/bench_kernel.py                 # on a GPU: every shape of registry.py
    python benchmarks/bench_kernel.py --smoke --out /tmp/k.json   # CPU: checks the harness only

Writes benchmarks/results/kernel-<device>-<date>.json: device, versions, date, commit, and per
shape and provider the median time (with 20/80% quantiles), the achieved bandwidth, the peak
extra memory, and the device-to-device copy bandwidth measured in the same run.

Bytes counted per forward+backward (what any implementation must move at least):
forward reads policy_pred, target, ref_pred (3 N elements); backward reads policy_pred and
target and writes the gradient (3 N elements): 6 N x element size.
Peak extra memory: the allocator's peak during forward+backward minus what was allocated
before (the inputs) and minus the gradient itself, which every implementation must return.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vipo.benchmarks import provenance
from vipo.benchmarks.registry import KERNEL_SHAPES, SMOKE_SHAPES
from vipo.kernels import poly_dpo_loss

BETA, ALPHA = 5000.0, 8.0
RESULTS = Path(__file__).resolve().parent / "results"


def eager_poly_dpo(policy_pred, target, ref_pred, beta=BETA, alpha=ALPHA):
    """The loss as trainers write it today (the official lines, upcast to float32, plus Eq. 9)."""
    dims = list(range(1, policy_pred.dim()))
    model_losses = F.mse_loss(policy_pred.float(), target.float(), reduction="none").mean(dim=dims)
    with torch.no_grad():
        ref_losses = F.mse_loss(ref_pred.float(), target.float(), reduction="none").mean(dim=dims)
    model_w, model_l = model_losses.chunk(2)
    ref_w, ref_l = ref_losses.chunk(2)
    z = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))
    return (-F.logsigmoid(z) + alpha * (1 - torch.sigmoid(z))).mean()


def fused_poly_dpo(policy_pred, target, ref_pred, beta=BETA, alpha=ALPHA):
    return poly_dpo_loss(policy_pred, target, ref_pred=ref_pred, beta=beta, alpha=alpha).loss


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, *, smoke: bool) -> dict:
    """Median and 20/80% quantiles in ms: CUDA events via triton.testing.do_bench on a GPU,
    perf_counter on CPU (smoke runs only)."""
    if device.type == "cuda":
        import triton.testing

        q20, median, q80 = triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8], warmup=25, rep=200)
        return {"median_ms": median, "q20_ms": q20, "q80_ms": q80}
    fn()
    samples = []
    for _ in range(3 if smoke else 20):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return {"median_ms": samples[len(samples) // 2], "q20_ms": samples[0], "q80_ms": samples[-1]}


def copy_bandwidth(device, *, smoke: bool) -> dict:
    """Device-to-device copy of a large buffer: read + write bytes per second."""
    numel = (1 << 16) if smoke else (1 << 28)  # 512 MiB of bf16 on a GPU
    src = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, smoke=smoke)
    moved = 2 * src.numel() * src.element_size()
    return {"bytes": moved, **timing, "gbps": moved / (timing["median_ms"] * 1e-3) / 1e9}


def measure(provider_fn, shape, dtype, device, *, smoke: bool) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    target = torch.randn(shape, dtype=dtype, device=device, generator=gen)
    ref_pred = target + torch.randn(shape, dtype=dtype, device=device, generator=gen)
    policy_pred = (
        ref_pred + 0.01 * torch.randn(shape, dtype=dtype, device=device, generator=gen)
    ).requires_grad_(True)

    def step():
        policy_pred.grad = None
        provider_fn(policy_pred, target, ref_pred).backward()

    step()  # compile / warm up outside the timed region
    result = time_fn(step, device, smoke=smoke)
    numel = policy_pred.numel()
    moved = 6 * numel * policy_pred.element_size()
    result["gbps"] = moved / (result["median_ms"] * 1e-3) / 1e9
    result["bytes_moved"] = moved
    if device.type == "cuda":
        policy_pred.grad = None
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        grad_bytes = policy_pred.grad.numel() * policy_pred.grad.element_size()
        result["peak_extra_bytes"] = torch.cuda.max_memory_allocated(device) - before - grad_bytes
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on CPU: check the harness, not speed"
    )
    parser.add_argument("--shapes", nargs="*", help="names from benchmarks/registry.py (default: all)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument(
        "--out", type=Path, help="result file (default: benchmarks/results/kernel-<device>-<date>.json)"
    )
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("bench_kernel: no CUDA device; run with --smoke to check the harness on CPU", file=sys.stderr)
        return 2
    registry = SMOKE_SHAPES if args.smoke else KERNEL_SHAPES
    names = args.shapes or list(registry)
    unknown = [n for n in names if n not in registry]
    if unknown:
        print(f"bench_kernel: unknown shape(s) {unknown}; known: {', '.join(registry)}", file=sys.stderr)
        return 2
    providers = ["fused", "eager"] + ([] if args.no_compile else ["compiled_eager"])
    dtype = torch.bfloat16
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    )
    report = {
        "kind": "kernel",
        "device": device_name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": provenance.commit(),
        "versions": provenance.versions(),
        "smoke": args.smoke,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "dtype": str(dtype),
        "beta": BETA,
        "alpha": ALPHA,
        "bytes_formula": "6 * numel * element_size (fwd reads pred, target, ref; bwd reads pred, target, writes grad)",
        "peak_extra_formula": "max_memory_allocated during fwd+bwd - allocated before - gradient bytes",
        "copy": copy_bandwidth(device, smoke=args.smoke),
        "rows": [],
    }
    for name in names:
        shape, what = registry[name]
        row = {"shape_name": name, "shape": list(shape), "what": what, "providers": {}}
        for provider in providers:
            if provider == "compiled_eager":
                torch._dynamo.reset()  # compiled afresh for each shape, as a trainer would see it
                fn = torch.compile(eager_poly_dpo)
            else:
                fn = fused_poly_dpo if provider == "fused" else eager_poly_dpo
            row["providers"][provider] = measure(fn, shape, dtype, device, smoke=args.smoke)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        fused = row["providers"]["fused"]
        row["speedup_vs_eager"] = row["providers"]["eager"]["median_ms"] / fused["median_ms"]
        if "compiled_eager" in row["providers"]:
            row["speedup_vs_compiled"] = row["providers"]["compiled_eager"]["median_ms"] / fused["median_ms"]
        row["fused_share_of_copy_bandwidth"] = fused["gbps"] / report["copy"]["gbps"]
        if "peak_extra_bytes" in fused:
            eager_extra = row["providers"]["eager"]["peak_extra_bytes"]
            row["fused_peak_extra_vs_eager"] = (
                fused["peak_extra_bytes"] / eager_extra if eager_extra else None
            )
        report["rows"].append(row)
        print(
            f"{name:14s} fused {fused['median_ms']:.3f} ms ({fused['gbps']:.0f} GB/s, "
            f"{row['fused_share_of_copy_bandwidth']:.0%} of copy) | x{row['speedup_vs_eager']:.2f} vs eager"
            + (f" | x{row['speedup_vs_compiled']:.2f} vs compiled" if "speedup_vs_compiled" in row else "")
        )
    out = args.out or RESULTS / f"kernel-{device_name.replace(' ', '_')}-{report['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
