"""Dense element weights from data: a weight per pixel of an image pair, or per frame of a clip
pair, that the loss multiplies into each squared error (the fused kernel's `elem_weight`).

    weights = decode_weight_map(path_or_bytes, ref="fox-0001:weight_map")   # float32 [H, W] >= 0
    weights = frame_weights(value, where="clips.jsonl:3")                  # float32 [frames] >= 0
    elem_weight = latent_weights(maps, latents.shape)                      # [B, 1, h, w] / [B, 1, f, 1, 1]

A spatial map is a grayscale image (8-bit: value / 255, 16-bit: value / 65535, 32-bit float
TIFF as stored) or a 2-D `.npy` array (any real or bool dtype, read without pickle). It covers
the whole winner image whatever its resolution: PairTransform crops, resizes and flips it with
the pair's own decisions (`PairTransform.weight_map`), so each weight stays on the pixels it was
given for. A pair has one map, applied to winner and loser alike, as their crops are.

Frame weights are a list with one number for each frame of the winner clip as stored; the
frames the clip sampler picks take theirs. `latent_weights` then averages pixels over each
latent cell and frames over each latent frame: Wan's causal VAE keeps frame 0 alone and folds
each next run of r frames (r = 4) into one latent frame.

Weights are used as given, not normalised: a map of ones is no map, and a region of zeros
contributes no error and gets no gradient. A value below 0, NaN or inf is refused (BadSample
when read with the pair, SourceError for a manifest's list).
"""

import io
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .images import BadSample, SourceError, regular_file, shown

MAP_SUFFIXES = (".png", ".tif", ".tiff", ".webp", ".bmp", ".npy")
NPY_MAGIC = b"\x93NUMPY"
# Grayscale modes and the value that means weight 1.
_SCALE = {
    "1": 1.0,
    "L": 255.0,
    "I;16": 65535.0,
    "I;16B": 65535.0,
    "I;16L": 65535.0,
    "I;16N": 65535.0,
    "F": 1.0,
}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


def _checked(values: np.ndarray, ref: str) -> np.ndarray:
    if values.dtype.kind not in "biuf":
        raise BadSample(ref, f"weight map of dtype {values.dtype}: expected numbers")
    values = values.astype(np.float32)
    if values.ndim != 2 or min(values.shape) < 1:
        raise BadSample(ref, f"weight map of shape {values.shape}: expected a 2-D [height, width] array")
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise BadSample(
            ref,
            f"weight map holds {int(bad.sum())} values that are negative, NaN or inf (first at {first}: "
            f"{values[first]})",
        )
    return values


def decode_weight_map(source: bytes | str | os.PathLike, ref: str | None = None) -> np.ndarray:
    """A spatial weight map as float32 [H, W] (see the module docstring); BadSample naming `ref`
    for a missing file (skipped_missing) or one that is no usable map (skipped_corrupt)."""
    ref = ref or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<bytes>")
    if isinstance(source, (str, os.PathLike)):
        regular_file(source, ref, "weight map")
        try:
            with open(source, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            raise BadSample(
                ref, f"weight map file not found: {os.fspath(source)}", "skipped_missing"
            ) from None
        except OSError as err:
            raise BadSample(
                ref, f"cannot read weight map {os.fspath(source)}: {err.strerror or err}"
            ) from None
    else:
        data = bytes(source)
    if data.startswith(NPY_MAGIC):
        try:
            values = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise BadSample(ref, f"cannot read the .npy weight map ({err})") from None
        return _checked(np.asarray(values), ref)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode = image.mode
            if mode not in _SCALE and mode != "I":
                raise BadSample(
                    ref,
                    f"weight map image is {mode}, not grayscale: save it as an 8- or 16-bit grayscale PNG",
                )
            values = np.asarray(image)
    except _DECODE_ERRORS as err:
        raise BadSample(ref, f"cannot decode the weight map ({type(err).__name__}: {err})") from None
    scale = _SCALE.get(mode, 65535.0)  # "I": 16-bit PNGs some writers store as 32-bit integers
    return _checked(values.astype(np.float32) / np.float32(scale), ref)


def frame_weights(value, where: str) -> np.ndarray:
    """A manifest's per-frame weights (a non-empty list of finite numbers >= 0) as float32."""
    if (
        not isinstance(value, list)
        or not value
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)
    ):
        raise SourceError(
            f"{where}: 'frame_weights' must be a non-empty list of numbers, one for each frame of the winner "
            f"clip, got {shown(value)}"
        )
    weights = np.asarray(value, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(weights) | (weights < 0) | (weights > np.finfo(np.float32).max))
    if bad.size:
        raise SourceError(
            f"{where}: 'frame_weights' must be finite numbers >= 0; entry {int(bad[0])} is {value[bad[0]]!r}"
        )
    return weights.astype(np.float32)


def sampled_frames(weights: np.ndarray, indices, ref: str) -> np.ndarray:
    """The weights of the frames a clip plan takes; BadSample when the list is too short."""
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size and int(indices.max()) >= len(weights):
        raise BadSample(
            ref,
            f"frame_weights has {len(weights)} entries, but the clip's frame {int(indices.max())} is sampled: "
            "give one weight for each frame of the winner clip",
        )
    return weights[indices]


def temporal_groups(frames: int, latent_frames: int) -> list[slice]:
    """Which pixel frames each latent frame holds: all frames one to one, or, for a causal video
    VAE (Wan), frame 0 alone and then runs of r = (frames - 1) / (latent_frames - 1)."""
    if latent_frames == frames:
        return [slice(i, i + 1) for i in range(frames)]
    if latent_frames < 2 or (frames - 1) % (latent_frames - 1):
        raise ValueError(
            f"{frames} frames do not fold into {latent_frames} latent frames (1 + r * (latent frames - 1))"
        )
    r = (frames - 1) // (latent_frames - 1)
    return [slice(0, 1)] + [slice(1 + (j - 1) * r, 1 + j * r) for j in range(1, latent_frames)]


def latent_weights(maps: list, latent_shape, device=None) -> torch.Tensor | None:
    """Element weights [B, 1, h, w] (images) or [B, 1, f, 1, 1] (clips) for latents of
    `latent_shape` ([N, C, h, w] or [N, C, f, h, w]) from B pairs' maps at pixel resolution
    (float32 [H, W] or [F]; None: all ones). Pixel maps are averaged over each latent cell
    (the pixel size must be a multiple of the latent size), frames over each latent frame.
    Returns None when no pair has a map."""
    if all(m is None for m in maps):
        return None
    video = len(latent_shape) == 5
    grid = tuple(latent_shape[2:3]) if video else tuple(latent_shape[-2:])
    rows = []
    for weights in maps:
        if weights is None:
            rows.append(torch.ones(grid))
            continue
        weights = torch.as_tensor(np.asarray(weights, dtype=np.float32))
        if video:
            if weights.dim() != 1:
                raise ValueError(f"clip weights must be one per frame, got shape {tuple(weights.shape)}")
            rows.append(torch.stack([weights[g].mean() for g in temporal_groups(len(weights), grid[0])]))
        else:
            if weights.dim() != 2:
                raise ValueError(f"image weight maps are [H, W], got shape {tuple(weights.shape)}")
            (height, width), (h, w) = weights.shape, grid
            if height % h or width % w:
                raise ValueError(f"a {height}x{width} weight map does not tile a {h}x{w} latent grid")
            rows.append(weights.reshape(h, height // h, w, width // w).mean(dim=(1, 3)))
    out = torch.stack(rows).unsqueeze(1)
    if video:
        out = out[..., None, None]
    return out.to(device) if device is not None else out
