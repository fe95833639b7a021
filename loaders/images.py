"""Image decoding, the pair transform, and how sources count what they skip.

    image = decode_image(path_or_bytes, ref="pickapic-ab12-cd34:jpg_0")    # RGB, EXIF-upright
    winner, loser = transform(winner_image, loser_image, key=record_id, epoch=epoch)

`PairTransform` makes every decision once per pair (target size, crop box, flip) and applies it
to winner and loser alike: a crop or flip that differs between the two images of a pair would be
a preference signal the model could learn instead of the prompt. Its random draws come from
(seed, epoch, pair id), so any rank, worker or resumed run makes the same decisions for a pair.

A sample that cannot be used (corrupt bytes, missing file, a path that is no regular file)
raises `BadSample`; sources count these in `stats()` and log them, and `SkipBadSamples` lets a
consumer of a map-style source step over them. Every data file named by a path is checked with
`regular_file` before it is opened: a FIFO named like an image would block open() forever.

Manifests name their files relative to the manifest's folder; `ManifestRoot` keeps them inside
it (lexically and after symlinks) unless the data set's owner allows otherwise.
"""

import hashlib
import io
import json
import logging
import os
import stat
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

ImageInput = bytes | bytearray | memoryview | str | os.PathLike


class BadSample(Exception):
    """One sample cannot be used. `kind` is the stats counter it belongs to."""

    def __init__(self, ref: str, reason: str, kind: str = "skipped_corrupt"):
        super().__init__(f"{ref}: {reason}")
        self.ref, self.reason, self.kind = ref, reason, kind

    def __reduce__(self):  # Exception pickles its args (the message) alone: keep all three
        return type(self), (self.ref, self.reason, self.kind)


class SourceError(ValueError):
    """A data set as a whole is unusable (missing column, malformed manifest line): the message
    names the file, and the line or column."""


def shown(value: Any, limit: int = 40) -> str:
    """repr(value), cut to `limit` characters: for error messages about a value read from data."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Decoding

# Errors PIL raises on unreadable data: truncated streams raise OSError on load, unknown formats
# UnidentifiedImageError, some malformed headers SyntaxError or ValueError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def regular_file(path: str | os.PathLike, ref: str | None = None, what: str = "image") -> None:
    """BadSample unless `path` is (a symlink to) a regular file: skipped_missing when it is not
    there, skipped_not_a_file for a folder, FIFO, socket or device. A FIFO would block the open()
    that follows until something writes to it, that is, forever."""
    ref = ref or os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise BadSample(ref, f"{what} file not found: {os.fspath(path)}", "skipped_missing") from None
    except OSError as err:  # permission denied on a folder, a symlink loop, a name too long
        raise BadSample(ref, f"cannot read {what} file {os.fspath(path)}: {err.strerror or err}") from None
    except ValueError as err:  # a NUL character in the name
        raise BadSample(ref, f"cannot read {what} file {os.fspath(path)!r}: {err}") from None
    if not stat.S_ISREG(mode):
        raise BadSample(
            ref, f"{os.fspath(path)} is {_file_kind(mode)}, not a regular {what} file", "skipped_not_a_file"
        )


def _open(source: ImageInput, ref: str) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(source)))
    regular_file(source, ref)
    return Image.open(source)


def _reason(err: BaseException, source: ImageInput) -> tuple[str, str]:
    if isinstance(err, FileNotFoundError):  # removed between the check and the open
        return f"image file not found: {os.fspath(source)}", "skipped_missing"
    return f"cannot decode image ({type(err).__name__}: {err})", "skipped_corrupt"


# 16-bit (and 32-bit integer) greyscale, e.g. a 16-bit PNG: PIL's convert("RGB") clips these to
# 255 instead of scaling, which turns nearly every pixel white. 16-bit RGB(A) and grey+alpha
# PNGs already come as 8-bit RGB(A) from PIL (it keeps the high byte).
_WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with 8 bits a channel: 16-bit grey scaled as round(v * 255 / 65535), transparent
    pixels composited on white (the RGB hidden under alpha 0 is arbitrary, often black)."""
    if image.mode in _WIDE_GREY_MODES:
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        grey = ((values * 255 + 65535 // 2) // 65535).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(source: ImageInput, ref: str | None = None) -> Image.Image:
    """The fully decoded RGB image (8 bits a channel), turned upright by its EXIF orientation;
    see `_to_rgb` for 16-bit and transparent images."""
    ref = ref or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<bytes>")
    try:
        with _open(source, ref) as image:
            image.load()  # a truncated file fails here, not later inside a transform
            return _to_rgb(ImageOps.exif_transpose(image))
    except _DECODE_ERRORS as err:
        reason, kind = _reason(err, source)
        raise BadSample(ref, reason, kind) from err


def _header(source: ImageInput, ref: str) -> tuple[int, int, bool]:
    """(width, height) after the EXIF turn, and whether DALI's decoder returns the pixels PIL's
    `decode_image` returns: 8-bit RGB or greyscale JPEG and PNG. Alpha (composited on white
    here, dropped by DALI), palettes, 16-bit grey and CMYK go through PIL."""
    try:
        with _open(source, ref) as image:
            width, height = image.size
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
            same = image.format in ("JPEG", "PNG") and image.mode in ("RGB", "L")
    except _DECODE_ERRORS as err:
        reason, kind = _reason(err, source)
        raise BadSample(ref, reason, kind) from err
    return ((height, width) if orientation in (5, 6, 7, 8) else (width, height)) + (same,)


def image_size(source: ImageInput, ref: str | None = None) -> tuple[int, int]:
    """(width, height) after the EXIF turn, from the header alone: what `decode_image` would
    return without decoding pixels (buckets are assigned from this)."""
    ref = ref or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<bytes>")
    width, height, _ = _header(source, ref)
    return width, height


@dataclass(frozen=True)
class EncodedImage:
    """One image of a pair left encoded for a batch decoder (loaders/dali.py), with the pair's
    decisions: the crop `box` (left, top, right, bottom) in the upright image's pixels, resized
    to `target` (width, height) with `resample`, then flipped if `flip`. `size` is the upright
    (width, height); `dali` says DALI decodes it as PIL would (else the batch decoder uses PIL)."""

    data: bytes
    ref: str
    size: tuple[int, int]
    box: tuple[float, float, float, float]
    target: tuple[int, int]
    flip: bool
    resample: str
    dali: bool


def encoded_image(source: ImageInput, ref: str) -> tuple[bytes, tuple[int, int], bool]:
    """(bytes, upright (width, height), DALI decodes it as PIL) of an image path or bytes, reading
    the header only; BadSample as `decode_image` raises for a missing file or unreadable header."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        regular_file(source, ref)
        try:
            data = Path(source).read_bytes()
        except OSError as err:
            reason, kind = _reason(err, source)
            raise BadSample(ref, reason, kind) from err
    width, height, same = _header(data, ref)
    return data, (width, height), same


# ---------------------------------------------------------------------------------------------
# The pair transform

_RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
}


def stable_hash(text: str) -> int:
    """A 64-bit hash of `text` that is the same in every process (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class PairTransform:
    """Resize to cover the target, crop to it, optionally flip: one decision per pair.

    The target is `size` ((width, height), or an int for a square), or, with `buckets`, the
    bucket of the winner's aspect ratio (`Buckets.bucket_of`, the rule the bucket sampler uses).
    No padding and no distortion: the image is scaled by max(tw/w, th/h) and the crop removes the
    excess along one side. The crop sits at the centre, or, with `random_crop`, at a position
    drawn once per pair as a fraction of the excess, so winner and loser of different sizes get
    the same relative box. `flip_prob` is the chance of a horizontal flip of both.
    """

    def __init__(
        self,
        size: int | Sequence[int] | None = None,
        *,
        buckets: Any = None,
        random_crop: bool = False,
        flip_prob: float = 0.0,
        seed: int = 0,
        resample: str = "lanczos",
        decoder: str = "pil",
    ):
        if (size is None) == (buckets is None):
            raise ValueError("PairTransform needs exactly one of size= and buckets=")
        if size is not None:
            width, height = (size, size) if isinstance(size, int) else tuple(size)
            if width < 1 or height < 1:
                raise ValueError(f"PairTransform size must be positive, got {size!r}")
            self.size: tuple[int, int] | None = (int(width), int(height))
        else:
            self.size = None
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        if resample not in _RESAMPLE:
            raise ValueError(f"unknown resample {resample!r}; known: {', '.join(_RESAMPLE)}")
        if decoder not in ("pil", "cpu", "mixed"):
            raise ValueError(f"unknown decoder {decoder!r}; known: pil, cpu, mixed")
        self.buckets, self.random_crop, self.flip_prob = buckets, random_crop, flip_prob
        self.seed, self.resample, self.decoder = seed, resample, decoder

    def target_for(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) an image of this size is turned into."""
        if self.size is not None:
            return self.size
        return self.buckets[self.buckets.bucket_of(width, height)]

    def decisions(self, key: str, epoch: int = 0) -> tuple[float, float, bool]:
        """(crop x fraction, crop y fraction, flip) for the pair `key`. All three are always
        drawn, in this order, so turning flips on does not move the crops."""
        rng = np.random.default_rng([self.seed, epoch, stable_hash(key)])
        fx, fy, flip = rng.random(3)
        if not self.random_crop:
            fx = fy = 0.5
        return float(fx), float(fy), bool(flip < self.flip_prob)

    @staticmethod
    def _box(size: tuple[int, int], target: tuple[int, int], fx: float, fy: float) -> tuple[float, ...]:
        """The crop box (left, top, right, bottom) of an image of `size` (width, height)."""
        width, height = size
        tw, th = target
        scale = max(tw / width, th / height)
        crop_w, crop_h = min(width, tw / scale), min(height, th / scale)
        left, top = fx * (width - crop_w), fy * (height - crop_h)
        return left, top, left + crop_w, top + crop_h

    @staticmethod
    def _resized(image: Image.Image, target, box, flip: bool, resample: str) -> np.ndarray:
        """`box` of `image` resized to `target` (one resampling), flipped if `flip`: HxWx3 uint8."""
        out = image.resize(target, _RESAMPLE[resample], box=box)
        if flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(out, dtype=np.uint8).copy()

    def _apply(
        self, image: Image.Image, target: tuple[int, int], fx: float, fy: float, flip: bool
    ) -> np.ndarray:
        return self._resized(image, target, self._box(image.size, target, fx, fy), flip, self.resample)

    def pair(
        self,
        winner: ImageInput,
        loser: ImageInput,
        *,
        refs: tuple[str, str],
        key: str,
        epoch: int = 0,
        weight_map: Any = None,
        map_ref: str = "",
    ) -> tuple[Any, Any, np.ndarray | None]:
        """(winner, loser, weight map) of a pair's two image paths or byte strings, what every
        image source calls. With `decoder` "pil" the images are decoded and transformed here
        (HxWx3 uint8 arrays); with a DALI device ("cpu" | "mixed") only their headers are read
        and they come back as EncodedImages carrying the same decisions, for the batch decoder.
        The weight map (loaders/weight_maps.py) is transformed here either way."""
        from .weight_maps import decode_weight_map

        if self.decoder == "pil":
            images = decode_image(winner, ref=refs[0]), decode_image(loser, ref=refs[1])
            sizes = [image.size for image in images]
            target = self.target_for(*sizes[0])
            out = self(*images, key=key, epoch=epoch, target=target)
        else:
            fx, fy, flip = self.decisions(key, epoch)
            headers = [encoded_image(source, ref) for source, ref in zip((winner, loser), refs, strict=True)]
            sizes = [size for _, size, _ in headers]
            target = self.target_for(*sizes[0])
            out = tuple(
                EncodedImage(
                    data, ref, size, self._box(size, target, fx, fy), target, flip, self.resample, same
                )
                for (data, size, same), ref in zip(headers, refs, strict=True)
            )
        weights = None
        if weight_map is not None:
            weights = self.weight_map(
                decode_weight_map(weight_map, ref=map_ref), sizes[0], key=key, epoch=epoch, target=target
            )
        return out[0], out[1], weights

    @staticmethod
    def apply_encoded(image: EncodedImage) -> np.ndarray:
        """An EncodedImage decoded and transformed by PIL: the pixels `pair` would have returned
        with decoder "pil". The batch decoder's path for what DALI does not decode as PIL does,
        and for a batch DALI failed on (BadSample names the bad image)."""
        decoded = decode_image(image.data, ref=image.ref)
        return PairTransform._resized(decoded, image.target, image.box, image.flip, image.resample)

    def weight_map(
        self,
        weights: np.ndarray,
        image_size: tuple[int, int],
        *,
        key: str,
        epoch: int = 0,
        target: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """A pair's weight map (float32 [h, w], covering the whole winner of `image_size`
        (width, height) at any resolution) cropped, resized and flipped as the pair's images are:
        float32 [H, W] of the output images. The box is the images' box scaled to the map;
        bilinear resampling keeps the weights' range (no Lanczos overshoot below 0)."""
        target = target or self.target_for(*image_size)
        fx, fy, flip = self.decisions(key, epoch)
        width, height = image_size
        left, top, right, bottom = self._box(image_size, target, fx, fy)
        sx, sy = weights.shape[1] / width, weights.shape[0] / height
        box = (left * sx, top * sy, right * sx, bottom * sy)
        out = Image.fromarray(np.ascontiguousarray(weights, dtype=np.float32), "F").resize(
            target, Image.Resampling.BILINEAR, box=box
        )
        if flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(out, dtype=np.float32).copy()

    def __call__(
        self,
        winner: Image.Image,
        loser: Image.Image,
        *,
        key: str,
        epoch: int = 0,
        target: tuple[int, int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Winner and loser as HxWx3 uint8 arrays of the same shape."""
        target = target or self.target_for(*winner.size)
        fx, fy, flip = self.decisions(key, epoch)
        return self._apply(winner, target, fx, fy, flip), self._apply(loser, target, fx, fy, flip)


# ---------------------------------------------------------------------------------------------
# Skips


class SkipLog:
    """Per-source skip counters, each skip logged at WARNING with its id and reason: the first
    `log_first` of each kind one by one, then every `log_every`-th with the running total."""

    def __init__(self, name: str, kinds: Sequence[str], log_first: int = 10, log_every: int = 1000):
        self.name, self.log_first, self.log_every = name, log_first, log_every
        self.counts: Counter[str] = Counter({kind: 0 for kind in kinds})
        self.examples: dict[str, str] = {}  # kind -> "ref: reason" of its first skip

    def skip(self, kind: str, ref: str, reason: str) -> None:
        self.counts[kind] += 1
        self.examples.setdefault(kind, f"{ref}: {reason}")
        count = self.counts[kind]
        if count <= self.log_first or count % self.log_every == 0:
            log.warning("%s: %s %s: %s (%d so far)", self.name, kind, ref, reason, count)

    def stats(self) -> dict[str, int]:
        return dict(self.counts)


class CountedSource:
    """What the map-style sources share: the epoch of their random draws, skip counters, and a
    bad pair counted once however often it is asked for. Call `_start_counts` in __init__."""

    def _start_counts(self, name: str, kinds: Sequence[str]) -> None:
        self.skips = SkipLog(name, kinds)
        self.epoch = 0
        self._counted_bad: set[int] = set()

    def set_epoch(self, epoch: int) -> None:
        """Epoch of the random crop/flip/frame draws (keyed by seed, epoch and pair id)."""
        self.epoch = epoch

    def vocabulary(self) -> None:
        """Real data goes with real tokenizers."""
        return None

    def stats(self) -> dict[str, int]:
        return self.skips.stats()

    def skip_examples(self) -> dict[str, str]:
        """The first skip of each kind, "ref: reason": what an error about bad data points to."""
        return dict(self.skips.examples)

    def _bad(self, index: int, bad: BadSample) -> BadSample:
        if index not in self._counted_bad:
            self._counted_bad.add(index)
            self.skips.skip(bad.kind, bad.ref, bad.reason)
        return bad


def jsonl_objects(path, known: tuple[str, ...] | None = None) -> Iterator[tuple[str, dict]]:
    """("file:line", object) for each non-blank line of a JSONL manifest; SourceError naming the
    file and line on the first line that is not a JSON object (a manifest is written by a script,
    and a broken line means the script is broken). A UTF-8 byte order mark is allowed. With
    `known`, a key outside it is a warning naming the key and its first line, once per key: a
    "mask" or a "weight" the reader does not read is ignored, and should not be silently."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise SourceError(f"manifest not found: {path}") from None
    except UnicodeDecodeError as err:
        raise SourceError(f"{path}: not UTF-8 text ({err})") from None
    except OSError as err:  # a folder, no permission
        raise SourceError(f"cannot read manifest {path}: {err.strerror or err}") from None
    warned: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise SourceError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        except RecursionError:
            raise SourceError(f"{where}: not valid JSON (nested too deeply)") from None
        if not isinstance(item, dict):
            raise SourceError(f"{where}: expected a JSON object, got {type(item).__name__}")
        if known is not None:
            for key in item.keys() - set(known) - warned:
                warned.add(key)
                log.warning(
                    "%s: key %r is not read and is ignored (this manifest's keys: %s); later lines with it "
                    "are not reported",
                    where,
                    key,
                    ", ".join(known),
                )
        yield where, item


class ManifestRoot:
    """Where a manifest's relative paths start (its folder), and the fence its entries stay
    inside: a manifest is data, often from elsewhere, and an entry "../../home/me/.ssh/id.png"
    or a symlink leading out would read files its author never meant to publish. `path()`
    refuses an entry that leaves the folder lexically ('..', an absolute path elsewhere) or once
    symlinks are resolved, unless `allow_outside_root`.

        root = ManifestRoot(manifest_path, allow_outside_root=False)
        winner = root.path(item["winner"], where="pairs.jsonl:3", key="winner")
    """

    def __init__(self, manifest: str | os.PathLike, allow_outside_root: bool = False):
        self.base = Path(manifest).parent
        self.allow_outside_root = allow_outside_root
        # Plain strings and os.path, not pathlib: a manifest has millions of paths to check.
        self._lexical_root = os.path.abspath(self.base)
        self._real_root = os.path.realpath(self.base)
        self._real_folders: dict[str, str] = {}  # a folder's resolved path, resolved once

    @staticmethod
    def _inside(path: str, root: str) -> bool:
        return path == root or path.startswith(root if root.endswith(os.sep) else root + os.sep)

    def _resolved(self, path: str) -> str:
        """`path` with every symlink resolved (a symlink loop stays as far as it resolves: it
        leads nowhere, and opening it is a counted skip)."""
        parent, name = os.path.split(path)
        if name in ("", ".", "..") or os.path.islink(path):
            return os.path.realpath(path)
        folder = self._real_folders.get(parent)
        if folder is None:
            folder = self._real_folders[parent] = os.path.realpath(parent)
        return os.path.join(folder, name)

    def path(self, raw: str, where: str, key: str) -> Path:
        """The entry `raw` of line `where` as a path to open."""
        if "\0" in raw:
            raise SourceError(
                f"{where}: {key} path {shown(raw)} holds a NUL character, which no file name can"
            )
        path = self.base / raw
        if self.allow_outside_root:
            return path
        joined = os.path.join(self._lexical_root, raw)  # an absolute `raw` replaces the root
        if not self._inside(os.path.normpath(joined), self._lexical_root):
            why = "an absolute path elsewhere" if os.path.isabs(raw) else "its '..' leads out"
        else:
            resolved = self._resolved(joined)
            if self._inside(resolved, self._real_root):
                return path
            why = f"through a symlink it is {resolved}"
        raise SourceError(
            f"{where}: {key} path {raw!r} is outside the manifest's folder {self._lexical_root} ({why}); "
            "put the file under that folder, or set data.allow_outside_root=true to allow paths outside it"
        )


class SkipBadSamples:
    """A map-style source in which an index whose pair raises `BadSample` is replaced by the next
    good index (i+1, i+2, ... wrapping around). The replacement is a pure function of the data,
    so every rank and every resumed run makes the same one; a bad index is tried once per
    process and remembered. The source counts and logs the skip itself; `stats()` adds
    `replaced_bad_indices`, the number of lookups that were redirected.

        data = SkipBadSamples(PickapicPairs(...))
        records = [data[i] for i in sampler.next_batch()]
    """

    def __init__(self, source: Any, max_consecutive: int = 1000):
        self.source, self.max_consecutive = source, max_consecutive
        self.bad: set[int] = set()
        self.replaced = 0
        self.first_bad = ""  # "ref: reason" of the first bad pair met: what the all-bad error names

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Any:
        size = len(self.source)
        if not 0 <= index < size:
            raise IndexError(f"pair {index} out of range [0, {size})")
        for step in range(min(self.max_consecutive, size)):
            candidate = (index + step) % size
            if candidate in self.bad:
                continue
            try:
                record = self.source[candidate]
            except BadSample as bad:
                self.bad.add(candidate)
                self.first_bad = self.first_bad or f"{bad.ref}: {bad.reason}"
                continue
            self.replaced += int(step > 0)
            return record
        stats = self.source.stats()
        counts = ", ".join(f"{kind}={n}" for kind, n in stats.items() if n and kind.startswith("skipped"))
        first = self.first_bad or "?"
        tried = min(self.max_consecutive, size)
        what = f"all {size} pairs tried" if tried == size else f"{tried} pairs in a row from index {index}"
        raise SourceError(f"{what} are bad files ({counts}): the data set looks broken; first: {first}")

    def mark_bad(self, index: int, bad: BadSample) -> None:
        """`index` turned out bad after `__getitem__` returned it (a batch decoder met a corrupt
        image the header did not show): counted by the source, and skipped from now on."""
        self.bad.add(index)
        self.first_bad = self.first_bad or f"{bad.ref}: {bad.reason}"
        if hasattr(self.source, "_bad"):
            self.source._bad(index, bad)

    def stats(self) -> dict[str, int]:
        return {**self.source.stats(), "replaced_bad_indices": self.replaced}

    def __getattr__(self, name: str) -> Any:  # vocabulary(), set_epoch(), image_sizes() ...
        if name == "source":  # not yet set (unpickling): avoid recursing
            raise AttributeError(name)
        return getattr(self.source, name)
