"""tf-idf + truncated SVD: the default embedder, no model needed.

Pipeline (scikit-learn):

1. ``HashingVectorizer`` (``alternate_sign=False``, ``n_features`` wide, lower-cased) over word
   unigrams and bigrams with a token pattern that also keeps every punctuation mark / symbol as
   a token of its own. Symbols are what separate C code (``; { } -> *``), GSM8K-style math
   (``$ = << >> ####``) and random-character garbage from prose; bigrams separate templated
   spam and boilerplate. On the bench pool this puts code, math, spam and garbage into
   clusters of their own (see bench/RESULTS.md for the measured purity).
2. Feature selection on the fit sample: the ``max_features`` hashed columns with the highest
   document frequency among those seen in at least ``MIN_DF`` documents (ties: lower column
   first). This keeps the SVD and the saved projection small (``max_features x dim``) while
   the hashing width keeps collisions rare.
3. ``TfidfTransformer`` (sublinear tf, smoothed idf, l2 rows), fitted on the sample.
4. ``TruncatedSVD`` (randomized, ``random_state=seed``) to ``dim`` components, float32.

``transform`` applies 1 -> 3 to new texts and multiplies by the SVD components, then
L2-normalises the rows. Every step works row by row, so embedding a text alone or inside any
batch gives the same bits, and the same fit sample + seed gives the same saved arrays.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp

from quadsel.core.atomic import atomic_path, atomic_write_json
from quadsel.core.errors import TfidfFitError
from quadsel.core.progress import Progress

from .base import META, EmbedConfig, Embedder, l2_normalize, sample_rows

logger = logging.getLogger(__name__)

# a word (letters, digits, underscore) or any single character that is neither word nor space
TOKEN_PATTERN = r"(?u)\b\w+\b|[^\w\s]"
NGRAM_RANGE = (1, 2)
MIN_DF = 2
SVD_N_ITER = 5


def too_few_features(cfg: EmbedConfig, kept: int, seen: int, n_texts: int, sampled: bool = False) -> str | None:
    """Why ``kept`` features (of ``seen``, over ``n_texts`` texts) give no usable embedding, or None.
    The SVD needs more features than components, and one component alone gives every text the
    same (normalised) vector, so clusters of it are arbitrary: at least 2 dimensions (or the one
    ``embed.dim`` asks for) are needed."""
    if kept - 1 >= min(2, cfg.dim):
        return None
    return (f"embed: the texts give only {kept} distinct tf-idf feature(s) (words, symbols or word pairs "
            f"found in {MIN_DF}+ of the {n_texts} texts; {seen} in all), too few to embed them in 2 or more "
            "dimensions: every text is (nearly) the same word or symbol repeated; give the pool more varied text"
            + (f" or a larger embed.fit_sample (now {cfg.fit_sample})" if sampled else ""))


class FeatureCounter:
    """The document frequency of the hashed features over texts given one by one (what the fit
    counts), without keeping the texts: ``problem()`` is :func:`too_few_features` for them all."""

    BATCH = 2048

    def __init__(self, cfg: EmbedConfig) -> None:
        self.cfg = cfg
        self._embedder = TfidfEmbedder(cfg)
        self.df = np.zeros(cfg.n_features, dtype=np.int64)
        self.n = 0
        self._buf: list[str] = []

    def add(self, text: str) -> None:
        self._buf.append(text)
        if len(self._buf) >= self.BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            x = self._embedder._counts(self._buf)
            self.df += np.bincount(x.indices, minlength=self.cfg.n_features)
            self.n += len(self._buf)
            self._buf = []

    def problem(self) -> str | None:
        self._flush()
        if self.n < 2:
            return None  # the pool's own row check says so
        kept = min(self.cfg.max_features, int(np.count_nonzero(self.df >= MIN_DF)))
        return too_few_features(self.cfg, kept, int(np.count_nonzero(self.df)), self.n)


class TfidfEmbedder(Embedder):
    kind = "tfidf"

    def __init__(self, cfg: EmbedConfig) -> None:
        self.cfg = cfg
        self.dim = cfg.dim
        self.columns: np.ndarray | None = None     # kept hashed columns, ascending (int64)
        self.idf: np.ndarray | None = None         # float32 [n_kept]
        self.projection: np.ndarray | None = None  # float32 [n_kept, dim] (SVD components, transposed)
        self.info: dict[str, Any] = {}
        self._col_of: np.ndarray | None = None
        self._tfidf = None
        self._vectorizer = self._make_vectorizer()

    # -- pieces ------------------------------------------------------------------------------
    def _make_vectorizer(self):
        from sklearn.feature_extraction.text import HashingVectorizer

        return HashingVectorizer(
            n_features=self.cfg.n_features, alternate_sign=False, norm=None, lowercase=True,
            token_pattern=TOKEN_PATTERN, ngram_range=NGRAM_RANGE, dtype=np.float32)

    def _set_columns(self, columns: np.ndarray) -> None:
        self.columns = columns.astype(np.int64)
        col_of = np.full(self.cfg.n_features, -1, dtype=np.int64)
        col_of[self.columns] = np.arange(len(self.columns))
        self._col_of = col_of

    def _set_fitted(self, columns: np.ndarray, idf: np.ndarray, projection: np.ndarray) -> None:
        from sklearn.feature_extraction.text import TfidfTransformer

        self._set_columns(columns)
        self.idf = idf.astype(np.float32)
        self.projection = np.ascontiguousarray(projection, dtype=np.float32)
        self.dim = int(self.projection.shape[1])
        tfidf = TfidfTransformer(sublinear_tf=True, norm="l2", smooth_idf=True)
        tfidf.idf_ = self.idf
        tfidf.n_features_in_ = len(self.columns)
        self._tfidf = tfidf

    def _counts(self, texts: Sequence[str]) -> sp.csr_matrix:
        x = self._vectorizer.transform(list(texts)).tocsr()
        x.sum_duplicates()
        return x

    def _select(self, x: sp.csr_matrix) -> sp.csr_matrix:
        """Keep only the fitted columns, renumbered 0..n_kept-1 (order within a row kept)."""
        new = self._col_of[x.indices]
        keep = new >= 0
        csum = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
        return sp.csr_matrix((x.data[keep], new[keep], csum[x.indptr]),
                             shape=(x.shape[0], len(self.columns)))

    # -- Embedder ----------------------------------------------------------------------------
    def fit(self, texts: Sequence[str]) -> None:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfTransformer

        n_in = len(texts)
        if n_in > self.cfg.fit_sample:
            rows = sample_rows(n_in, self.cfg.fit_sample, self.cfg.seed)
            texts = [texts[int(i)] for i in rows]
            logger.info("tfidf: fitting on a seeded sample of %d of the %d texts given",
                        len(texts), n_in)
        if len(texts) < 2:
            raise TfidfFitError(f"tfidf: need at least 2 texts to fit, got {len(texts)}")
        with Progress("fit tf-idf: count", total=len(texts), unit="docs") as prog:
            parts = []
            for i in range(0, len(texts), 2048):
                parts.append(self._counts(texts[i:i + 2048]))
                prog.advance(parts[-1].shape[0])
        x = sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]
        df = np.bincount(x.indices, minlength=self.cfg.n_features)
        order = np.argsort(-df, kind="stable")[: self.cfg.max_features]
        columns = np.sort(order[df[order] >= MIN_DF])
        why = too_few_features(self.cfg, len(columns), int(np.count_nonzero(df)), len(texts), n_in > len(texts))
        if why:
            raise TfidfFitError(why)
        dim = min(self.cfg.dim, len(texts) - 1, len(columns) - 1)
        if dim < self.cfg.dim:
            logger.warning("tfidf: embed.dim=%d reduced to %d (fit sample: %d texts, %d features)",
                           self.cfg.dim, dim, len(texts), len(columns))
        self._set_columns(columns)
        xs = self._select(x)
        tfidf = TfidfTransformer(sublinear_tf=True, norm="l2", smooth_idf=True).fit(xs)
        svd = TruncatedSVD(n_components=dim, algorithm="randomized", n_iter=SVD_N_ITER,
                           random_state=self.cfg.seed)
        with Progress("fit tf-idf: svd", total=1, unit="fits") as prog:
            svd.fit(tfidf.transform(xs))
            prog.advance(1)
        self._set_fitted(columns, tfidf.idf_, svd.components_.T)
        self.info = {
            "n_fit": len(texts),
            "n_features_seen": int(np.count_nonzero(df)),
            "n_kept": int(len(columns)),
            "explained_variance_ratio": round(float(svd.explained_variance_ratio_.sum()), 6),
        }
        logger.info("tfidf: fitted on %d texts, %d of %d hashed features kept, dim %d, "
                    "explained variance %.3f", len(texts), len(columns), self.info["n_features_seen"],
                    self.dim, self.info["explained_variance_ratio"])

    def _check_fitted(self) -> None:
        if self.projection is None:
            raise RuntimeError("tfidf embedder is not fitted: call fit() or load() first")

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        self._check_fitted()
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        x = self._tfidf.transform(self._select(self._counts(texts)))
        return l2_normalize(np.asarray(x @ self.projection, dtype=np.float32))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "token_pattern": TOKEN_PATTERN, "ngram_range": list(NGRAM_RANGE),
                "min_df": MIN_DF, **self.info}

    def save(self, path: str | Path) -> None:
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name, arr in (("columns", self.columns), ("idf", self.idf), ("projection", self.projection)):
            with atomic_path(path / f"{name}.npy") as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, arr, allow_pickle=False)
        atomic_write_json(path / META, {**self.describe(), "config": self.cfg.model_dump(mode="json")})

    @classmethod
    def _load(cls, path: Path, meta: dict[str, Any]) -> "TfidfEmbedder":
        emb = cls(EmbedConfig(**meta["config"]))
        arrays = {name: np.load(path / f"{name}.npy", allow_pickle=False)
                  for name in ("columns", "idf", "projection")}
        emb._set_fitted(arrays["columns"], arrays["idf"], arrays["projection"])
        emb.info = {k: meta[k] for k in ("n_fit", "n_features_seen", "n_kept",
                                         "explained_variance_ratio") if k in meta}
        return emb
