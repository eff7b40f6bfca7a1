"""Selection-quality benchmark: on the same token budget, does quadsel's selection train a
better model than the alternatives?

    python -m bench.quality --target gsm8k                 # one target, CPU preset (3 seeds)
    python -m bench.quality --target all                   # wikitext, gsm8k, linux
    python -m bench.quality --target all --preset gpu --device cuda

Methods (same budget, default 10% of the pool's tokens): random; topk (ekfac); cluster-topk
(ekfac); quad (ekfac); quad (grad-cos); random at 2x and 4x the budget (a data multiplier);
training on the target's own reference split (an in-domain point of comparison).

Protocol: the pool is embedded and clustered once as ``quadsel run`` does; per seed a proxy LM
is trained on a pool sample (never on reference or eval text) and scores pool rows for the
target's reference set; every selection trains a fresh small LM (same tokenizer, init, steps);
each LM is evaluated (loss, bits per byte) on the target's ``eval.jsonl`` and on the macro mix
of every target's eval set. Differences against random are paired by seed (t-interval).

Modules: :mod:`.config` (settings, presets), :mod:`.data` (pool, proxies, references),
:mod:`.scoring` (per-row score caches), :mod:`.select` (selectors and selection statistics),
:mod:`.train` (LM training and evaluation: the only reader of ``eval.jsonl``), :mod:`.runner`,
:mod:`.summary`, :mod:`.stats`, :mod:`.report`, :mod:`.markdown`.
"""
from .config import METHODS, PRESETS, QualityConfig, make_config
from .runner import load_summaries, run

__all__ = ["METHODS", "PRESETS", "QualityConfig", "load_summaries", "make_config", "run"]
