"""Weak-scaling efficiency on paper: single-GPU step time and the bytes each strategy moves.

NOTHING HERE IS MEASURED. No GPU was available: the single-GPU time per pair is an input, and the
default table derives it from counted FLOPs at an ASSUMED MFU (40% of an H100 SXM's 989 TFLOP/s
dense bf16); the bandwidths and latencies are datasheet / nccl-tests orders of magnitude. Replace
them with `vipo bench step` (seconds per pair) and nccl-tests (bus bandwidth) from the real machine.

Weak scaling: every GPU keeps its micro-batch, so the global batch grows with N and the compute of
a step does not change; communication grows. Per step, on every GPU:

    t_compute = grad_accum x micro_batch_pairs x seconds_per_pair
    t_comm    = sum over collectives of  bus_bytes / bus_bandwidth + calls x latency
    exposed   = t_comm - min(overlap x t_comm, t_compute)
    efficiency = t_compute / (t_compute + exposed)

Bus bytes follow nccl-tests' convention (what each GPU sends on its link in a ring), S the full
(unsharded) size: all-reduce 2 (N-1)/N S; all-gather and reduce-scatter (N-1)/N S. What each
strategy of engine/parallel.py moves (P parameters, k = grad_accum micro-steps a step):

    ddp    all-reduce of fp32 gradients (autocast keeps weights fp32), once a step (no_sync on the
           other micro-steps), in DDP's 25 MiB buckets; a `copy` reference is a replica: no traffic
    fsdp   every micro-step: all-gather of bf16 weights in forward and again in backward
           (reshard_after_forward=true; false drops the second), reduce-scatter of gradients in fp32
           (MixedPrecisionPolicy reduce_dtype); one call per FSDP unit (every block + the root);
           the sharded `copy` reference all-gathers its bf16 weights once (forward only)
    zero2  every micro-step: reduce-scatter of bf16 gradients (ZeRO-2 reduces during each backward);
           once a step: all-gather of the updated bf16 weights; 5e8-element buckets; reference: replica
    zero3  like fsdp, bf16 gradients, weights fetched in 5e7-element prefetch buckets; the ZeRO-3
           reference engine gathers once a micro-step (forward only)

Latency: a ring all-gather / reduce-scatter costs base + (N-M) NVLink hops + (M-1) InfiniBand hops
(M nodes); an all-reduce the cheaper of twice that ring and NCCL's tree (a chain in the node, a
binary tree across nodes). It matters only where a strategy issues many calls on many nodes.

Which strategies fit is README's memory arithmetic (weights, gradients, AdamW and the copy
reference per GPU; full fine-tune) against a budget for that state (default 40 GiB of an 80 GB
H100, the rest left to activations).

    python benchmarks/scaling.py                       # the default table (assumptions printed)
    python benchmarks/scaling.py --seconds-per-pair flux=1.9 --overlap 0 0.5 --out /tmp/scaling.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")
GIB = 2**30
MIB = 2**20

# Dense bf16 peak of an H100 SXM (flops.PEAK_BF16_TFLOPS) and the ASSUMED model-FLOPs utilisation.
H100_PEAK_TFLOPS = 989.0
ASSUMED_MFU = 0.40
FORWARD_EQUIVALENTS_PER_PAIR = 8  # flops.py: policy forward+backward on winner and loser 6, reference 2

# DDP's default bucket_cap_mb; DeepSpeed's reduce_bucket_size / allgather_bucket_size and
# stage3_prefetch_bucket_size defaults (elements).
DDP_BUCKET_BYTES = 25 * MIB
ZERO_BUCKET_ELEMENTS = 5e8
ZERO3_PREFETCH_ELEMENTS = 5e7


@dataclass(frozen=True)
class Workload:
    """One model at the issue's training shape. `params` and `largest_unit_params` are counted on
    the meta device from configs/models/*.json (`len(parallel.blocks(network))` gives the blocks; a
    unit's own parameters exclude those of the blocks nested in it, which shard on their own);
    `forward_tflop` per sample is flops.py's count at the step recipe's shape."""

    name: str
    shape: str
    params: int
    fsdp_units: int  # blocks + the root: one collective call each per gather / reduce pass
    largest_unit_params: int
    forward_tflop: float
    micro_batch_pairs: int  # per GPU (bench_step.STEP_RECIPES)

    def assumed_seconds_per_pair(
        self, mfu: float = ASSUMED_MFU, peak_tflops: float = H100_PEAK_TFLOPS
    ) -> float:
        """NOT MEASURED: 8 forward-equivalents a pair at `mfu` of the peak."""
        return FORWARD_EQUIVALENTS_PER_PAIR * self.forward_tflop / (mfu * peak_tflops)


WORKLOADS = {
    "sdxl": Workload("sdxl", "1024px", 2_567_463_684, 90 + 1, 49_164_800, 6.76, 2),
    "flux": Workload("flux", "1024px", 11_901_408_320, 57 + 1, 339_831_296, 74.4, 1),
    "wan": Workload("wan", "720p x 81 frames", 1_418_996_800, 30 + 1, 46_440_704, 1250.0, 1),
}


@dataclass(frozen=True)
class Fabric:
    """The machine, stated. Bus bandwidths are nccl-tests `busbw` (GB/s = 1e9 B/s) of a large ring.

    NVLink 4 on an H100 SXM moves 450 GB/s per direction per GPU; rings reach about 80% of it
    (360), NVLink SHARP all-reduce more, which is left out. InfiniBand NDR is 400 Gb/s = 50 GB/s per
    NIC, 45 achievable; with one NIC per GPU (rail-optimised, as a DGX H100) a full-world ring crosses
    each node once per channel, channels spread over all NICs, so across nodes the bus bandwidth is
    the node's InfiniBand: nics_per_node x 45 = 360, capped by NVLink. `ib_rails_used=1` models a
    fabric where only one NIC's worth carries a GPU's traffic (45 GB/s): the pessimistic case."""

    name: str = "rails"
    gpus_per_node: int = 8
    nvlink_busbw_gbs: float = 360.0
    ib_nic_gbs: float = 45.0
    ib_rails_used: int = 8
    base_latency_us: float = 10.0
    nvlink_hop_us: float = 1.0
    ib_hop_us: float = 4.0

    def nodes(self, gpus: int) -> int:
        return math.ceil(gpus / self.gpus_per_node)

    def busbw(self, gpus: int) -> float:
        """Bus bandwidth of a collective over `gpus` ranks, in bytes/s."""
        if gpus <= self.gpus_per_node:
            return self.nvlink_busbw_gbs * 1e9
        return min(self.nvlink_busbw_gbs, self.ib_rails_used * self.ib_nic_gbs) * 1e9

    def latency(self, kind: str, gpus: int) -> float:
        """Seconds of one call's latency (the part that does not shrink with the message)."""
        if gpus <= 1:
            return 0.0
        nodes = self.nodes(gpus)
        ring = (gpus - nodes) * self.nvlink_hop_us + (nodes - 1) * self.ib_hop_us
        if kind == "all_reduce":
            in_node = min(gpus, self.gpus_per_node) - 1
            tree = in_node * self.nvlink_hop_us + math.ceil(math.log2(nodes)) * self.ib_hop_us
            return (self.base_latency_us + 2 * min(ring, tree)) * 1e-6
        return (self.base_latency_us + ring) * 1e-6


FABRICS = {"rails": Fabric(), "one-nic": Fabric(name="one-nic", ib_rails_used=1)}


@dataclass(frozen=True)
class Collective:
    """`calls` calls of one kind moving `size_bytes` in all (the full, unsharded size), per step."""

    what: str
    kind: str  # all_reduce | all_gather | reduce_scatter
    size_bytes: float
    calls: int

    def bus_bytes(self, gpus: int) -> float:
        """What each GPU sends (nccl-tests' bus bytes): 0 on one GPU."""
        if gpus <= 1:
            return 0.0
        factor = 2 * (gpus - 1) / gpus if self.kind == "all_reduce" else (gpus - 1) / gpus
        return factor * self.size_bytes


def traffic(
    strategy: str,
    params: int,
    fsdp_units: int,
    grad_accum: int = 1,
    reshard_after_forward: bool = True,
    copy_reference: bool = True,
) -> list[Collective]:
    """The collectives of one optimizer step (grad_accum micro-steps) of a full fine-tune."""
    k = grad_accum
    bf16, fp32 = 2 * params, 4 * params
    if strategy == "ddp":
        return [Collective("grads fp32", "all_reduce", fp32, math.ceil(fp32 / DDP_BUCKET_BYTES))]
    if strategy in ("fsdp", "zero3"):
        if strategy == "fsdp":
            gather_calls, reduce_calls, grad_bytes = fsdp_units, fsdp_units, fp32
        else:
            gather_calls = math.ceil(params / ZERO3_PREFETCH_ELEMENTS)
            reduce_calls, grad_bytes = math.ceil(params / ZERO_BUCKET_ELEMENTS), bf16
        passes = 2 if reshard_after_forward else 1
        out = [
            Collective(
                "weights bf16 (forward, backward)", "all_gather", k * passes * bf16, k * passes * gather_calls
            ),
            Collective("grads", "reduce_scatter", k * grad_bytes, k * reduce_calls),
        ]
        if copy_reference:
            out.append(
                Collective("reference weights bf16 (forward)", "all_gather", k * bf16, k * gather_calls)
            )
        return out
    if strategy == "zero2":
        buckets = math.ceil(params / ZERO_BUCKET_ELEMENTS)
        return [
            Collective("grads bf16", "reduce_scatter", k * bf16, k * buckets),
            Collective("updated weights bf16", "all_gather", bf16, buckets),
        ]
    raise ValueError(f"strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")


def state_gib(strategy: str, params: int, gpus: int, largest_unit_params: int) -> float:
    """README's memory arithmetic (full fine-tune, copy reference, bf16): weights, gradients, AdamW
    and the reference per GPU, plus two gathered bf16 units under fsdp / zero3 (prefetch)."""
    p, n, u = params, gpus, largest_unit_params
    per_gpu = {
        "ddp": 20 * p,
        "fsdp": 20 * p / n + 4 * u,
        "zero2": 6 * p + 14 * p / n,
        "zero3": 18 * p / n + 4 * u,
    }[strategy]
    return per_gpu / GIB


@dataclass(frozen=True)
class Row:
    model: str
    strategy: str
    fabric: str
    gpus: int
    nodes: int
    fits: bool
    state_gib: float
    compute_s: float
    comm_bytes_per_gpu: float
    comm_bandwidth_s: float
    comm_latency_s: float
    comm_s: float
    efficiency: dict[str, float]


def efficiency(compute_s: float, comm_s: float, overlap: float) -> float:
    """t_compute / (t_compute + exposed comm); overlap hides at most the compute time."""
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap {overlap}: expected a fraction in [0, 1]")
    exposed = comm_s - min(overlap * comm_s, compute_s)
    return compute_s / (compute_s + exposed)


def model_row(
    workload: Workload,
    strategy: str,
    gpus: int,
    fabric: Fabric,
    seconds_per_pair: float,
    overlaps: tuple[float, ...],
    grad_accum: int = 1,
    reshard_after_forward: bool = True,
    state_budget_gib: float = 40.0,
) -> Row:
    collectives = traffic(strategy, workload.params, workload.fsdp_units, grad_accum, reshard_after_forward)
    bus_bytes = sum(c.bus_bytes(gpus) for c in collectives)
    bandwidth_s = bus_bytes / fabric.busbw(gpus) if gpus > 1 else 0.0
    latency_s = sum(c.calls * fabric.latency(c.kind, gpus) for c in collectives)
    compute_s = grad_accum * workload.micro_batch_pairs * seconds_per_pair
    comm_s = bandwidth_s + latency_s
    memory = state_gib(strategy, workload.params, gpus, workload.largest_unit_params)
    return Row(
        workload.name,
        strategy,
        fabric.name,
        gpus,
        fabric.nodes(gpus),
        memory <= state_budget_gib,
        memory,
        compute_s,
        bus_bytes,
        bandwidth_s,
        latency_s,
        comm_s,
        {str(o): efficiency(compute_s, comm_s, o) for o in overlaps},
    )


def table(
    seconds_per_pair: dict[str, float],
    gpus: tuple[int, ...] = (8, 64, 512),
    overlaps: tuple[float, ...] = (0.0, 0.8),
    fabrics: tuple[Fabric, ...] = tuple(FABRICS.values()),
    grad_accum: int = 1,
    reshard_after_forward: bool = True,
    state_budget_gib: float = 40.0,
    workloads: dict[str, Workload] = WORKLOADS,
) -> list[Row]:
    return [
        model_row(
            workloads[name],
            strategy,
            n,
            fabric,
            seconds_per_pair[name],
            overlaps,
            grad_accum,
            reshard_after_forward,
            state_budget_gib,
        )
        for fabric in fabrics
        for name in workloads
        for strategy in STRATEGIES
        for n in gpus
    ]


def render(rows: list[Row], overlaps: tuple[float, ...], fits_only: bool = True) -> str:
    """A markdown table: one line per (fabric, model, strategy), efficiency at each N and overlap."""
    gpus = sorted({r.gpus for r in rows})
    head = ["fabric", "model", "strategy", "state GiB @N", "GB sent/GPU/step @max N"]
    head += [f"N={n} ov={o}" for n in gpus for o in overlaps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.fabric, r.model, r.strategy), []).append(r)
    for (fabric, model, strategy), group in groups.items():
        if fits_only and not any(r.fits for r in group):
            continue
        cells = [fabric, model, strategy, " / ".join(f"{r.state_gib:.1f}" for r in group)]
        cells.append(f"{group[-1].comm_bytes_per_gpu / 1e9:.1f}")
        for r in group:
            for o in overlaps:
                cells.append(f"{r.efficiency[str(o)]:.2f}" if r.fits else "no fit")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pairs(values: list[str], flag: str) -> dict[str, float]:
    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or name not in WORKLOADS:
            raise SystemExit(
                f"{flag} {item!r}: expected MODEL=VALUE with MODEL one of {', '.join(WORKLOADS)}"
            )
        try:
            out[name] = float(value)
        except ValueError:
            raise SystemExit(f"{flag} {item!r}: {value!r} is not a number") from None
        if out[name] <= 0:
            raise SystemExit(f"{flag} {item!r}: must be positive")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds-per-pair",
        nargs="*",
        default=[],
        metavar="MODEL=S",
        help="measured single-GPU seconds per pair (vipo bench step); default: from FLOPs at --mfu",
    )
    parser.add_argument("--micro-batch", nargs="*", default=[], metavar="MODEL=PAIRS", help="pairs per GPU")
    parser.add_argument(
        "--mfu", type=float, default=ASSUMED_MFU, help="assumed MFU for the default step time"
    )
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument(
        "--overlap",
        type=float,
        nargs="+",
        default=[0.0, 0.8],
        help="fractions of communication hidden behind compute",
    )
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument(
        "--no-reshard-after-forward", action="store_true", help="fsdp/zero3: one gather a micro-step"
    )
    parser.add_argument(
        "--nvlink-gbs", type=float, default=Fabric.nvlink_busbw_gbs, help="in-node bus bandwidth"
    )
    parser.add_argument("--ib-nic-gbs", type=float, default=Fabric.ib_nic_gbs, help="achievable GB/s per NIC")
    parser.add_argument("--state-budget-gib", type=float, default=40.0, help="per-GPU memory for model state")
    parser.add_argument("--out", type=Path, help="write the assumptions and every row as JSON")
    args = parser.parse_args(argv)
    if not 0 < args.mfu <= 1 or args.grad_accum < 1 or min(args.gpus) < 1:
        raise SystemExit("--mfu must be in (0, 1], --grad-accum and --gpus at least 1")

    measured = _pairs(args.seconds_per_pair, "--seconds-per-pair")
    batches = _pairs(args.micro_batch, "--micro-batch")
    workloads = {
        n: replace(w, micro_batch_pairs=int(batches.get(n, w.micro_batch_pairs)))
        for n, w in WORKLOADS.items()
    }
    seconds = {n: measured.get(n, w.assumed_seconds_per_pair(args.mfu)) for n, w in workloads.items()}
    fabrics = tuple(
        replace(f, nvlink_busbw_gbs=args.nvlink_gbs, ib_nic_gbs=args.ib_nic_gbs) for f in FABRICS.values()
    )
    overlaps, gpus = tuple(args.overlap), tuple(args.gpus)
    rows = table(
        seconds,
        gpus,
        overlaps,
        fabrics,
        args.grad_accum,
        not args.no_reshard_after_forward,
        args.state_budget_gib,
        workloads,
    )

    step_source = {
        n: "measured (--seconds-per-pair)"
        if n in measured
        else f"ASSUMED: {FORWARD_EQUIVALENTS_PER_PAIR} x {w.forward_tflop} TFLOP at {args.mfu:.0%} MFU of "
        f"{H100_PEAK_TFLOPS} TFLOP/s"
        for n, w in workloads.items()
    }
    report = {
        "measured": False,
        "note": "A model on paper: no GPU timing and no NCCL bandwidth was measured for these figures.",
        "assumptions": {
            "seconds_per_pair": seconds,
            "seconds_per_pair_source": step_source,
            "workloads": {n: asdict(w) for n, w in workloads.items()},
            "fabrics": {f.name: asdict(f) for f in fabrics},
            "overlaps": list(overlaps),
            "gpus": list(gpus),
            "grad_accum": args.grad_accum,
            "reshard_after_forward": not args.no_reshard_after_forward,
            "state_budget_gib": args.state_budget_gib,
            "ddp_bucket_bytes": DDP_BUCKET_BYTES,
            "zero_bucket_elements": ZERO_BUCKET_ELEMENTS,
            "zero3_prefetch_elements": ZERO3_PREFETCH_ELEMENTS,
        },
        "rows": [asdict(r) for r in rows],
    }
    print("NOT MEASURED: weak-scaling efficiency from assumed step times and bandwidths (see --help).")
    for name, source in step_source.items():
        print(
            f"  {name}: {seconds[name]:.3f} s/pair x {workloads[name].micro_batch_pairs} pairs/GPU ({source})"
        )
    for f in fabrics:
        print(
            f"  fabric {f.name}: NVLink {f.nvlink_busbw_gbs:g} GB/s busbw in a node; across nodes "
            f"{f.busbw(f.gpus_per_node + 1) / 1e9:g} GB/s ({f.ib_rails_used} x {f.ib_nic_gbs:g} GB/s IB NICs); "
            f"{f.gpus_per_node} GPUs/node"
        )
    print(render(rows, overlaps))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
