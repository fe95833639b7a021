"""Start-up memory per rank under FSDP: every rank reading the denoiser (parallel.meta_init=false)
against rank 0 alone reading it and sending the shards (true, the default).

    python benchmarks/bench_startup.py --out benchmarks/results/startup-sd15unet-2rank-cpu.json
    python benchmarks/bench_startup.py --ranks 2 --unet tiny          # seconds: checks the harness

A diffusers folder is written with the real SD1.5 UNet (configs/models/sd15.json: 860M
parameters, random weights) and tiny encoders, so the denoiser is what start-up memory is made
of. For each setting, `torchrun --nproc_per_node=RANKS` builds the engine's Trainer (fsdp, copy
reference) and each rank records its peak resident set (getrusage ru_maxrss) after the process
group is up and after the Trainer is built: the difference is what start-up added. On a GPU the
device's max_memory_allocated is recorded as well.

The FLUX.1-dev rows are computed from its parameter count (configs/models/flux1-dev.json on the
meta device) with the same accounting, not measured: policy and copy reference in fp32, 8 ranks.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from vipo.benchmarks import provenance

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args) -> None:
    import torch.distributed as dist

    from vipo.engine.config import load_config
    from vipo.engine.trainer import Trainer

    dist.init_process_group("gloo")
    before = peak_rss_mib()
    overrides = [
        f"model.path={args.folder}",
        "data.num_pairs=8",
        f"data.resolution={args.resolution}",
        f"train.batch_pairs={int(os.environ['WORLD_SIZE'])}",
        f"train.output_dir={args.run}",
        "parallel.strategy=fsdp",
        f"parallel.meta_init={args.meta_init}",
    ]
    with Trainer(load_config(None, overrides), progress=False) as trainer:
        after = peak_rss_mib()
        params = sum(p.numel() for p in trainer.network.parameters())
        row = {
            "rank": dist.get_rank(),
            "rss_before_mib": round(before, 1),
            "rss_after_build_mib": round(after, 1),
            "startup_added_mib": round(after - before, 1),
            "denoiser_params": params,
        }
        if torch.cuda.is_available():
            row["device_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        Path(args.rows).write_text(json.dumps(rows))


def flux_estimate(ranks: int = 8) -> dict:
    """FLUX.1-dev start-up host memory per rank (GiB), computed: fp32 policy + copy reference."""
    from diffusers import FluxTransformer2DModel

    from vipo.engine.models import load_architecture

    with torch.device("meta"):
        params = sum(
            p.numel()
            for p in FluxTransformer2DModel(**load_architecture("flux1-dev")["transformer"]).parameters()
        )
    full = params * 4 / 2**30
    return {
        "params": params,
        "ranks": ranks,
        "every_rank_reads_gib": {"each_rank": round(2 * full, 1), "node": round(2 * full * ranks, 1)},
        "rank0_reads_gib": {
            "rank0": round(full + 2 * full / ranks, 1),
            "other_ranks": round(2 * full / ranks, 1),
            "node": round(full + 2 * full, 1),
        },
        "how": "every rank reads: policy and its deepcopy, fp32, whole, before sharding. rank 0 reads: rank 0 "
        "holds the policy whole until both networks are sharded (the reference is made on meta and takes the "
        "policy's weights), plus its two shards; the other ranks hold their two shards (1/N each)",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--unet", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", dest="run", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--meta-init", dest="meta_init", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    from vipo.engine.models import load_architecture
    from vipo.engine.models.folders import write_sd15_folder

    work = Path(tempfile.mkdtemp(prefix="vipo-startup-"))
    unet = load_architecture("sd15")["unet"] if args.unet == "sd15" else None
    folder = write_sd15_folder(work / "model", resolution=args.resolution, unet=unet)
    settings = {}
    for meta_init in ("false", "true"):
        rows_file = work / f"rows-{meta_init}.json"
        command = [
            *(
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={args.ranks}",
            ),
            *(__file__, "--worker", "--folder", str(folder), "--run-dir", str(work / f"run-{meta_init}")),
            *("--rows", str(rows_file), "--meta-init", meta_init, "--resolution", str(args.resolution)),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            print(done.stdout[-3000:], done.stderr[-6000:], file=sys.stderr)
            return done.returncode
        settings[f"meta_init={meta_init}"] = json.loads(rows_file.read_text())
    result = {
        "benchmark": "startup",
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({platform.processor()})",
        "cpus": os.cpu_count(),
        "versions": provenance.versions("diffusers"),
        "commit": provenance.commit(),
        "shape": {"unet": args.unet, "ranks": args.ranks, "resolution": args.resolution, "reference": "copy"},
        "measured": settings,
        "flux1_dev_8_ranks_computed": flux_estimate(8),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
