"""Configuration of the selectors (pydantic models: validated, serialisable, frozen).

Quad's own settings (ICLR 2025, arXiv 2409.16986, and its released selection script) on
SlimPajama: about 600M documents in 9,873 clusters (10,000 k-means clusters, BGE embeddings),
50 clusters pulled per iteration, 10 probed documents per pull, 20,000 documents taken per
accepted pull, neighbour threshold gamma = 0.2 (cosine distance), at most 200 iterations,
stopping at 10M documents (~30B tokens). Its alpha = 1e-4 and tau = 0.002 are in raw
influence units; here rewards are normalised (see ``selection.bandit``), so alpha and tau are in
standard deviations of the score distribution and have their own defaults.

``QuadConfig.scaled`` keeps Quad's proportions for pools of any size:

- score_budget = 0.1: the bandit scores at most 10% of the pool's rows; a round that would
                pass that is not run, and the rest of the budget is filled in cluster-score order
                (Quad scores ~0.02%: 200 rounds x 50 pulls x 10 probes of 600M rows)
- probe_size  = min(10, max(1, avg_cluster // 8), score_budget * n_rows // (3 * n_clusters)),
                at least 1: one exploration pass over every cluster costs at most a third of
                the scoring budget; the rest is left for the pulls that take data (Quad: 10)
- take_size   = clamp(round(budget_rows / 500), 4 * probe0, avg_cluster // 3), with
                probe0 = min(10, max(1, avg_cluster // 8)) (the probe without the scoring
                budget), and never below probe_size                     (Quad: 10M / 500 = 20,000)
- arms_per_round = clamp(ceil(n_clusters / 200), min(8, n_clusters), n_clusters)
                                                                (Quad: ceil(9873 / 200) = 50)
- max_rounds  = max(200, ceil(n_clusters / arms) + ceil(4 * budget_rows / take / arms))
                                                                (Quad: 200)
- patience    = max(3, ceil(n_clusters / arms)): after as many rejected pulls as there are
                clusters (once all are known), stop probing and fill     (Quad: none)

``budget_rows`` is the budget in examples (a token budget is divided by the mean row length).

**Allocation** (``allocation="softmax"``, the default; ``"greedy"`` is Quad's own rule). Quad's
greedy rule lets every accepted pull take a whole window, so a selection piles onto the few
clusters with the best score; where the pool holds little of the reference's domain that loses
to a random sample, and it always costs breadth. With softmax each cluster ``c`` has a share of
the budget

    share_c = cap_c * exp(q_c / T) / sum_j cap_j * exp(q_j / T)    (capped at cap_c, water-filled)

where ``cap_c`` is what the cluster holds (in budget units) and ``q_c`` its mean z-score shrunk
towards the typical cluster by empirical Bayes: ``q_c = z_c * n_c / (n_c + kappa)``, with ``n_c``
the (neighbour-weighted) probe scores it received and ``kappa = within / between`` variance of the
exploration probes. This is the allocation that maximises ``E_share[q] - T * KL(share || pool)``:
influence tilts the selection, divergence from the pool's own mix costs ``T`` per nat. Scores that
do not separate clusters (between-cluster variance ~ 0) give ``q = 0`` everywhere and a sample
stratified by cluster, i.e. a random sample; scores that do tilt it by ``e`` per ``T`` sigma.
The bandit is unchanged otherwise: unknown clusters first, then CS (UCB, shared with
neighbours) decides which clusters are pulled, but only among clusters with room in their share;
an accepted pull takes its probed rows best first, then the next members, up to ``take_size``
and the room left in its share; the fill gives every cluster its room (scaled down together if
early takes used more), best CS first, probed rows by score first, then by CS.

- temperature T = 1 (sigma units of the exploration probes; not tuned on any benchmark: one
                 sigma of a typical cluster's spread buys one nat of divergence)
- crumb_tolerance = 0.001: once what is left of the budget is at most 0.1% of it, the bandit
                 stops scoring and fills (a token budget a few tokens short of a natural stop
                 must not send it probing for them)
"""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .types import Budget

# Quad's released values, for reference and for the scaling rule.
QUAD_PAPER = {
    "n_rows": 600_000_000,
    "n_clusters": 9873,
    "arms_per_round": 50,
    "probe_size": 10,
    "take_size": 20_000,
    "gamma": 0.2,
    "alpha_raw": 1e-4,
    "tau_raw": 0.002,
    "max_rounds": 200,
    "budget_examples": 10_000_000,
}
_PULLS_PER_BUDGET = QUAD_PAPER["budget_examples"] // QUAD_PAPER["take_size"]  # 500
DEFAULT_SCORE_BUDGET = 0.1  # share of the pool QuadConfig.scaled lets the bandit score


class QuadConfig(BaseModel):
    """Every constant of Quad's cluster bandit (see ``selection.bandit`` for their meaning)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arms_per_round: int = Field(50, ge=1, description="clusters pulled per round")
    probe_size: int = Field(10, ge=1, description="members scored per pull")
    take_size: int = Field(
        20_000, ge=1, description="members taken per accepted pull (probes included)"
    )
    alpha: float = Field(0.1, ge=0.0, allow_inf_nan=False, description="exploration weight of the UCB bonus")
    tau: float = Field(0.5, allow_inf_nan=False, description="reward = mean normalised probe score - tau")
    gamma: float = Field(0.2, gt=0.0, le=2.0, description="neighbour radius (cosine distance)")
    normalize: Literal["zscore", "none"] = Field(
        "zscore", description="zscore: against the exploration probes; none: raw scores"
    )
    exclude_negative: bool = Field(
        False, description="leave out probed members whose own reward (z - tau) is negative"
    )
    max_rounds: int | None = Field(200, ge=1, description="rounds before falling back to fill")
    patience: int | None = Field(
        None,
        ge=1,
        description="give up (and fill) after this many rounds in a row without an accepted "
        "pull, counted once no unknown cluster is left; None: only max_rounds / exhaustion",
    )
    score_budget: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="share of the pool's rows the bandit may score; a round that would pass it is "
        "not run and the rest of the budget is filled (None: no limit)",
    )
    fill: bool = Field(True, description="fill what is left of the budget (by share, then cluster score)")
    allocation: Literal["softmax", "greedy"] = Field(
        "softmax",
        description="softmax: every cluster's share of the budget is capped at size * exp(q / "
        "temperature), normalised (q: its shrunken mean z); greedy: Quad's rule, accepted pulls "
        "take whole windows and the fill goes by cluster score",
    )
    temperature: float = Field(
        1.0, gt=0.0, allow_inf_nan=False,
        description="softmax allocation: sigma units of mean score that multiply a cluster's "
        "share per row by e (the price of one nat of divergence from the pool's own mix)",
    )
    crumb_tolerance: float = Field(
        0.001, ge=0.0, lt=1.0, allow_inf_nan=False,
        description="stop scoring once what is left of the budget is at most this share of it "
        "(the rest is filled unscored)",
    )
    history_top: int = Field(10, ge=0, description="clusters kept in each round's CS snapshot")

    @model_validator(mode="after")
    def _check(self) -> "QuadConfig":
        if self.take_size < self.probe_size:
            raise ValueError(
                f"take_size ({self.take_size}) must be >= probe_size ({self.probe_size}): "
                "a take includes the probed members"
            )
        return self

    @classmethod
    def scaled(
        cls,
        n_rows: int,
        n_clusters: int,
        budget: Budget,
        *,
        mean_tokens: float | None = None,
        **overrides: Any,
    ) -> "QuadConfig":
        """Quad's settings scaled to a pool of ``n_rows`` rows in ``n_clusters`` clusters."""
        if n_rows < 0 or n_clusters < 1:
            raise ValueError(
                f"scaled() needs n_rows >= 0 and n_clusters >= 1, got {n_rows}, {n_clusters}"
            )
        if budget.unit == "tokens":
            if not mean_tokens or mean_tokens <= 0:
                raise ValueError("QuadConfig.scaled with a token budget needs mean_tokens > 0")
            budget_rows = budget.amount / float(mean_tokens)
        else:
            budget_rows = float(budget.amount)
        avg = n_rows / n_clusters
        score_budget = overrides.get("score_budget", DEFAULT_SCORE_BUDGET)
        probe0 = int(min(QUAD_PAPER["probe_size"], max(1, avg // 8)))
        probe = probe0
        if score_budget is not None:  # one exploration pass: at most a third of the scoring budget
            probe = int(max(1, min(probe0, (score_budget * n_rows) // (3 * n_clusters))))
        take = int(round(budget_rows / _PULLS_PER_BUDGET))
        take = min(max(take, 4 * probe0), max(probe0, int(avg // 3)))
        take = max(take, probe)
        arms = min(n_clusters, max(min(8, n_clusters), math.ceil(n_clusters / 200)))
        needed_pulls = math.ceil(budget_rows / take) if take else 0
        max_rounds = max(
            QUAD_PAPER["max_rounds"],
            math.ceil(n_clusters / arms) + math.ceil(4 * needed_pulls / arms),
        )
        values: dict[str, Any] = {
            "arms_per_round": arms,
            "probe_size": probe,
            "take_size": take,
            "max_rounds": max_rounds,
            "patience": max(3, math.ceil(n_clusters / arms)),
            "score_budget": score_budget,
        }
        values.update(overrides)
        return cls.model_validate(values)


class BaselineConfig(BaseModel):
    """Settings of the baselines that score the whole pool (topk, cluster-topk)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chunk_size: int = Field(1024, ge=1, description="rows per probe")
    chunks_per_round: int = Field(
        4, ge=1, description="probes per round (one checkpoint per round)"
    )
