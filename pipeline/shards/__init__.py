"""Selected examples -> Arrow (or Parquet) shards plus ``manifest.json``, crash-safe.

Layout of a run directory::

    RUN/manifest.json              the published manifest (shard paths relative to RUN)
    RUN/selection/part-00000.arrow shards of the current generation
    RUN/selection/manifest.json    a byte-identical copy of the manifest, inside the generation
    RUN/README.md                  a dataset card whose YAML ``configs:`` point ``data_files`` at
                                   the shards, so ``datasets.load_dataset(RUN)`` is the selection

Row order: ``write_order`` gives the seeded shuffled order the job writes rows in (so a trainer
reading the shards front to back does not see them grouped by cluster); it is a pure function of
the rows' pool positions and the seed (a splitmix64 hash, no library RNG), so the same config and
seed give the same order on every machine and numpy version.

Determinism: the manifest holds no timestamps or hostnames, JSON is canonical and shard
boundaries, record batches and row groups depend only on the rows written (and the caps), so
the same rows written in the same batches give byte-identical shards and manifest.

Arrow shards keep the schema exactly; Parquet shards follow Parquet's type rules (e.g.
``timestamp[s]`` is stored as ms, list items are named ``element``), values are unchanged.

Commit protocol (one writer at a time: ``ShardWriter`` holds an ``flock`` on
``RUN/.<manifest>.lock`` and refuses to start while another writer holds it):

1. A new generation is written into ``RUN/.selection.tmp-<tok>/``: every shard goes to a
   temporary name, is fsynced and renamed (``atomic_path``); then the generation's own
   ``manifest.json`` is written atomically and the folder is fsynced.
2. The new top-level manifest is written and fsynced under a temporary name
   (``RUN/.tmp-manifest.json.*``).
3. ``RUN/manifest.json`` -> ``RUN/.manifest.json.old-<tok>`` (the manifest is withdrawn
   BEFORE any shard it describes moves), fsync RUN.
4. ``RUN/selection`` -> ``RUN/.selection.old-<tok>``; ``RUN/.selection.tmp-<tok>`` ->
   ``RUN/selection`` (the commit point), fsync RUN.
5. The temporary manifest of step 2 is renamed onto ``RUN/manifest.json``, fsync RUN.
6. The old generation and the withdrawn manifest are deleted.

Invariant: at every instant, ``RUN/manifest.json`` is either absent or describes a complete,
sha256-verified set of shards: it is withdrawn before the shards move and published only after
the new folder is in place. Steps 1-2 do all the data writing, so a disk-full (ENOSPC) error
there happens before anything visible changed (the temp folder is dropped); an error in steps
3-5 (a rename can fail too) is rolled back in-process, renames undone in reverse order.

Repair (``recover``; also run by every ``ShardWriter`` on start, under the lock): a writer
killed at any point leaves one of these states, each mapped back to a valid one:

- ``RUN/selection`` missing and a ``.selection.old-*`` folder present (killed inside step 4):
  the old folder is renamed back (roll back).
- ``RUN/manifest.json`` missing or not matching ``RUN/selection`` (killed after step 3): if the
  generation in ``RUN/selection`` verifies (sha256 of every shard against its own manifest),
  its manifest is published (roll forward when step 4 completed, roll back otherwise); else a
  withdrawn ``.manifest.json.old-*`` that verifies is restored.
- leftovers (``.selection.tmp-*``, ``.selection.old-*``, ``.manifest.json.old-*``,
  ``.tmp-manifest.json.*``, ``.tmp-README.md.*``) are deleted.
- a dataset card that is missing or stale (another format) is rewritten.

The dataset card's ``data_files`` is the glob ``selection/part-*.<ext>``, which matches exactly
the shards of the live generation; its config is named after the generation's content
(``selection-<digest of the shard checksums>``), because ``datasets`` caches a folder's table and
features by name and config rather than path: two run directories of the same name, or one after
a new selection, must not be read from each other's cache. It is replaced (atomically) right
after the manifest is published. It is derived data: a failure to write it is logged, not
raised, and the next writer (or ``recover``) writes it.

Readers (``read_manifest``, ``verify``, ``data_files``) never modify a run directory.
"""
from quadsel.core.errors import ManifestError

from .manifest import card_generation, data_files, dataset_card, read_manifest, verify
from .repair import recover
from .schema import (
    CARD_NAME,
    MANIFEST_VERSION,
    QUADSEL_COLUMNS,
    SchemaMismatchError,
    ShardConfig,
    conform,
    selection_schema,
    write_order,
)
from .writer import ShardWriter, _HashingSink

__all__ = [
    "CARD_NAME", "MANIFEST_VERSION", "QUADSEL_COLUMNS", "ManifestError", "SchemaMismatchError", "ShardConfig",
    "ShardWriter", "_HashingSink", "card_generation", "conform", "data_files", "dataset_card", "read_manifest",
    "recover", "selection_schema", "verify", "write_order",
]
