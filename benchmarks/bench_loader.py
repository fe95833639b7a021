"""Loader throughput: pairs/s for JPEG pairs and frames/s for clips, each decoder on the same data.

    python benchmarks/bench_loader.py                     # on a GPU: 1024px JPEG pairs, 720p VP9 + H.264 clips
    python benchmarks/bench_loader.py --size 512 --frames 81 --clips 4
    python benchmarks/bench_loader.py --smoke --out /tmp/loader.json    # CPU: checks the harness
    python benchmarks/bench_loader.py --sampler-only --out /tmp/sampler.json   # the sampler rows alone

Images: a pair (winner and loser JPEG, `--size` px square) is decoded as the image sources do, two
images a call through loaders/dali.py `decode_images`: PIL, DALI's CPU decoder, and nvJPEG (DALI
"mixed") where CUDA is. Video: every frame of each clip at its own size, through the loaders'
decoders: PyAV (`decode_pyav`), DALI's CPU decoder (VP9 only: it cannot do H.264) and NVDEC (DALI
"mixed", where the driver's libnvcuvid is). Frames/s counts decoded frames; pairs/s counts pairs.

Sampler: the cost of `PairSampler.next_batch` per call, the host work the training thread pays for
each micro-batch of a cached run, at 1M and 10M pairs (`--sampler-pairs`), `--sampler-batch` pairs
per rank on `--sampler-ranks` ranks. The first call draws the epoch's permutation and is reported
apart (`first_call_s`) from the steady state (up to `--sampler-calls` later calls of the same
epoch, each timed alone: mean and median).
The `regenerate` row is the sampler as it was before the per-epoch cache, the whole permutation
drawn again for every call, timed at the first size only, for the ratio in the same run.

Pipeline (`--pipeline`, `--pipeline-only`): the training data path itself, per recipe (default
sd15-pickapic-poly, vipo-sdxl-poly, vipo-wan-poly): the recipe's data settings (size, buckets,
crops, flips, frames) on generated files (`--pipeline-pairs` 1024px JPEG q90 pairs in a manifest; an
eighth as many pairs of 1280x720 H.264 clips, the recipe's frames plus 16, in a video manifest), read through `BatchStream` with each of
`--workers` (0: the one prefetch thread; k: k DataLoader workers), a micro-batch of the pairs one
GPU decodes per step, with the decoder training picks (`decoder`: "loader" for PIL / PyAV in the
loader, "mixed" where DALI's batch decoder runs nvJPEG / NVDEC on the GPU). Each row: wall-clock pairs/s after a warm-up batch, and, for 0 workers, the
process CPU time per pair over the same batches (decoders may thread: PyAV does), whose inverse is
pairs/s per CPU core. With `--step-time RECIPE=SECONDS` (a GPU step's time, from `vipo bench step`
or stated), `cores_per_gpu` is the cores whose decode of one step's pairs takes no longer than the
step (prefetch then hides it: data wait 0, against the 2% target), plus one for the training process.
CPU per pair is CPU work wherever it runs, so the CPU pipeline JSON is committed
(`--pipeline-only --out benchmarks/results/loader-pipeline-cpu.json`), with the CPU model.

Image batches (`image-batch` rows): what a training micro-batch costs, `--batch-pairs` pairs
cropped, resized to `--target` px (Lanczos) and flipped as PairTransform does: PIL in the loader,
against one run of DALI's batch pipeline (loaders/dali.py `decode_pairs`) on its CPU device and,
where CUDA is, nvJPEG ("mixed"), whose output stays on the GPU (timed after a synchronize).

Each decoder figure is the median of `--repeats` timed passes after one warm-up pass (DALI builds its
pipeline then). The decoders are synchronous and return host arrays (DALI "mixed" outputs are
copied back to the host, as loaders/dali.py does), so wall-clock time around a call is the cost a
data-loading thread pays. The data are generated here (smooth gradients plus noise, JPEG quality 90;
clips encoded with PyAV) in a temporary folder.

Results: benchmarks/results/loader-<device>-<date>.json on a GPU machine (or `--out`), with device,
CPU count, versions, commit, date and shapes. CPU decode timings on shared machines are noise: a
CPU run needs `--out` outside results/ and is never committed. The sampler's cost is CPU work on
every machine: `--sampler-only --out benchmarks/results/loader-sampler-cpu.json` is committed, as is
the pipeline's (below).
"""

import argparse
import datetime
import io
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vipo.benchmarks import provenance
from vipo.loaders import dali
from vipo.loaders.sampler import PairSampler
from vipo.loaders.video import FrameSampling, decode_pyav, plan_clip, probe

RESULTS = Path(__file__).resolve().parent / "results"
CODECS = {
    "vp9": ("libvpx-vp9", ".webm", {"deadline": "realtime", "cpu-used": "8"}),
    "h264": ("libx264", ".mp4", {"preset": "ultrafast"}),
}


def _content(width: int, height: int, seed: int) -> np.ndarray:
    """Gradients plus noise: compresses like a photo, not like a flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    tint = rng.uniform(0.2, 1.0, 3)
    base = (
        np.stack([x / width * tint[0], y / height * tint[1], (x + y) / (width + height) * tint[2]], -1) * 255
    )
    return np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)


def make_jpeg_pairs(count: int, size: int) -> list[tuple[bytes, bytes]]:
    pairs = []
    for i in range(count):
        blobs = []
        for k in range(2):
            buffer = io.BytesIO()
            Image.fromarray(_content(size, size, 2 * i + k)).save(buffer, format="JPEG", quality=90)
            blobs.append(buffer.getvalue())
        pairs.append(tuple(blobs))
    return pairs


def make_clip(path: Path, codec: str, width: int, height: int, frames: int, seed: int) -> Path:
    import av

    encoder, _, options = CODECS[codec]
    base = _content(width, height, seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(encoder, rate=24, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(frames):
            frame = np.roll(base, 8 * k, axis=1)  # motion, so inter frames carry data
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def _timed(run, repeats: int) -> list[float]:
    run()  # warm-up: pipelines are built, files are in the page cache
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return seconds


def _row(kind: str, backend: str, items: int, unit: str, seconds: list[float], **extra) -> dict:
    median = statistics.median(seconds)
    return {
        "kind": kind,
        "backend": backend,
        "items": items,
        "unit": unit,
        "median_s": median,
        "min_s": min(seconds),
        "max_s": max(seconds),
        "repeats": len(seconds),
        f"{unit}_per_s": items / median,
        **extra,
    }


def bench_images(pairs: list[tuple[bytes, bytes]], repeats: int, cuda: bool) -> list[dict]:
    backends = [("pil", "pil", "auto")]
    if dali.dali_available():
        backends.append(("dali-cpu", "dali", "cpu"))
        if cuda:
            backends.append(("dali-mixed", "dali", "mixed"))
    rows = []
    for name, backend, device in backends:
        used = set()

        def run(backend=backend, device=device, used=used):
            for winner, loser in pairs:
                _, decoded_by = dali.decode_images([winner, loser], ["winner", "loser"], backend, device)
                used.add(decoded_by)

        seconds = _timed(run, repeats)
        if used != {name}:  # decode_images falls back to PIL when DALI fails: never report that as DALI
            rows.append({"kind": "image", "backend": name, "error": f"decoded by {sorted(used)}"})
            continue
        pixels = sum(2 * np.prod(Image.open(io.BytesIO(w)).size) for w, _ in pairs)
        rows.append(
            _row(
                "image",
                name,
                len(pairs),
                "pairs",
                seconds,
                megapixels_per_s=pixels / 1e6 / statistics.median(seconds),
            )
        )
    return rows


def bench_image_batches(
    pairs: list[tuple[bytes, bytes]], repeats: int, cuda: bool, batch: int, target: int
) -> list[dict]:
    """The training path's work a micro-batch: headers, decode, crop, resize to `target` px
    (Lanczos) and flip of `batch` pairs, by PIL in the loader (`decoder` pil) or by one run of
    DALI's batch pipeline (`decode_pairs`; nvJPEG "mixed" leaves the batch on the GPU, where
    the time is taken after a synchronize)."""
    from vipo.loaders.images import PairTransform
    from vipo.loaders.records import PairRecord

    decoders = ["pil"] + (["cpu"] + (["mixed"] if cuda else []) if dali.dali_available() else [])
    rows = []
    for decoder in decoders:
        transform = PairTransform(target, random_crop=True, flip_prob=0.5, decoder=decoder)

        def run(transform=transform, decoder=decoder):
            for start in range(0, len(pairs), batch):
                records = []
                for k, (winner, loser) in enumerate(pairs[start : start + batch]):
                    key = f"pair-{start + k}"
                    first, second, _ = transform.pair(winner, loser, refs=("winner", "loser"), key=key)
                    records.append(PairRecord(key, "", first, second))
                if decoder != "pil":
                    dali.decode_pairs(records, decoder, _no_stand_in)
            if decoder == "mixed":
                torch.cuda.synchronize()

        name = "pil" if decoder == "pil" else f"dali-{decoder}"
        seconds = _timed(run, repeats)
        rows.append(_row("image-batch", name, len(pairs), "pairs", seconds, batch_pairs=batch, target=target))
    return rows


def _no_stand_in(position, record, bad):
    raise bad  # generated data: a bad image here is a bug in the benchmark


def bench_video(clips: dict[str, list[Path]], repeats: int) -> list[dict]:
    rows = []
    for codec, paths in clips.items():
        infos = [probe(p) for p in paths]
        plans = [
            plan_clip(
                info, FrameSampling(info.num_frames, stride=1, start="start"), (info.height, info.width)
            )
            for info in infos
        ]
        frames = sum(len(plan.frame_indices) for plan in plans)
        backends = [("pyav", None)]
        if dali.dali_available():
            backends.append(("dali-cpu", "cpu"))
            if dali.nvdec_available():
                backends.append(("dali-mixed", "mixed"))
        for name, device in backends:
            if device is None:

                def run(infos=infos, plans=plans):
                    for info, plan in zip(infos, plans, strict=True):
                        decode_pyav(info, plan)
            else:
                chosen, reason = dali.choose_video_backend(codec, "dali", device)
                if chosen != name:
                    rows.append({"kind": "video", "codec": codec, "backend": name, "unsupported": reason})
                    continue

                def run(infos=infos, plans=plans, device=device, name=name):
                    for info, plan in zip(infos, plans, strict=True):
                        (clip,) = dali.decode_clips([(info, plan)], "dali", device)
                        if clip.backend != name:
                            raise RuntimeError(
                                f"{info.path}: decoded by {clip.backend}, not {name}: {clip.reason}"
                            )

            rows.append(_row("video", name, frames, "frames", _timed(run, repeats), codec=codec))
    return rows


PIPELINE_RECIPES = ("sd15-pickapic-poly", "vipo-sdxl-poly", "vipo-wan-poly")


def make_image_manifest(folder: Path, pairs: int, size: int) -> Path:
    lines = []
    for i, (winner, loser) in enumerate(make_jpeg_pairs(pairs, size)):
        for name, data in ((f"w{i}.jpg", winner), (f"l{i}.jpg", loser)):
            (folder / name).write_bytes(data)
        lines.append(json.dumps({"prompt": f"pair {i}", "winner": f"w{i}.jpg", "loser": f"l{i}.jpg"}))
    (folder / "images.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "images.jsonl"


def make_clip_manifest(folder: Path, pairs: int, width: int, height: int, frames: int) -> Path:
    lines = []
    for i in range(pairs):
        for side in ("w", "l"):
            make_clip(folder / f"{side}{i}.mp4", "h264", width, height, frames, seed=2 * i + (side == "l"))
        lines.append(json.dumps({"prompt": f"clip {i}", "winner": f"w{i}.mp4", "loser": f"l{i}.mp4"}))
    (folder / "clips.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "clips.jsonl"


def pairs_per_gpu(cfg, gpus: int) -> int:
    """Pairs one GPU decodes a micro-batch: the global micro-batch over the data groups (a context
    group's ranks share a pair, and each of them reads it)."""
    cp = cfg.parallel.context_parallel
    groups = gpus // cp.size
    return max(1, cfg.train.batch_pairs // groups)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def bench_pipeline(cfg, batch: int, workers: list[int], batches: int) -> list[dict]:
    """pairs/s of the recipe's data path through BatchStream for each worker count."""
    from vipo.engine.data import BatchStream, build_source

    rows = []
    for count in workers:
        # As training builds it: on a GPU with DALI, batches decode with nvJPEG / NVDEC.
        source = build_source(cfg.data, cfg.model, cfg.train.seed, batch_decode=True)
        stream = BatchStream(source, batch, cfg.train.seed, num_workers=count, prefetch_batches=2)
        try:
            stream.next_records()  # warm-up: workers start, files reach the page cache
            cpu, start = _cpu_seconds(), time.perf_counter()
            for _ in range(batches):
                records = stream.next_records()
            if stream.decoder == "mixed":
                torch.cuda.synchronize()  # the batch decoder's copy runs on torch's stream
            wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        finally:
            stream.close()
        pairs = batches * batch
        row = {
            "kind": "pipeline",
            "workers": count,
            "decoder": stream.decoder or "loader",  # a DALI device, or the source's own PIL / PyAV
            "pairs": pairs,
            "batch_pairs": batch,
            "output": list(records[0].winner.shape),
            "wall_s": wall,
            "pairs_per_s": pairs / wall,
        }
        if count == 0:  # every decode ran in this process: its CPU time is the decode's
            row.update(cpu_s_per_pair=cpu / pairs, pairs_per_s_per_core=pairs / cpu)
        stats = stream.stats()
        if "clips_pyav" in stats or "clips_dali" in stats:
            row["clips_by"] = {k: v for k, v in stats.items() if k.startswith("clips_")}
        rows.append(row)
    return rows


def cores_per_gpu(per_pair_cpu_s: float, batch: int, step_s: float) -> dict:
    """Decode cores so that one step's pairs are decoded within the step, plus the trainer's own."""
    decode = batch * per_pair_cpu_s / step_s
    return {"step_s": step_s, "decode_cores": decode, "cores_per_gpu": math.ceil(decode) + 1}


def run_pipelines(args) -> tuple[list[dict], dict]:
    from vipo.configs import find_recipe
    from vipo.engine.config import load_config

    rows, summary = [], {}
    with tempfile.TemporaryDirectory(prefix="vipo-bench-pipeline-") as tmp:
        folder = Path(tmp)
        images = clips = None
        for recipe in args.recipes:
            base = load_config(find_recipe(recipe), args.pipeline_overrides)
            video = base.data.source == "video"
            if video and clips is None:
                frames = base.data.num_frames + 16
                clips = make_clip_manifest(
                    folder, args.pipeline_pairs // 8 or 1, args.width, args.height, frames
                )
            if not video and images is None:
                images = make_image_manifest(folder, args.pipeline_pairs, args.size)
            overrides = [f"data.path={clips}"] if video else ["data.source=manifest", f"data.path={images}"]
            cfg = load_config(find_recipe(recipe), overrides + args.pipeline_overrides)
            batch = pairs_per_gpu(cfg, args.gpus)
            batches = max(2, args.pipeline_batches // 2) if video else args.pipeline_batches
            found = bench_pipeline(cfg, batch, args.workers, batches)
            for row in found:
                row["recipe"] = recipe
            rows += found
            entry = {"pairs_per_gpu_step": batch, "source": "video" if video else "images"}
            single = next((r for r in found if r["workers"] == 0), None)
            if single is not None:
                entry["cpu_s_per_pair"] = single["cpu_s_per_pair"]
                if recipe in args.step_time:
                    entry.update(cores_per_gpu(single["cpu_s_per_pair"], batch, args.step_time[recipe]))
            summary[recipe] = entry
    return rows, summary


def cpu_model() -> str:
    """The CPU's model name (platform.processor() is empty on most Linux machines)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _regenerating_call(sampler: PairSampler) -> list[int]:
    """`next_batch` before the per-epoch cache: the epoch's whole permutation drawn for every call."""
    if sampler.batch_in_epoch >= sampler.batches_per_epoch:
        sampler.epoch, sampler.batch_in_epoch = sampler.epoch + 1, 0
    order = np.random.default_rng([sampler.seed, sampler.epoch]).permutation(sampler.num_items)
    start = (sampler.batch_in_epoch * sampler.world_size + sampler.rank) * sampler.batch_size
    sampler.batch_in_epoch += 1
    return order[start : start + sampler.batch_size].tolist()


def _each_call(call, calls: int) -> list[float]:
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def bench_sampler(sizes: list[int], batch: int, ranks: int, calls: int, old_calls: int) -> list[dict]:
    """Seconds per `next_batch` of the last rank: first call apart, then the rest of one epoch."""
    rows = []
    shape = {"batch_per_rank": batch, "ranks": ranks}
    for n in sizes:
        sampler = PairSampler(n, batch, seed=0, rank=ranks - 1, world_size=ranks)
        (first,) = _each_call(sampler.next_batch, 1)
        steady = min(calls, sampler.batches_per_epoch - 1)  # no second permutation in the steady state
        seconds = _each_call(sampler.next_batch, steady)
        rows.append(
            _row(
                "sampler",
                "cached",
                1,
                "calls",
                seconds,
                pairs=n,
                **shape,
                first_call_s=first,
                mean_s=statistics.fmean(seconds),
            )
        )
    sampler = PairSampler(sizes[0], batch, seed=0, rank=ranks - 1, world_size=ranks)
    seconds = _each_call(lambda: _regenerating_call(sampler), old_calls)
    rows.append(
        _row(
            "sampler",
            "regenerate",
            1,
            "calls",
            seconds,
            pairs=sizes[0],
            **shape,
            first_call_s=seconds[0],
            mean_s=statistics.fmean(seconds),
        )
    )
    return rows


def _sampler_ratios(rows: list[dict]) -> dict:
    """Speed of the cached sampler over the regenerating one at the same size, from the same run."""
    speed = {(r["backend"], r["pairs"]): r["calls_per_s"] for r in rows if r["kind"] == "sampler"}
    return {
        f"sampler-{n}: cached / regenerate": speed[("cached", n)] / base
        for (backend, n), base in speed.items()
        if backend == "regenerate" and ("cached", n) in speed
    }


def _ratios(rows: list[dict]) -> dict:
    """Speed of each DALI decoder over the CPU decoder it replaces, from the same run."""
    speed = {
        (r["kind"], r.get("codec"), r["backend"]): r.get("pairs_per_s") or r.get("frames_per_s")
        for r in rows
        if "median_s" in r and r["kind"] != "sampler"
    }
    ratios = {}
    for (kind, codec, backend), value in speed.items():
        cpu = "pil" if kind.startswith("image") else "pyav"
        base = speed.get((kind, codec, cpu))
        if backend.startswith("dali") and base:
            ratios[f"{kind}{'-' + codec if codec else ''}: {backend} / {cpu}"] = value / base
    return ratios


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="JPEG side in pixels")
    parser.add_argument("--pairs", type=int, default=32, help="JPEG pairs a pass")
    parser.add_argument("--batch-pairs", type=int, default=8, help="image-batch rows: pairs a DALI run")
    parser.add_argument("--target", type=int, default=512, help="image-batch rows: output side in pixels")
    parser.add_argument("--clip-size", default="1280x720", help="clip WIDTHxHEIGHT")
    parser.add_argument("--frames", type=int, default=33, help="frames per clip")
    parser.add_argument("--clips", type=int, default=2, help="clips per codec")
    parser.add_argument("--codecs", default="vp9,h264", help=f"comma-separated, of {', '.join(CODECS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (median reported)")
    parser.add_argument(
        "--sampler-pairs", default="1000000,10000000", help="comma-separated data set sizes for the sampler"
    )
    parser.add_argument("--sampler-batch", type=int, default=8, help="sampler pairs per rank a micro-batch")
    parser.add_argument("--sampler-ranks", type=int, default=8, help="sampler world size")
    parser.add_argument(
        "--sampler-calls", type=int, default=10000, help="steady-state sampler calls timed (within one epoch)"
    )
    parser.add_argument(
        "--sampler-old-calls", type=int, default=20, help="calls of the regenerating sampler timed"
    )
    parser.add_argument("--sampler-only", action="store_true", help="time the sampler alone, no decoders")
    parser.add_argument("--pipeline", action="store_true", help="also time the recipes' data paths")
    parser.add_argument(
        "--pipeline-only", action="store_true", help="time the recipes' data paths alone (and the sampler)"
    )
    parser.add_argument("--recipes", default=",".join(PIPELINE_RECIPES), help="comma-separated recipes")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the recipes' micro-batch is split over")
    parser.add_argument("--pipeline-pairs", type=int, default=16, help="image pairs generated (clips: 1/8)")
    parser.add_argument("--pipeline-batches", type=int, default=8, help="timed micro-batches (clips: half)")
    parser.add_argument(
        "--step-time",
        action="append",
        default=[],
        metavar="RECIPE=SECONDS",
        help="a GPU micro-batch step's time, for cores per GPU (repeatable)",
    )
    parser.add_argument("--step-time-note", default="", help="where the step times come from (recorded)")
    parser.add_argument(
        "--pipeline-override",
        dest="pipeline_overrides",
        action="append",
        default=[],
        help="a recipe override",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: checks the harness, times nothing useful"
    )
    parser.add_argument(
        "--out", type=Path, help="result file (default on a GPU: results/loader-<device>-<date>.json)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.pairs, args.clip_size, args.frames, args.clips, args.repeats = 64, 2, "64x48", 5, 1, 1
        args.batch_pairs, args.target = 2, 32
        args.sampler_pairs, args.sampler_calls, args.sampler_old_calls = "10000,100000", 50, 3
        args.pipeline_pairs, args.pipeline_batches, args.gpus = 8, 8, 64
        args.pipeline_overrides = [*args.pipeline_overrides, "data.num_frames=5"]
    args.width, args.height = (int(v) for v in args.clip_size.split("x"))
    args.recipes = [r for r in args.recipes.split(",") if r]
    args.workers = [int(v) for v in args.workers.split(",")]
    step_times = {}
    for item in args.step_time:
        recipe, _, value = item.partition("=")
        try:
            step_times[recipe] = float(value)
        except ValueError:
            parser.error(f"--step-time {item!r}: expected RECIPE=SECONDS")
        if recipe not in args.recipes or step_times[recipe] <= 0:
            parser.error(f"--step-time {item!r}: the recipe must be one of --recipes and the time > 0")
    args.step_time = step_times
    args.sampler_pairs = [int(v) for v in args.sampler_pairs.split(",")]
    unknown = set(args.codecs.split(",")) - set(CODECS)
    if unknown:
        parser.error(f"--codecs: unknown {', '.join(sorted(unknown))}; known: {', '.join(CODECS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    # Decoder rates on a shared CPU are noise; the sampler's cost and the pipeline's CPU time per
    # pair are CPU work wherever they run.
    if (
        not cuda
        and not (args.sampler_only or args.pipeline_only)
        and args.out is not None
        and args.out.resolve().parent == RESULTS.resolve()
    ):
        sys.exit(
            f"--out {args.out}: CPU decoder timings are never committed (only --sampler-only and "
            f"--pipeline-only runs); write them outside {RESULTS}"
        )
    width, height = args.width, args.height
    rows, shapes = [], {}
    if not (args.sampler_only or args.pipeline_only):
        with tempfile.TemporaryDirectory(prefix="vipo-bench-loader-") as folder:
            pairs = make_jpeg_pairs(args.pairs, args.size)
            clips = {
                codec: [
                    make_clip(
                        Path(folder) / f"{codec}-{i}{CODECS[codec][1]}",
                        codec,
                        width,
                        height,
                        args.frames,
                        seed=i,
                    )
                    for i in range(args.clips)
                ]
                for codec in args.codecs.split(",")
            }
            rows = bench_images(pairs, args.repeats, cuda)
            rows += bench_image_batches(pairs, args.repeats, cuda, args.batch_pairs, args.target)
            rows += bench_video(clips, args.repeats)
        shapes = {
            "jpeg": [args.size, args.size, 3],
            "jpeg_pairs": args.pairs,
            "jpeg_bytes_mean": int(np.mean([len(b) for pair in pairs for b in pair])),
            "clip": [args.frames, height, width, 3],
            "clips_per_codec": args.clips,
            "codecs": args.codecs,
        }
    pipelines = {}
    if args.pipeline or args.pipeline_only:
        found, pipelines = run_pipelines(args)
        rows += found
        shapes["pipeline"] = {
            "jpeg": [args.size, args.size, 3],
            "clip": [width, height, "recipe frames + 16", "h264"],
            "gpus": args.gpus,
            "workers": args.workers,
            "overrides": args.pipeline_overrides,
        }
    rows += bench_sampler(
        args.sampler_pairs, args.sampler_batch, args.sampler_ranks, args.sampler_calls, args.sampler_old_calls
    )
    shapes["sampler"] = {
        "pairs": args.sampler_pairs,
        "batch_per_rank": args.sampler_batch,
        "ranks": args.sampler_ranks,
        "steady_calls": args.sampler_calls,
        "regenerate_calls": args.sampler_old_calls,
    }
    device = torch.cuda.get_device_name() if cuda else cpu_model()
    report = {
        "kind": "loader",
        "smoke": args.smoke,
        "device": device,
        "device_type": "cuda" if cuda else "cpu",
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "nvdec": dali.nvdec_available(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": provenance.commit(),
        "versions": provenance.versions("numpy", "PIL", "av", "nvidia.dali"),
        "sampler_only": args.sampler_only,
        "shapes": shapes,
        "rows": rows,
        "ratios": {**_ratios(rows), **_sampler_ratios(rows)},
        "pipelines": pipelines,
        "step_times_s": args.step_time,
        "step_time_note": args.step_time_note,
    }
    for row in rows:
        if row["kind"] == "pipeline":
            per_core = row.get("pairs_per_s_per_core")
            print(
                f"pipeline {row['recipe']:20} {row['workers']} workers {row['pairs_per_s']:8.2f} pairs/s"
                + (f", {per_core:.2f} pairs/s per core" if per_core else "")
            )
            continue
        if row["kind"] == "sampler":
            print(
                f"sampler {row['pairs']:>9} pairs {row['backend']:10} "
                f"{row['mean_s'] * 1e6:10.1f} us/call mean, {row['median_s'] * 1e6:.1f} median, "
                f"first call {row['first_call_s'] * 1e3:.1f} ms"
            )
            continue
        figure = (
            f"{row['pairs_per_s']:.1f} pairs/s"
            if "pairs_per_s" in row
            else (
                f"{row['frames_per_s']:.1f} frames/s"
                if "frames_per_s" in row
                else row.get("unsupported") or row.get("error")
            )
        )
        print(f"{row['kind']:5} {row.get('codec') or '':5} {row['backend']:10} {figure}")
    for name, ratio in report["ratios"].items():
        print(f"{name}: {ratio:.2f}x")
    for recipe, entry in pipelines.items():
        if "cores_per_gpu" in entry:
            print(
                f"{recipe}: {entry['pairs_per_gpu_step']} pairs a GPU in {entry['step_s']} s a step need "
                f"{entry['decode_cores']:.2f} decode cores: {entry['cores_per_gpu']} cores per GPU"
            )
    out = args.out or (
        RESULTS / f"loader-{device.replace(' ', '_')}-{report['date'][:10]}.json" if cuda else None
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    else:
        print("CPU run: nothing written (pass --out to keep it outside results/)")
    return report


if __name__ == "__main__":
    main()
