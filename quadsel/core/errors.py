"""Every error type a user can cause, in one place.

Each is a :class:`QuadselError` (and also the builtin type callers caught before, e.g.
``ValueError``), so the CLI answers every one of them the same way: its message on one line and
exit code 2, no traceback. A new kind of user error is added here, and is then handled everywhere.
The packages that raise them re-export their own (``quadsel.pipeline.sources.SourceError`` …).
"""
from __future__ import annotations


class QuadselError(Exception):
    """A problem the user can fix; the message says what and, where it can, how."""


# -- configuration and inputs ------------------------------------------------------------------
class ConfigError(QuadselError, ValueError):
    """A problem in a job config file or override that the user can fix."""


class SourceError(QuadselError, ValueError):
    """A problem with an input file the user can fix; the message names the file."""


class TfidfFitError(QuadselError, ValueError):
    """The texts cannot give a tf-idf embedding (too few texts, or too few distinct features)."""


class UntrackableLayersError(QuadselError, ValueError):
    """The requested layer group holds weights the gradient hooks cannot track (not Linear/Conv1D)."""


class LayoutMismatchError(QuadselError, ValueError):
    """Two feature sets / a reference and a candidate side were built with different layouts."""


# -- state on disk -----------------------------------------------------------------------------
class StoreError(QuadselError, ValueError):
    """A store folder that cannot be used (unfinished write, missing or changed shard)."""


class EmbeddingStoreError(StoreError):
    """An embeddings folder that cannot be used (unfinished write, missing or changed shard)."""


class ManifestError(QuadselError, RuntimeError):
    """A manifest is missing, malformed, or does not match the shards on disk."""


class SchemaMismatchError(QuadselError, ValueError):
    """A batch given to ``ShardWriter.write`` does not match the writer's schema."""


class RunLockedError(QuadselError, RuntimeError):
    """Another process holds the run directory (or the writer's manifest)."""


# -- running -----------------------------------------------------------------------------------
class JobError(QuadselError, RuntimeError):
    """A run cannot go on; the message says why and what to do."""


class WorkerPoolError(QuadselError, RuntimeError):
    """The workers (local or Ray actors) cannot be started or failed beyond their retries."""


class RayConnectError(WorkerPoolError):
    """The Ray cluster an address names cannot be reached or refused the connection."""


class PackError(QuadselError, ValueError):
    """A selection cannot be packed with the given tokenizer / options."""


class InspectError(QuadselError, ValueError):
    """The directory is not a (finished enough) run, or an argument does not fit the run."""


class ReportError(InspectError):
    """The report cannot be written (the message says why)."""
