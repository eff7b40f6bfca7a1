"""Selection-quality benchmark: on the same token budget, does quadsel's selection train a
better model than the alternatives?

    python -m bench.quality --target gsm8k                 # one target, CPU preset (3 seeds)
    python -m bench.quality --target linux-ood             # leave-domain-out: the pool without c_code
    python -m bench.quality --target all                   # wikitext, gsm8k, linux and their -ood variants
    python -m bench.quality --target all --preset gpu --device cuda

Methods (same budget, default 10% of the pool's tokens): random; random at 2x and 4x the budget
(a data multiplier); topk (ekfac); cluster-topk (ekfac); quad (ekfac); DSIR (the official
``data-selection`` package, :mod:`.dsir`). Opt-in: quad (grad-cos), the other scorers, and
training on the target's own reference split (an in-domain point of comparison).

Protocol: the pool is embedded and clustered once as ``quadsel run`` does; per seed a proxy LM
is trained on a pool sample (never on reference or eval text) and scores pool rows for the
target's reference set; every selection trains a fresh small LM (same tokenizer, init, steps);
each LM is evaluated (loss, bits per byte) on the target's ``eval.jsonl`` and on the macro mix
of every target's eval set. A second, training-free evaluator (:mod:`.ngram`, a byte-level
5-gram LM fitted on each selection's raw bytes) reports bits per byte on the same eval texts;
a verdict counts only where both agree. Differences against random are paired by seed
(t-interval); the setup is valid for a target / evaluator only where random-2x beats random-1x.
``<target>-ood`` runs the same target on a pool without the target's own domain.

Modules: :mod:`.config` (settings, presets), :mod:`.data` (pool, proxies, references),
:mod:`.scoring` (per-row score caches), :mod:`.select` (selectors and selection statistics),
:mod:`.train` (LM training and evaluation: with :mod:`.ngram`, the only readers of ``eval.jsonl``
texts), :mod:`.dsir`, :mod:`.runner`,
:mod:`.summary`, :mod:`.stats`, :mod:`.report`, :mod:`.markdown`.
"""
from .config import METHODS, PRESETS, QualityConfig, make_config
from .runner import load_summaries, run

__all__ = ["METHODS", "PRESETS", "QualityConfig", "load_summaries", "make_config", "run"]
