"""EK-FAC scores against kronfluence (an independent implementation), tiny models on CPU.

Conventions matched (read from kronfluence 1.0.1's source):
- covariances A, S are divided by the number of non-padding tokens (attention-mask sum), Λ by the
  number of examples; the loss of an example is the SUM of its token losses;
- ``ScoreArguments.damping_factor`` is ABSOLUTE, added to Λ (``None`` = 0.1 × mean(Λ) per layer,
  i.e. our ``damping_mode="relative", damping=0.1``);
- bias: a tracked module with a bias gets a column of ones (our ``include_bias=True``);
- pairwise scores are ``<H⁻¹ g_query, g_train>`` per (query, train) pair; Quad's score is their
  mean over the reference (query) set.
kronfluence wraps ``nn.Linear`` only, so GPT-2's Conv1D layers are converted to Linear on its copy.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

kronfluence = pytest.importorskip("kronfluence")

from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.task import Task  # noqa: E402

from quadsel.influence import make_scorer  # noqa: E402
from quadsel.influence.testing import random_texts, tiny_influence_model  # noqa: E402


class _LMTask(Task):
    def __init__(self, modules):
        self.modules = modules

    def _loss(self, batch, model):
        from quadsel.influence.model import InfluenceModel

        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return InfluenceModel.summed_loss(logits, batch["input_ids"], batch["attention_mask"]).sum()

    def compute_train_loss(self, batch, model, sample=False):
        assert not sample  # empirical Fisher only
        return self._loss(batch, model)

    def compute_measurement(self, batch, model):
        return self._loss(batch, model)

    def get_influence_tracked_modules(self):
        return self.modules

    def get_attention_mask(self, batch):
        return batch["attention_mask"]


def _dataset(im, texts, length):
    rows = []
    for ids in im.tokenize(texts):
        x = torch.full((length,), im._fill_id, dtype=torch.long)
        m = torch.zeros(length, dtype=torch.long)
        x[:len(ids)] = torch.tensor(ids)
        m[:len(ids)] = 1
        rows.append({"input_ids": x, "attention_mask": m})
    return rows


def _conv1d_to_linear(model):
    from transformers.pytorch_utils import Conv1D

    for _name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, Conv1D):
                lin = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1], bias=True)
                lin.weight.data = child.weight.data.T.contiguous()
                lin.bias.data = child.bias.data.clone()
                setattr(mod, cname, lin)
    return model


def kronfluence_mean_scores(im, layers, fit, ref, cand, damping, tmp_path, strategy="ekfac"):
    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    task = _LMTask([t.name for t in layers])
    model = _conv1d_to_linear(copy.deepcopy(im.model))
    model = prepare_model(model, task)
    an = Analyzer(analysis_name="cmp", model=model, task=task, cpu=True, disable_tqdm=True,
                  output_dir=str(tmp_path))
    L = im.max_length
    fargs = FactorArguments(strategy=strategy, use_empirical_fisher=True, amp_dtype=None,
                            activation_covariance_dtype=torch.float32, gradient_covariance_dtype=torch.float32,
                            per_sample_gradient_dtype=torch.float32, lambda_dtype=torch.float32)
    an.fit_all_factors(factors_name="f", dataset=_dataset(im, fit, L), per_device_batch_size=4,
                       factor_args=fargs, overwrite_output_dir=True)
    sargs = ScoreArguments(damping_factor=damping, amp_dtype=None, per_sample_gradient_dtype=torch.float32,
                           precondition_dtype=torch.float32, score_dtype=torch.float32)
    an.compute_pairwise_scores(scores_name="s", factors_name="f", query_dataset=_dataset(im, ref, L),
                               train_dataset=_dataset(im, cand, L), per_device_query_batch_size=4,
                               per_device_train_batch_size=4, score_args=sargs, overwrite_output_dir=True)
    scores = an.load_pairwise_scores("s")["all_modules"]  # [n_query, n_train]
    return scores.double().mean(0).numpy()


@pytest.fixture(scope="module")
def data():
    return random_texts(40, seed=21), random_texts(6, seed=22, min_words=4), random_texts(40, seed=23)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ekfac_agrees_with_kronfluence(arch, data, tmp_path):
    fit, ref, cand = data
    im = tiny_influence_model(arch, max_length=24, batch_size=4)
    bias = arch == "gpt2"
    for kron_damping, ours in ((1e-3, dict(damping=1e-3, damping_mode="absolute")),
                               (None, dict(damping=0.1, damping_mode="relative"))):
        exact = make_scorer("ekfac", im, include_bias=bias, **ours)  # default: exact fast path
        assert exact.layout.exact
        exact.fit(fit).set_reference(ref)
        s_exact = exact.score(cand)
        s_kron = kronfluence_mean_scores(im, exact.layers, fit, ref, cand, kron_damping,
                                         tmp_path / str(kron_damping))
        rho = spearmanr(s_exact, s_kron).statistic
        assert rho >= 0.98, (kron_damping, rho)
        # same conventions -> same numbers, not only the same ranking
        np.testing.assert_allclose(s_exact, s_kron, rtol=0.02, atol=0.02 * np.abs(s_kron).max())

        # the cheap fast path: a rank-16 reference per layer
        low = make_scorer("ekfac", im, include_bias=bias, rank=16, **ours)
        low.curvature, low.is_fitted = exact.curvature, True
        rho_r = spearmanr(low.set_reference(ref).score(cand), s_kron).statistic
        assert rho_r >= 0.9, (kron_damping, rho_r)

        # a random factored projection of the PRECONDITIONED reference is unbiased but noisy
        # (measured rho 0.6-0.8 here); it keeps the signal, nothing more is claimed
        proj = make_scorer("ekfac", im, include_bias=bias, projection_dim=8192, **ours)
        proj.curvature, proj.is_fitted = exact.curvature, True
        assert not proj.layout.exact
        rho_p = spearmanr(proj.set_reference(ref).score(cand), s_kron).statistic
        assert rho_p >= 0.4, (kron_damping, rho_p)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_projected_grad_dot_agrees_with_kronfluence_identity(arch, data, tmp_path):
    """LESS/TracIn-style features at the default feature dimension (8192) vs kronfluence's
    identity strategy (plain gradient inner products)."""
    fit, ref, cand = data
    im = tiny_influence_model(arch, max_length=24, batch_size=4)
    bias = arch == "gpt2"
    exact = make_scorer("grad-dot", im, include_bias=bias).set_reference(ref)
    s_kron = kronfluence_mean_scores(im, exact.layers, fit[:4], ref, cand, 0.0, tmp_path, strategy="identity")
    np.testing.assert_allclose(exact.score(cand), s_kron, rtol=0.02, atol=0.02 * np.abs(s_kron).max())
    proj = make_scorer("grad-dot", im, include_bias=bias, projection_dim=8192).set_reference(ref)
    assert not proj.layout.exact
    assert spearmanr(proj.score(cand), s_kron).statistic >= 0.9
