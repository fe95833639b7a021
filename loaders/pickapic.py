"""Pick-a-Pic v2 pairs, read from its parquet shards as published.

    data = PickapicPairs("pickapic_v2/data", PairTransform(512))     # a folder, a file, or a list
    record = data[i]          # map-style: works with PairSampler / BucketBatchSampler

Each row holds a prompt (`caption`), two JPEGs (`jpg_0`, `jpg_1`), their `image_*_uid` and the
user's labels: `label_0, label_1` is (1, 0) or (0, 1) for a preference and (0.5, 0.5) for a tie.
The winner is the image labelled 1. Rows are skipped, and counted in `stats()`, when
`has_label` is false (skipped_unlabeled), `are_different` is false (skipped_identical: both
images the same), the labels are a tie (skipped_ties, unless keep_ties) or anything else
(skipped_bad_label). With `keep_ties=True` a tie yields the pair in the file's order (image 0 as
"winner") with category "tie": it carries no preference, so the objective must leave it out of
the DPO loss (DESIGN: ties never reach the loss); it is there for SFT or evaluation.

A shard is never read whole: one pass at start-up reads only the four small label columns of
each row group to build the index (file, row group, row, winner); `data[i]` then reads the
prompt, uid and image columns of that one row group and keeps the last few row groups decoded,
so neighbouring rows are cheap. Under a random sampler each pair costs one row group read: keep
row groups small (Pick-a-Pic's are) or give the cache more room.

An optional binary column `weight_map` holds a pair's per-pixel weights (a grayscale PNG or
.npy file's bytes, covering the winner image; null: none; loaders/weight_maps.py). Files with
and without it can be mixed.

`id` is "pickapic-{image_0_uid}-{image_1_uid}" in file order: the same in every run and rank,
and independent of keep_ties.
"""

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .images import BadSample, CountedSource, PairTransform, SourceError, image_size
from .records import PairRecord

log = logging.getLogger(__name__)

INDEX_COLUMNS = ("label_0", "label_1", "has_label", "are_different")
FETCH_COLUMNS = ("caption", "jpg_0", "jpg_1", "image_0_uid", "image_1_uid")
REQUIRED_COLUMNS = FETCH_COLUMNS + INDEX_COLUMNS
MAP_COLUMN = "weight_map"
SKIP_KINDS = (
    "skipped_ties",
    "skipped_unlabeled",
    "skipped_identical",
    "skipped_bad_label",
    "skipped_corrupt",
    "skipped_missing",
)

# Index column `winner`: which image won, or a kept tie.
_WIN_0, _WIN_1, _TIE = 0, 1, 2


def parquet_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The .parquet files of a folder (not its sub-folders: a split per folder), a file, or a
    list of either, in sorted order per folder."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found = sorted(entry.glob("*.parquet"))
            if not found:
                raise SourceError(f"no .parquet files in {entry}")
            files += found
        elif entry.exists():
            files.append(entry)
        else:
            raise SourceError(f"no such parquet file or folder: {entry}")
    for file in files:  # a FIFO would block the reader forever; a folder named x.parquet fails later
        if not file.is_file():
            raise SourceError(f"{file} is not a regular file: a parquet shard must be one")
    return files


def _is_text(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):  # pandas categoricals
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _check_schema(path: Path, schema: pa.Schema) -> None:
    names = schema.names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise SourceError(
            f"{path}: missing column(s) {', '.join(missing)} for Pick-a-Pic pairs; "
            f"columns found: {', '.join(names)}"
        )
    expected = {
        "label_0": pa.types.is_floating,
        "label_1": pa.types.is_floating,
        "has_label": pa.types.is_boolean,
        "are_different": pa.types.is_boolean,
        "jpg_0": pa.types.is_binary,
        "jpg_1": pa.types.is_binary,
    }
    for name, ok in expected.items():
        kind = schema.field(name).type
        if not (
            ok(kind)
            or (name.startswith("label") and pa.types.is_integer(kind))
            or (name.startswith("jpg") and pa.types.is_large_binary(kind))
        ):
            raise SourceError(f"{path}: column {name} has type {kind}, expected {ok.__name__[3:]}")
    if MAP_COLUMN in names and not (
        pa.types.is_binary(schema.field(MAP_COLUMN).type)
        or pa.types.is_large_binary(schema.field(MAP_COLUMN).type)
    ):
        raise SourceError(
            f"{path}: column {MAP_COLUMN} has type {schema.field(MAP_COLUMN).type}, expected binary (the bytes "
            "of a grayscale PNG or .npy file per row)"
        )
    if not _is_text(schema.field("caption").type):
        raise SourceError(
            f"{path}: column caption has type {schema.field('caption').type}, expected string (the prompt "
            "text): write the captions as strings"
        )


class PickapicPairs(CountedSource):
    """Map-style Pick-a-Pic v2 source; `len()` counts the pairs kept after the label filters."""

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        transform: PairTransform,
        *,
        keep_ties: bool = False,
        cache_row_groups: int = 2,
    ):
        self.files = parquet_files(paths)
        self.transform, self.keep_ties = transform, keep_ties
        self.cache_row_groups = max(1, cache_row_groups)
        self._start_counts("pickapic", SKIP_KINDS)
        self._cache: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self._build_index()

    # -- the index ----------------------------------------------------------------------------

    def _build_index(self) -> None:
        parts = []
        self.has_map = []
        for file_index, path in enumerate(self.files):
            parquet = pq.ParquetFile(path)
            _check_schema(path, parquet.schema_arrow)
            self.has_map.append(MAP_COLUMN in parquet.schema_arrow.names)
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group, columns=list(INDEX_COLUMNS))
                parts.append(self._classify(table, file_index, group))
        columns = np.concatenate(parts, axis=1) if parts else np.zeros((4, 0), np.int64)
        self.file_of, self.group_of, self.row_of, self.winner_of = columns
        if len(self) == 0:
            names = ", ".join(str(p) for p in self.files[:3]) + (" ..." if len(self.files) > 3 else "")
            raise SourceError(f"no usable Pick-a-Pic pairs in {names}; skipped: {self.skips.stats()}")
        log.info("pickapic: %d pairs from %d file(s); %s", len(self), len(self.files), self.skips.stats())

    def _classify(self, table: pa.Table, file_index: int, group: int) -> np.ndarray:
        """(file, group, row, winner) of the kept rows of one row group; counts the others."""
        label_0 = table["label_0"].cast(pa.float64()).to_numpy()  # nulls become NaN: a bad label
        label_1 = table["label_1"].cast(pa.float64()).to_numpy()
        has_label = pc.fill_null(table["has_label"], False).to_numpy()
        different = pc.fill_null(table["are_different"], False).to_numpy()
        winner = np.full(len(label_0), -1, np.int64)
        winner[(label_0 == 1) & (label_1 == 0)] = _WIN_0
        winner[(label_0 == 0) & (label_1 == 1)] = _WIN_1
        winner[(label_0 == 0.5) & (label_1 == 0.5)] = _TIE
        reasons = np.full(len(winner), "", dtype=object)
        reasons[winner == -1] = "skipped_bad_label"
        if not self.keep_ties:
            reasons[winner == _TIE] = "skipped_ties"
        reasons[~different] = "skipped_identical"
        reasons[~has_label] = "skipped_unlabeled"
        for row in np.flatnonzero(reasons != ""):
            where = f"{self.files[file_index].name} row group {group} row {row}"
            self.skips.skip(
                reasons[row],
                where,
                f"label_0={label_0[row]}, label_1={label_1[row]}, "
                f"has_label={has_label[row]}, are_different={different[row]}",
            )
        rows = np.flatnonzero(reasons == "")
        return np.stack([np.full(len(rows), file_index), np.full(len(rows), group), rows, winner[rows]])

    # -- map-style access ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.row_of)

    def _row_group(self, file_index: int, group: int) -> pa.Table:
        key = (file_index, group)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        columns = list(FETCH_COLUMNS) + ([MAP_COLUMN] if self.has_map[file_index] else [])
        table = pq.ParquetFile(self.files[file_index]).read_row_group(group, columns=columns)
        self._cache[key] = table
        while len(self._cache) > self.cache_row_groups:
            self._cache.popitem(last=False)
        return table

    def _row(self, index: int) -> tuple[str, str | None, list, int, bytes | None]:
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} out of range [0, {len(self)})")
        file_index, group, row, winner = (
            int(a[index]) for a in (self.file_of, self.group_of, self.row_of, self.winner_of)
        )
        table = self._row_group(file_index, group)
        uids = [table[f"image_{k}_uid"][row].as_py() for k in (0, 1)]
        caption = table["caption"][row].as_py()
        images = [table[f"jpg_{k}"][row].as_py() for k in (0, 1)]
        weights = table[MAP_COLUMN][row].as_py() if self.has_map[file_index] else None
        return f"pickapic-{uids[0]}-{uids[1]}", caption, images, winner, weights

    def __getitem__(self, index: int) -> PairRecord:
        pair_id, caption, images, winner, map_bytes = self._row(index)
        first = 1 if winner == _WIN_1 else 0
        try:
            if caption is None:
                raise BadSample(pair_id, "caption is null", "skipped_corrupt")
            for k in (first, 1 - first):
                if images[k] is None:
                    raise BadSample(f"{pair_id}:jpg_{k}", "image bytes are null", "skipped_missing")
            winner_pixels, loser_pixels, weights = self.transform.pair(
                images[first],
                images[1 - first],
                refs=(f"{pair_id}:jpg_{first}", f"{pair_id}:jpg_{1 - first}"),
                key=pair_id,
                epoch=self.epoch,
                weight_map=map_bytes,
                map_ref=f"{pair_id}:{MAP_COLUMN}",
            )
        except BadSample as bad:
            raise self._bad(index, bad) from None
        category = "tie" if winner == _TIE else ""
        return PairRecord(pair_id, caption, winner_pixels, loser_pixels, category, weight_map=weights)

    def image_sizes(self) -> list[tuple[int, int] | None]:
        """(width, height) of each pair's winner, for bucket assignment; None where it cannot be
        read (counted as a skip here, so the bucket sampler never draws it). Reads the image
        columns of every row group once, one row group at a time: cache the result for big sets."""
        sizes: list[tuple[int, int] | None] = [None] * len(self)
        starts = np.flatnonzero(np.diff(self.file_of * 2**32 + self.group_of, prepend=-1))
        for start, stop in zip(starts, [*starts[1:], len(self)], strict=True):
            file_index, group = int(self.file_of[start]), int(self.group_of[start])
            table = pq.ParquetFile(self.files[file_index]).read_row_group(group, columns=["jpg_0", "jpg_1"])
            for index in range(start, stop):
                k = 1 if self.winner_of[index] == _WIN_1 else 0
                data = table[f"jpg_{k}"][int(self.row_of[index])].as_py()
                ref = f"{self.files[file_index].name} row group {group} row {self.row_of[index]}:jpg_{k}"
                try:
                    if data is None:
                        raise BadSample(ref, "image bytes are null", "skipped_missing")
                    sizes[index] = image_size(data, ref=ref)
                except BadSample as bad:
                    self._bad(index, bad)
        return sizes

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": OrderedDict()}  # decoded row groups stay in their process
