"""Feeding a training job from a quadsel selection (the shards of ``pipeline.shards``).

``ShardIterableDataset`` streams rows straight from the shards: Arrow shards are memory-mapped
and read record batch by record batch, Parquet shards row group by row group.

One epoch, step by step:

1. **Blocks.** Every shard is cut into blocks of ``block_rows`` consecutive rows (a block never
   spans two shards). With ``shuffle=True`` the block order is a permutation seeded with
   ``(seed, epoch)``, the same on every rank and worker; without it, blocks keep the manifest's
   order. Concatenating the blocks gives the epoch's global row order, positions ``0 .. N-1``.
2. **Ranks get equal rows.** With ``W = world_size`` ranks, rank ``r`` takes the contiguous
   positions ``[r*L, (r+1)*L)`` of that order, where ``L`` depends on ``remainder``:

   - ``"drop"`` (default): ``L = N // W``; the last ``N % W`` positions are not read this epoch
     (with shuffling, a different handful each epoch). Every rank runs the same number of
     steps, which distributed training needs (a rank that runs out first hangs the others in
     their next collective).
   - ``"pad"``: ``L = ceil(N / W)``; positions past the end wrap round to the start of the
     epoch's order, so ``W*L - N`` rows are seen twice and none is dropped.
   - ``"none"``: every row exactly once, ranks differ by at most one row (evaluation).

3. **Workers.** A rank's ``L`` positions are split into contiguous, near-equal parts, one per
   DataLoader worker, so the rows a rank reads do not depend on how many workers it uses.
4. **Shuffle buffer.** With ``shuffle=True`` each worker passes its rows through a buffer of
   ``shuffle_buffer`` rows (seeded with seed, epoch, rank and worker), yielding a random
   buffered row for each row read. Rows are therefore shuffled across blocks and within them,
   and even a selection that is a single shard comes in a different order every epoch. (The
   job also writes the shards in a seeded shuffled order, so neighbouring rows on disk are
   unrelated to begin with.)

``set_epoch(e)`` stores the epoch in shared memory (a one-element torch tensor in shared memory)
that each worker reads when its iterator starts, so it also reaches DataLoader workers kept
alive across epochs with ``persistent_workers=True``: call it before ``iter(loader)`` (before
the ``for`` loop of the epoch).
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .shards import data_files, read_manifest

_CHUNK_ROWS = 1024  # rows converted to Python objects at a time
_STREAM = 0x66656564  # "feed": the shuffle streams, apart from other uses of the same seed
Remainder = Literal["drop", "pad", "none"]


def _dist_rank_world() -> tuple[int, int] | None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def _wrapped(lo: int, hi: int, n: int) -> Iterator[tuple[int, int]]:
    """The positions ``p % n`` for ``p`` in ``[lo, hi)`` as ascending segments of ``[0, n)``."""
    while lo < hi and n > 0:
        a = lo % n
        b = min(n, a + (hi - lo))
        yield a, b
        lo += b - a


class _ShardReader:
    """Slices of rows of the shards, by shard and row range (one worker's open files)."""

    def __init__(self, files: list[str], fmt: str, columns: list[str] | None) -> None:
        self.files, self.format, self.columns = files, fmt, columns
        self._units: dict[int, tuple[Any, np.ndarray]] = {}  # shard -> (reader, unit start rows)
        self._last: tuple[int, int, pa.RecordBatch | pa.Table] | None = None  # decoded unit cache

    def _open(self, idx: int) -> tuple[Any, np.ndarray]:
        if idx not in self._units:
            path = self.files[idx]
            if self.format == "parquet":
                pf = pq.ParquetFile(path, memory_map=True)
                sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
                reader: Any = pf
            else:
                reader = ipc.open_file(pa.memory_map(path, "r"))
                sizes = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
            self._units[idx] = (reader, np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]))
        return self._units[idx]

    def _unit(self, idx: int, u: int):
        if self._last is not None and self._last[:2] == (idx, u):
            return self._last[2]
        reader, _ = self._open(idx)
        if self.format == "parquet":
            data = reader.read_row_group(u, columns=self.columns)
        else:
            data = reader.get_batch(u)
            if self.columns:
                data = data.select(self.columns)
        self._last = (idx, u, data)
        return data

    def read(self, idx: int, start: int, stop: int) -> Iterator[pa.RecordBatch | pa.Table]:
        """Rows ``[start, stop)`` of shard ``idx``, as record batches / tables in order."""
        _, bounds = self._open(idx)
        u = int(np.searchsorted(bounds, start, side="right")) - 1
        while start < stop:
            u_lo, u_hi = int(bounds[u]), int(bounds[u + 1])
            a, b = start - u_lo, min(stop, u_hi) - u_lo
            if b > a:
                yield self._unit(idx, u).slice(a, b - a)
            start = min(stop, u_hi)
            u += 1


class ShardIterableDataset(IterableDataset):
    """Rows of a selection as dicts (or the values of one column with ``columns="text"``).

    ``rank`` / ``world_size`` default to those of ``torch.distributed`` when it is initialised
    (construct the dataset after ``init_process_group``, or pass them explicitly), else 0 / 1.
    ``remainder`` ("drop", "pad" or "none") decides how ranks are made equal (module docs).
    ``shuffle=True`` permutes blocks of ``block_rows`` rows with ``(seed, epoch)`` and passes each
    worker's rows through a seeded ``shuffle_buffer``; call ``set_epoch`` each epoch.
    """

    def __init__(self, source: str | os.PathLike, *, columns: str | Sequence[str] | None = None,
                 rank: int | None = None, world_size: int | None = None,
                 shuffle: bool = False, seed: int = 0, remainder: Remainder = "drop",
                 shuffle_buffer: int = 10_000, block_rows: int = 1024) -> None:
        super().__init__()
        self.manifest = read_manifest(source)
        self.files = data_files(source)
        self.format: str = self.manifest["format"]
        self.shard_rows = [int(s["rows"]) for s in self.manifest["shards"]]
        names = [f["name"] for f in self.manifest.get("schema", [])]
        wanted = [columns] if isinstance(columns, str) else list(columns or [])
        unknown = [c for c in wanted if names and c not in names]
        if unknown:
            raise ValueError(f"column(s) {', '.join(map(repr, unknown))} not in the selection "
                             f"(columns: {', '.join(names)})")
        if remainder not in ("drop", "pad", "none"):
            raise ValueError(f"remainder must be 'drop', 'pad' or 'none', got {remainder!r}")
        if block_rows <= 0 or shuffle_buffer < 0:
            raise ValueError("block_rows must be positive and shuffle_buffer at least 0")
        self.columns = columns
        self._read_cols = wanted or None
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither")
        if rank is None:
            detected = _dist_rank_world()
            if detected is not None:
                rank, world_size = detected
        if rank is not None and world_size is not None and not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.rank, self.world_size = rank, world_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.remainder: Remainder = remainder
        self.shuffle_buffer = int(shuffle_buffer)
        self.block_rows = int(block_rows)
        # shared memory: DataLoader workers (persistent ones too) see set_epoch of the main process
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        if world_size is not None:
            self._check_rows(int(world_size))

    # -- sizes
    @property
    def num_rows(self) -> int:
        """Rows in the selection."""
        return sum(self.shard_rows)

    def _check_rows(self, world: int) -> None:
        if self.remainder == "drop" and 0 < self.num_rows < world:
            raise ValueError(f"the selection has {self.num_rows} rows, fewer than world_size {world}: "
                             "remainder='drop' would give every rank nothing; use remainder='pad'")

    def _rank_range(self, rank: int, world: int) -> tuple[int, int]:
        n = self.num_rows
        if self.remainder == "none":
            return n * rank // world, n * (rank + 1) // world
        per = n // world if self.remainder == "drop" else -(-n // world)
        return rank * per, (rank + 1) * per

    def rows_per_rank(self, rank: int | None = None) -> int:
        """How many rows ``rank`` (default: this dataset's rank) reads per epoch."""
        r, world = self._rank_world()
        lo, hi = self._rank_range(r if rank is None else rank, world)
        return hi - lo

    # -- epochs
    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next ``iter()``: reshuffles blocks and buffers (all workers see it)."""
        self._epoch[0] = int(epoch)

    def block_order(self, epoch: int | None = None) -> list[tuple[int, int, int]]:
        """The epoch's blocks as (shard, first row, end row), in reading order."""
        blocks = [(i, a, min(a + self.block_rows, n)) for i, n in enumerate(self.shard_rows)
                  for a in range(0, n, self.block_rows)]
        if self.shuffle:
            e = self.epoch if epoch is None else int(epoch)
            perm = np.random.default_rng([_STREAM, self.seed, e]).permutation(len(blocks))
            blocks = [blocks[int(i)] for i in perm]
        return blocks

    # -- iteration
    def _rank_world(self) -> tuple[int, int]:
        if self.rank is None or self.world_size is None:  # not known at construction: ask now
            return _dist_rank_world() or (0, 1)
        return int(self.rank), int(self.world_size)

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch  # read once: the value set_epoch stored before this iterator began
        rank, world = self._rank_world()
        self._check_rows(world)
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        lo, hi = self._rank_range(rank, world)
        length = hi - lo
        w_lo, w_hi = lo + length * wid // nworkers, lo + length * (wid + 1) // nworkers
        rows = self._positions(self.block_order(epoch), w_lo, w_hi)
        if self.shuffle and self.shuffle_buffer > 1:
            rng = np.random.default_rng([_STREAM, self.seed, epoch, rank, wid, 1])
            rows = _buffered(rows, self.shuffle_buffer, rng)
        return rows

    def _positions(self, blocks: list[tuple[int, int, int]], lo: int, hi: int) -> Iterator[Any]:
        """The rows at global positions ``[lo, hi)`` (mod N) of the epoch's block order."""
        n = self.num_rows
        starts = np.cumsum([0] + [b - a for _, a, b in blocks], dtype=np.int64)
        reader = _ShardReader(self.files, self.format, self._read_cols)
        for seg_lo, seg_hi in _wrapped(lo, hi, n):
            k = int(np.searchsorted(starts, seg_lo, side="right")) - 1
            while k < len(blocks) and starts[k] < seg_hi:
                shard, a, _ = blocks[k]
                first = max(seg_lo, int(starts[k])) - int(starts[k])
                last = min(seg_hi, int(starts[k + 1])) - int(starts[k])
                for part in reader.read(shard, a + first, a + last):
                    yield from self._objects(part)
                k += 1

    def _objects(self, data: pa.RecordBatch | pa.Table) -> Iterator[Any]:
        for off in range(0, data.num_rows, _CHUNK_ROWS):
            chunk = data.slice(off, _CHUNK_ROWS)
            if isinstance(self.columns, str):
                yield from chunk.column(0).to_pylist()
            else:
                yield from chunk.to_pylist()


def _buffered(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A shuffle buffer: once ``size`` rows are held, each new row replaces a random held one,
    which is yielded; what is left at the end comes out in a random order."""
    buf: list[Any] = []
    draws, d = rng.integers(0, size, _CHUNK_ROWS), 0
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        if d == len(draws):
            draws, d = rng.integers(0, size, _CHUNK_ROWS), 0
        j = int(draws[d])
        d += 1
        yield buf[j]
        buf[j] = x
    for j in rng.permutation(len(buf)):
        yield buf[int(j)]


def load_selection(run_dir: str | os.PathLike, streaming: bool = False, **kwargs: Any):
    """The selection as a ``datasets`` Dataset (or IterableDataset with ``streaming=True``).

    Extra keyword arguments go to ``datasets.load_dataset`` (e.g. ``cache_dir``). Same rows as
    ``datasets.load_dataset(run_dir, split="train")`` (the run's dataset card), but also works on
    run directories written before the card existed.
    """
    import datasets

    fmt = read_manifest(run_dir)["format"]
    return datasets.load_dataset(fmt, data_files=data_files(run_dir), split="train",
                                 streaming=streaming, **kwargs)


__all__ = ["ShardIterableDataset", "load_selection"]
