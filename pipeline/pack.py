"""A finished selection -> fixed-length sequences of token ids, as a numpy memmap.

The format nanoGPT / litgpt-style trainers read: ``OUT/train.bin`` is a flat array of token ids
(``uint16`` when the vocabulary fits, else ``uint32``), ``num_sequences * seq_len`` long, so
``np.memmap(OUT/"train.bin", dtype, mode="r").reshape(-1, seq_len)`` gives the sequences;
``OUT/index.json`` says the dtype, ``seq_len``, counts, the EOS id and where it came from.

Documents are taken in the selection's order (the shards' order, rows as written: the job writes
them in a seeded shuffled order), tokenized without special tokens, each followed by EOS, and
concatenated; the stream is cut every ``seq_len`` tokens (a document may span two sequences).
The tail shorter than ``seq_len`` is dropped (``remainder="drop"``) or padded with ``pad_id``
(``"pad"``); the index records how many tokens that was.

Writes are atomic: the old index is withdrawn first, ``train.bin`` is written under a temporary
name, fsynced and renamed, then ``index.json`` is written atomically; a reader that finds
``index.json`` always finds the ``train.bin`` it describes. Same selection + tokenizer + options
give byte-identical files.

``python -m quadsel.pipeline.pack RUN_DIR --tokenizer PATH [--seq-len N] [--out DIR]`` runs it
from the shell.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from quadsel.core.atomic import atomic_path, atomic_write_json, sha256_file
from quadsel.core.errors import PackError

from .shards import data_files, read_manifest, verify

PACK_FORMAT = "quadsel-packed"
PACK_VERSION = 1
BIN_NAME, INDEX_NAME = "train.bin", "index.json"


def _load_tokenizer(tokenizer: Any) -> tuple[Any, str]:
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(tokenizer)), str(tokenizer)
        except (OSError, ValueError) as e:
            raise PackError(f"cannot load the tokenizer {str(tokenizer)!r}: {e}") from None
    return tokenizer, str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _encode(tok: Any, texts: list[str]) -> list[list[int]]:
    out = tok(texts, add_special_tokens=False)
    return out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out


def _texts(files: list[str], fmt: str, column: str, batch: int) -> Iterator[list[str]]:
    for path in files:
        if fmt == "parquet":
            pf = pq.ParquetFile(path, memory_map=True)
            for rb in pf.iter_batches(batch_size=batch, columns=[column]):
                yield [t or "" for t in rb.column(0).to_pylist()]
            continue
        with pa.memory_map(path, "r") as mm:
            reader = ipc.open_file(mm)
            for i in range(reader.num_record_batches):
                col = reader.get_batch(i).column(column)
                for off in range(0, len(col), batch):
                    yield [t or "" for t in col.slice(off, batch).to_pylist()]


def pack_selection(run_dir: str | os.PathLike, tokenizer: Any, *, seq_len: int = 2048,
                   out_dir: str | os.PathLike | None = None, text_column: str = "text",
                   eos_id: int | None = None, remainder: Literal["drop", "pad"] = "drop",
                   pad_id: int | None = None, batch_docs: int = 256,
                   progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Tokenize and pack the selection in ``run_dir``; return the index (also ``OUT/index.json``).

    ``tokenizer``: a Hugging Face tokenizer path / id, or a loaded tokenizer (anything called as
    ``tok(texts, add_special_tokens=False)["input_ids"]`` with a ``len()``). ``eos_id`` defaults
    to the tokenizer's ``eos_token_id``; ``pad_id`` (for ``remainder="pad"``) to its
    ``pad_token_id``, else EOS. ``out_dir`` defaults to ``RUN_DIR/packed``. ``progress`` is
    called with the number of documents done after each batch.
    """
    if seq_len <= 0:
        raise PackError(f"seq_len must be positive, got {seq_len}")
    if remainder not in ("drop", "pad"):
        raise PackError(f"remainder must be 'drop' or 'pad', got {remainder!r}")
    run = Path(run_dir)
    verify(run)  # a complete, sha256-checked selection or a clear error
    manifest = read_manifest(run)
    names = [f["name"] for f in manifest.get("schema", [])]
    if names and text_column not in names:
        raise PackError(f"the selection has no column {text_column!r} (columns: {', '.join(names)})")
    tok, tok_name = _load_tokenizer(tokenizer)
    eos = eos_id if eos_id is not None else getattr(tok, "eos_token_id", None)
    if eos is None:
        raise PackError(f"the tokenizer {tok_name!r} has no EOS token; pass eos_id")
    pad = pad_id if pad_id is not None else getattr(tok, "pad_token_id", None)
    pad = eos if pad is None else pad
    vocab = int(len(tok))
    if max(eos, pad) >= vocab:
        vocab = max(eos, pad) + 1
    dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)

    out = Path(out_dir) if out_dir is not None else run / "packed"
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):  # withdraw the old index before its bin changes
        (out / INDEX_NAME).unlink()
    docs = tokens_in = 0
    written = 0
    with atomic_path(out / BIN_NAME) as tmp, open(tmp, "wb") as fh:
        carry = np.empty(0, dtype=dtype)
        for texts in _texts(data_files(run), manifest["format"], text_column, batch_docs):
            ids = _encode(tok, texts)
            parts = [carry]
            for seq in ids:
                parts.append(np.asarray(seq, dtype=np.int64))
                parts.append(np.array([eos], dtype=np.int64))
            flat = np.concatenate(parts)
            if flat.size and (flat.min() < 0 or flat.max() >= 2 ** (8 * dtype.itemsize)):
                raise PackError(f"token ids outside {dtype} (vocabulary {vocab})")
            flat = flat.astype(dtype)
            docs += len(texts)
            tokens_in += int(flat.size - carry.size)
            full = (flat.size // seq_len) * seq_len
            flat[:full].tofile(fh)
            written += full
            carry = flat[full:]
            if progress is not None:
                progress(docs)
        tail = int(carry.size)
        padded = 0
        if tail and remainder == "pad":
            padded = seq_len - tail
            np.concatenate([carry, np.full(padded, pad, dtype=dtype)]).tofile(fh)
            written += seq_len
        fh.flush()
    index = {
        "format": PACK_FORMAT, "version": PACK_VERSION, "bin": BIN_NAME, "dtype": dtype.name,
        "seq_len": seq_len, "num_sequences": written // seq_len, "num_tokens": written,
        "documents": docs, "document_tokens": tokens_in, "eos_id": int(eos),
        "pad_id": int(pad) if remainder == "pad" else None, "remainder": remainder,
        "dropped_tokens": tail if remainder == "drop" else 0, "padded_tokens": padded,
        "tokenizer": tok_name, "vocab_size": vocab, "text_column": text_column,
        "source": {"manifest_sha256": sha256_file(run / "manifest.json"),
                   "total_rows": manifest["total_rows"]},
    }
    atomic_write_json(out / INDEX_NAME, index)
    return index


def open_packed(out_dir: str | os.PathLike) -> np.ndarray:
    """The packed sequences, memory-mapped, shape ``(num_sequences, seq_len)``."""
    out = Path(out_dir)
    index = json.loads((out / INDEX_NAME).read_text(encoding="utf-8"))
    data = np.memmap(out / index["bin"], dtype=index["dtype"], mode="r")
    return data.reshape(-1, index["seq_len"])


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The packing options, shared by ``quadsel pack`` and ``python -m quadsel.pipeline.pack``."""
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer path or id")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--out", help="output folder (default: RUN_DIR/packed)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--remainder", choices=["drop", "pad"], default="drop")
    p.add_argument("--eos-id", type=int)


def run(args: argparse.Namespace) -> dict:
    return pack_selection(args.run_dir, args.tokenizer, seq_len=args.seq_len, out_dir=args.out,
                          text_column=args.text_column, remainder=args.remainder, eos_id=args.eos_id)


DESCRIPTION = "Tokenize a finished selection into fixed-length sequences (numpy memmap train.bin + index.json)."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quadsel.pipeline.pack", description=DESCRIPTION)
    add_arguments(p)
    args = p.parse_args(argv)
    from .shards import ManifestError

    try:
        index = run(args)
    except (PackError, ManifestError, OSError) as e:
        print(f"pack: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(index, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
