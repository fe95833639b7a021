"""`vipo sample`: images (videos for Wan) for a prompt file, from a trained run or a model folder.

    vipo sample runs/sd15-poly --prompts prompts.txt --n 4 --out samples/poly --seed 0

SOURCE is one of
- a run folder (its checkpoints/latest) or one checkpoint folder (model.safetensors + config.yaml):
  the model is rebuilt from the saved config as the trainer built it, then the checkpoint's
  weights are loaded (the LoRA weights alone for a LoRA run, put back through peft);
- a diffusers folder (model_index.json) of one of the five families, loaded with its pipeline.

A model with real weights (`model.path`) samples through its family's diffusers pipeline with the
trained denoiser in place of the folder's. The tiny random-weight builds have no pipeline (their
tokenizers are word lists): eps-prediction ones sample with DDIM (sampling.py), flow-matching
ones with Euler steps along the velocity, in their latent space, decoded by their VAE if any.

Image i of prompt p uses seed `seed + p * n + i`, alone: an image does not depend on the batch
it was drawn in, and index.jsonl records every seed, so any image can be re-made by itself.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import RunError
from ..families import FAMILIES

log = logging.getLogger(__name__)

PIPELINES = {name: f.pipeline for name, f in FAMILIES.items()}
PIPELINE_PARTS = (
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "vae",
)


@dataclass(frozen=True)
class Job:
    prompt_index: int
    prompt: str
    sample: int
    seed: int


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a .txt file (one a line; blank lines skipped), or a .jsonl/.json file of
    {"prompt": ...} objects (a .json file may also hold a list of strings)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunError(f"prompt file not found: {path}") from None
    prompts = []
    if path.suffix in (".jsonl", ".json"):
        items = (
            json.loads(text)
            if path.suffix == ".json"
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
        for number, item in enumerate(items, start=1):
            prompt = item if isinstance(item, str) else item.get("prompt") if isinstance(item, dict) else None
            if not isinstance(prompt, str):
                raise RunError(f'{path}: item {number} has no "prompt" string: {item!r}')
            prompts.append(prompt)
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise RunError(f"prompt file {path} holds no prompts")
    return prompts


def plan(prompts: list[str], n: int, seed: int) -> list[Job]:
    return [Job(p, prompt, i, seed + p * n + i) for p, prompt in enumerate(prompts) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Sources


def resolve_source(path: str | Path) -> tuple[str, Path]:
    """("diffusers", folder) or ("checkpoint", checkpoint folder) for a SOURCE argument."""
    from ..checkpoint import trusted_checkpoint

    path = Path(path)
    if (path / "model_index.json").is_file():
        return "diffusers", path
    if (path / "model.safetensors").is_file() and (path / "config.yaml").is_file():
        return "checkpoint", trusted_checkpoint(path, "sample")
    if (path / "checkpoints").is_dir():
        return "checkpoint", trusted_checkpoint(path, "sample")
    raise RunError(
        f"{path}: not a run folder (checkpoints/latest), a checkpoint folder (model.safetensors + "
        "config.yaml) or a diffusers model folder (model_index.json)"
    )


def load_run(checkpoint: Path, device: torch.device):
    """(config, adapter) of a checkpoint: the model built as the trainer builds it
    (models.build_adapter: same seed, init_from and LoRA), the checkpoint's weights on top. Tiny
    random-weight builds also need the data set's vocabulary for their word tokenizer."""
    from ..checkpoint import load_weights
    from ..config import load_config
    from ..data import build_source
    from ..models import build_adapter

    cfg = load_config(checkpoint / "config.yaml")
    vocabulary = None if cfg.model.path else build_source(cfg.data, cfg.model, cfg.train.seed).vocabulary()
    adapter = build_adapter(cfg.model, device, seed=cfg.train.seed, trainable=True, vocabulary=vocabulary)
    load_weights(checkpoint, adapter.network, what="sample")
    adapter.network.eval().requires_grad_(False)
    log.info("loaded %s (%s)", checkpoint, "LoRA" if cfg.model.lora_rank else "full")
    return cfg, adapter


def pipeline_class(family: str):
    import diffusers

    return getattr(diffusers, PIPELINES[family])


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """from_pretrained's dtype argument: `dtype` where diffusers has it (`torch_dtype` is
    deprecated there), `torch_dtype` in older releases."""
    from diffusers.pipelines import pipeline_utils

    return {"dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype": dtype}


def load_diffusers(folder: Path, dtype: torch.dtype, device: torch.device):
    """(family, pipeline) of a diffusers folder; only the five families' pipelines are accepted,
    so a folder cannot name a custom pipeline whose code would be run."""
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    name = index.get("_class_name")
    families = {cls: family for family, cls in PIPELINES.items()}
    if not isinstance(name, str) or name not in families:
        raise RunError(
            f"{folder}/model_index.json: pipeline {name!r} is not one of {', '.join(PIPELINES.values())}"
        )
    family = families[name]
    return family, pipeline_class(family).from_pretrained(folder, **dtype_kwarg(dtype)).to(device)


# ---------------------------------------------------------------------------------------------
# Samplers of the tiny random-weight builds


def latent_shape(adapter, resolution: int) -> tuple[int, ...]:
    """One latent's shape, from encoding a blank image of the training resolution."""
    pixels = torch.zeros(1, 3, resolution, resolution, device=adapter.device)
    return tuple(adapter.encode_pixels(pixels).shape[1:])


def decode_latents(adapter, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] of latents (the adapter's own inverse of encode_pixels)."""
    return adapter.decode_latents(latents)


@torch.no_grad()
def flow_euler_sample(adapter, prompts: list[str], noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Euler steps of dx/dt = v from t = 1 (noise) to t = 0: x_t = (1 - t) x0 + t eps has
    velocity eps - x0, which is what the flow families predict."""
    network = adapter.network
    cond = adapter.encode_prompts(prompts)
    x = noise.to(adapter.device, torch.float32)
    times = torch.linspace(1.0, 0.0, steps + 1, device=adapter.device)
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        t_batch = torch.full((x.shape[0],), float(t), device=x.device)
        velocity = adapter.predict(network, x.to(adapter.dtype), t_batch, cond).float()
        x = x + (t_next - t) * velocity
    return decode_latents(adapter, x)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] or [N, 3, F, H, W] in [-1, 1] -> [N, H, W, 3] or [N, F, H, W, 3] uint8."""
    images = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return (images.permute(0, 2, 3, 4, 1) if images.dim() == 5 else images.permute(0, 2, 3, 1)).numpy()


def tiny_sampler(cfg, adapter, steps: int):
    from .sampling import ddim_sample

    resolution = cfg.data.resolution
    shape = latent_shape(adapter, resolution)

    def run(jobs: list[Job]) -> np.ndarray:
        if adapter.prediction_type == "epsilon":
            # ddim_sample draws the noise of a whole call from one seed: one image a call keeps
            # each image a function of its own seed.
            return np.concatenate(
                [
                    ddim_sample(adapter, adapter.network, [j.prompt], shape, steps=steps, seed=j.seed)
                    for j in jobs
                ]
            )
        noise = torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(j.seed)) for j in jobs]
        )
        return to_uint8(flow_euler_sample(adapter, [j.prompt for j in jobs], noise, steps))

    return run


def run_pipeline(cfg, adapter, dtype: torch.dtype | None, device: torch.device | None):
    """The family's pipeline on `model.path` with the run's denoiser and the adapter's encoders
    and VAE (named as the pipelines name them), so nothing is loaded twice. `dtype` / `device`
    None: the parts stay as they are (validation during training samples the live modules, which
    a cast would change for the rest of the run)."""
    components = {
        name: getattr(adapter, name) for name in PIPELINE_PARTS if getattr(adapter, name, None) is not None
    }
    components[FAMILIES[cfg.model.family].denoiser] = adapter.network
    pipe = pipeline_class(cfg.model.family).from_pretrained(cfg.model.path, **components)
    if dtype is not None:
        pipe = pipe.to(dtype)
    return pipe.to(device) if device is not None else pipe


def pipeline_sampler(pipe, family: str, steps: int, options: dict):
    def run(jobs: list[Job]) -> np.ndarray:
        generators = [torch.Generator().manual_seed(j.seed) for j in jobs]
        kwargs = {key: value for key, value in options.items() if value is not None}
        out = pipe(
            prompt=[j.prompt for j in jobs],
            generator=generators,
            num_inference_steps=steps,
            output_type="np",
            **kwargs,
        )
        frames = out.frames if FAMILIES[family].video else out.images
        return (np.clip(np.asarray(frames), 0.0, 1.0) * 255).round().astype(np.uint8)

    return run


# ---------------------------------------------------------------------------------------------
# Output


def write_video(frames: np.ndarray, path: Path, fps: int) -> Path:
    """[F, H, W, 3] uint8 -> H.264 .mp4 (VP9 .webm where this FFmpeg has no libx264)."""
    import av

    codec, suffix = ("libx264", ".mp4") if "libx264" in av.codecs_available else ("libvpx-vp9", ".webm")
    path = path.with_suffix(suffix)
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:  # yuv420p needs even sides
        frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(
                stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24"))
            )
        container.mux(stream.encode())
    return path


def save_media(array: np.ndarray, out_dir: Path, job: Job, fps: int) -> Path:
    """An image as PNG; a video (4-D, more than one frame) as a video file."""
    from PIL import Image

    stem = f"p{job.prompt_index:05d}_s{job.sample:02d}"
    if array.ndim == 4 and array.shape[0] > 1:
        return write_video(array, out_dir / "videos" / stem, fps)
    path = out_dir / "images" / f"{stem}.png"
    Image.fromarray(array[0] if array.ndim == 4 else array).save(path)
    return path


def sample(
    source: str | Path,
    prompts_file: str | Path,
    out_dir: str | Path,
    *,
    n: int = 4,
    seed: int = 0,
    steps: int | None = None,
    batch: int = 4,
    device: str = "auto",
    dtype: str = "auto",
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    fps: int = 16,
    progress: bool = True,
) -> dict:
    """Sample `n` images per prompt of `prompts_file` into `out_dir`; returns the summary."""
    from ..trainer import pick_device

    if n < 1 or batch < 1:
        raise RunError(f"--n and --batch must be >= 1, got {n} and {batch}")
    prompts = read_prompts(prompts_file)
    kind, path = resolve_source(source)
    torch_device = pick_device(device)
    torch_dtype = {
        "auto": torch.bfloat16 if torch_device.type == "cuda" else torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[dtype]
    options = {"guidance_scale": guidance, "height": height, "width": width}
    extra = {"num_frames": frames}
    if kind == "diffusers":
        family, pipe = load_diffusers(path, torch_dtype, torch_device)
        steps = steps or 50
        run = pipeline_sampler(pipe, family, steps, {**options, **(extra if FAMILIES[family].video else {})})
    else:
        from ..config import load_config

        # A real model is assembled on the CPU and cast before it moves: a FLUX or Wan build in
        # fp32 on the GPU first would need twice the memory it samples in.
        real = load_config(path / "config.yaml").model.path is not None
        cfg, adapter = load_run(path, torch.device("cpu") if real else torch_device)
        family = cfg.model.family
        if real:
            run = pipeline_sampler(
                run_pipeline(cfg, adapter, torch_dtype, torch_device),
                family,
                steps or 50,
                {**options, **(extra if FAMILIES[family].video else {})},
            )
            steps = steps or 50
        else:
            steps = steps or 25
            run = tiny_sampler(cfg, adapter, steps)
    out_dir = Path(out_dir)
    for sub in ("images", "videos"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    jobs = plan(prompts, n, seed)
    rows = []
    bar = tqdm(total=len(jobs), desc="sample", unit="img", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        arrays = run(chunk)
        for job, array in zip(chunk, arrays, strict=True):
            file = save_media(array, out_dir, job, fps)
            rows.append(
                {
                    "prompt_index": job.prompt_index,
                    "prompt": job.prompt,
                    "sample": job.sample,
                    "seed": job.seed,
                    "file": str(file.relative_to(out_dir)),
                }
            )
        bar.update(len(chunk))
    bar.close()
    for sub in ("images", "videos"):
        if not any((out_dir / sub).iterdir()):
            (out_dir / sub).rmdir()
    with open(out_dir / "index.jsonl", "w", encoding="utf-8") as index:
        index.writelines(json.dumps(row) + "\n" for row in rows)
    summary = {
        "source": str(path),
        "kind": kind,
        "family": family,
        "prompts": len(prompts),
        "n": n,
        "seed": seed,
        "steps": steps,
        "files": len(rows),
        "out_dir": str(out_dir),
    }
    (out_dir / "sample.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
