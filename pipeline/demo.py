"""The embedded default corpus: built at run time from text every Python installation has.

Domains (the ``domain`` field is for measurement only; no selector reads it):
- ``code``: top-level functions and classes from standard-library modules,
- ``docstring``: module, class and function docstrings,
- ``prose``: ``pydoc_data`` help topics (the language reference), chunked by paragraphs,
- ``spam``: templated advertising, ``garbage``: random characters,
- ``duplicate``: exact copies of other pool documents.

The reference set is a held-out group of ``pydoc_data`` topics (prose about the Python
language), so a good selection favours prose and docstrings over spam, garbage and copies.
Everything is seeded: the same Python installation and seed give the same files.
"""
from __future__ import annotations

import ast
import json
import logging
import random
import string
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from quadsel.core.atomic import atomic_path

logger = logging.getLogger(__name__)

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
              "lib2to3", "ensurepip", "turtledemo", "idlelib", "tkinter", "config-3"}


@dataclass(frozen=True)
class DemoCorpus:
    pool: Path
    reference: Path
    counts: dict[str, int]


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if any(part in _SKIP_DIRS or part.startswith("config-") for part in rel[:-1]):
            continue
        files.append(p)
    return files


def _code_and_docstrings(files: list[Path]) -> tuple[list[str], list[str]]:
    code, docs = [], []
    for path in files:
        try:
            src = path.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        lines = src.splitlines()
        mod_doc = ast.get_docstring(tree)
        if mod_doc and len(mod_doc) >= 200:
            docs.append(mod_doc[:3000])
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            seg = "\n".join(lines[node.lineno - 1: node.end_lineno or node.lineno])
            if 300 <= len(seg) <= 6000:
                code.append(seg[:3000])
            for sub in [node, *getattr(node, "body", [])]:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    d = ast.get_docstring(sub)
                    if d and len(d) >= 200:
                        docs.append(d[:3000])
    return code, docs


def _topic_chunks(target: int = 700) -> dict[str, list[str]]:
    from pydoc_data.topics import topics

    out: dict[str, list[str]] = {}
    for name in sorted(topics):
        paras = [p.strip() for p in topics[name].split("\n\n") if p.strip()]
        chunks, cur = [], ""
        for para in paras:
            cur = f"{cur}\n\n{para}" if cur else para
            if len(cur) >= target:
                chunks.append(cur)
                cur = ""
        if len(cur) >= 200:
            chunks.append(cur)
        if chunks:
            out[name] = chunks
    return out


_PRODUCTS = ["watches", "pills", "sunglasses", "crypto tokens", "loans", "handbags", "followers",
             "diet tea", "casino credits", "software licenses"]
_HOOKS = ["LIMITED OFFER", "ACT NOW", "WINNER", "FREE GIFT", "LAST CHANCE", "EXCLUSIVE DEAL"]


NOISE_DOMAINS = ("spam", "garbage", "duplicate")  # the demo's (and the benchmark pool's) noise


def noise_share(mix: dict[str, dict[str, int]]) -> dict[str, float] | None:
    """Share of noise-domain rows in the pool and in the selection of a domain mix
    (``jobs.report_data.domain_mix``); None when no noise domain occurs."""
    if not any(d in NOISE_DOMAINS for d in mix.get("pool", {})):
        return None
    return {side: round(sum(c.get(d, 0) for d in NOISE_DOMAINS) / max(1, sum(c.values())), 4)
            for side, c in mix.items()}

def _spam(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(2, 6)):
        lines.append(
            f"{rng.choice(_HOOKS)}!!! Buy cheap {rng.choice(_PRODUCTS)} at {rng.randint(50, 95)}% off. "
            f"Click http://{''.join(rng.choices(string.ascii_lowercase, k=8))}.biz/"
            f"{rng.randint(1000, 9999)} now, only ${rng.randint(1, 99)}.{rng.randint(0, 99):02d}! "
            f"Call {rng.randint(100, 999)}-{rng.randint(1000, 9999)} today!!!"
        )
    return "\n".join(lines)


def _garbage(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + string.punctuation + "      \u00e9\u00df\u00f8\u2603"
    return "".join(rng.choices(alphabet, k=rng.randint(200, 1500)))


def build_demo_corpus(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_code: int = 1400,
    n_docstring: int = 900,
    n_spam: int = 250,
    n_garbage: int = 180,
    n_duplicate: int = 150,
    reference_topics: int = 14,
    max_reference: int = 160,
) -> DemoCorpus:
    """Write ``pool.jsonl`` and ``reference.jsonl`` into ``out_dir``; return their paths."""
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    code, docs = _code_and_docstrings(_stdlib_files())
    topics = _topic_chunks()
    names = sorted(topics)
    held = set(rng.sample(names, min(reference_topics, max(1, len(names) // 4))))
    reference = [c for n in sorted(held) for c in topics[n]]
    rng.shuffle(reference)
    reference = reference[:max_reference]
    prose = [c for n in names if n not in held for c in topics[n]]

    rows: list[tuple[str, str]] = []
    rows += [("code", t) for t in rng.sample(code, min(n_code, len(code)))]
    rows += [("docstring", t) for t in rng.sample(docs, min(n_docstring, len(docs)))]
    rows += [("prose", t) for t in prose]
    rows += [("spam", _spam(rng)) for _ in range(n_spam)]
    rows += [("garbage", _garbage(rng)) for _ in range(n_garbage)]
    originals = [t for _, t in rows]
    rows += [("duplicate", t) for t in rng.sample(originals, min(n_duplicate, len(originals)))]
    rng.shuffle(rows)

    counts: dict[str, int] = {}
    pool_path, ref_path = out / "pool.jsonl", out / "reference.jsonl"
    with atomic_path(pool_path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for i, (domain, text) in enumerate(rows):
            counts[domain] = counts.get(domain, 0) + 1
            fh.write(json.dumps({"id": f"demo-{i:06d}", "text": text, "domain": domain}) + "\n")
    with atomic_path(ref_path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for i, text in enumerate(reference):
            fh.write(json.dumps({"id": f"ref-{i:05d}", "text": text, "domain": "prose"}) + "\n")
    logger.info("demo corpus: %d pool rows %s, %d reference rows", len(rows), counts, len(reference))
    return DemoCorpus(pool=pool_path, reference=ref_path, counts=counts)
