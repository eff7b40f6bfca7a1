"""Feeding a training job from a quadsel selection (the shards of ``pipeline.shards``).

``ShardIterableDataset`` streams rows straight from the shards: Arrow shards are memory-mapped
and read record batch by record batch, Parquet shards row group by row group.

Splitting across consumers: a consumer is one DataLoader worker of one rank; consumer
``c = worker_id * world_size + rank`` of ``C = world_size * num_workers``.

- ``num_shards >= C``: consumer ``c`` reads the shards at positions ``c, c + C, ...`` of the
  (optionally shuffled) shard order.
- fewer shards than consumers: every consumer reads every shard and keeps the rows whose global
  position ``g`` (counted along the shard order) has ``g % C == c``.

Either way each row is yielded exactly once across all consumers, and because ``c % world_size
== rank``, the rows a rank receives (union over its workers) do not depend on how many workers
it uses. Ranks may receive different numbers of rows (whole shards are assigned); trainers that
need equal step counts per rank should stop on the shortest rank or use more shards than
consumers.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .shards import data_files, read_manifest

_CHUNK_ROWS = 1024  # rows converted to Python objects at a time


def _dist_rank_world() -> tuple[int, int] | None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


class ShardIterableDataset(IterableDataset):
    """Rows of a selection as dicts (or the values of one column with ``columns="text"``).

    ``rank`` / ``world_size`` default to those of ``torch.distributed`` when it is initialised
    (construct the dataset after ``init_process_group``, or pass them explicitly), else 0 / 1.
    ``shuffle=True`` permutes the shard order with ``(seed, epoch)``; call ``set_epoch`` each
    epoch. Rows inside a shard keep their order.
    """

    def __init__(self, source: str | os.PathLike, *, columns: str | Sequence[str] | None = None,
                 rank: int | None = None, world_size: int | None = None,
                 shuffle: bool = False, seed: int = 0) -> None:
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
        self.columns = columns
        self._read_cols = wanted or None
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither")
        if rank is None:
            detected = _dist_rank_world()
            if detected is not None:
                rank, world_size = detected
        if world_size is not None and not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.rank, self.world_size = rank, world_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0

    @property
    def num_rows(self) -> int:
        return sum(self.shard_rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shard_order(self) -> list[int]:
        order = np.arange(len(self.files))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        return [int(i) for i in order]

    def _consumer(self) -> tuple[int, int]:
        rank, world = self.rank, self.world_size
        if rank is None:  # not known at construction: ask now (main process / num_workers=0)
            rank, world = _dist_rank_world() or (0, 1)
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        return wid * world + rank, world * nworkers

    def __iter__(self) -> Iterator[Any]:
        c, count = self._consumer()
        order = self.shard_order()
        if len(order) >= count:
            for idx in order[c::count]:
                yield from self._rows(idx, None, 0, 1)
            return
        start = 0  # global row position of the shard's first row along ``order``
        for idx in order:
            yield from self._rows(idx, start, c, count)
            start += self.shard_rows[idx]

    def _batches(self, idx: int) -> Iterator[pa.RecordBatch]:
        path = self.files[idx]
        if self.format == "parquet":
            pf = pq.ParquetFile(path, memory_map=True)
            try:
                for rg in range(pf.num_row_groups):
                    yield from pf.read_row_group(rg, columns=self._read_cols).to_batches()
            finally:
                pf.close()
            return
        with pa.memory_map(path, "r") as mm:
            reader = ipc.open_file(mm)
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                yield batch.select(self._read_cols) if self._read_cols else batch

    def _rows(self, idx: int, start: int | None, c: int, count: int) -> Iterator[Any]:
        pos = start or 0
        for batch in self._batches(idx):
            n = batch.num_rows
            if start is not None:  # strided: keep global positions g with g % count == c
                first = (c - pos) % count
                keep = np.arange(first, n, count)
                pos += n
                if keep.size == 0:
                    continue
                batch = batch.take(pa.array(keep))
            for off in range(0, batch.num_rows, _CHUNK_ROWS):
                chunk = batch.slice(off, _CHUNK_ROWS)
                if isinstance(self.columns, str):
                    yield from chunk.column(0).to_pylist()
                else:
                    yield from chunk.to_pylist()


def load_selection(run_dir: str | os.PathLike, streaming: bool = False, **kwargs: Any):
    """The selection as a ``datasets`` Dataset (or IterableDataset with ``streaming=True``).

    Extra keyword arguments go to ``datasets.load_dataset`` (e.g. ``cache_dir``).
    """
    import datasets

    fmt = read_manifest(run_dir)["format"]
    return datasets.load_dataset(fmt, data_files=data_files(run_dir), split="train",
                                 streaming=streaming, **kwargs)


__all__ = ["ShardIterableDataset", "load_selection"]
