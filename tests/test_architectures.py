"""Architecture matrix: every gradient scorer agrees with exact computation on tiny models of
common transformers architectures (random init from configs, no downloads, CPU).

The reference is independent of the scorers' hook machinery: one plain ``loss.backward()`` per
example (per-example loss = SUM of its token losses, batch of one, no padding), with the tracked
layers' inputs ``x`` and output gradients ``δ`` captured by ordinary hooks. The per-example
gradient ``G = Σ_t δ_t x_tᵀ`` is checked against ``weight.grad`` (autograd); K-FAC/EK-FAC are
then built densely (``S ⊗ A``, or the eigenbasis with ``Λ = E[(Q_Sᵀ G Q_A)²]``) and inverted
with a dense damped solve.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from quadsel.influence import FeatureExtractor, find_layers, make_scorer
from quadsel.influence.layers import UntrackableLayersError, get_modules
from quadsel.influence.testing import ARCHITECTURES, random_texts, tiny_arch_influence_model

FIT = random_texts(6, seed=21, max_words=14) + ["x"]
REF = random_texts(4, seed=22, max_words=14)
CAND = random_texts(5, seed=23, max_words=14) + ["", "x"]

# layers tracked per architecture (Mixtral's experts are 3-D parameters: only attention is trackable)
LAYERS = {"mixtral": "attention"}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def case(request):
    """The model and the exact per-example reference of FIT/REF/CAND (all tracked layers, biases
    included: dropping a layer's last column gives its weight-only gradient)."""
    im = tiny_arch_influence_model(request.param, max_length=20, batch_size=3)
    layers = find_layers(im.model, LAYERS.get(request.param, "all"), include_bias=True)
    refs = {k: per_example_reference(im, layers, texts) for k, texts in (("fit", FIT), ("ref", REF), ("cand", CAND))}
    return im, layers, refs


def _layers_of(im):
    return LAYERS.get(im.model.config.model_type, "all")


def _reference_for(case, scorer_layers):
    """The cached reference restricted to ``scorer_layers`` (same names; biases dropped as needed)."""
    _, layers, refs = case
    pos = {t.name: i for i, t in enumerate(layers)}
    out = {}
    for key, per_text in refs.items():
        rows = []
        for ex in per_text:
            row = []
            for t in scorer_layers:
                x, d, g = ex[pos[t.name]]
                if layers[pos[t.name]].bias and not t.bias:
                    x, g = x[:, :-1], g[:, :-1]
                row.append((x, d, g))
            rows.append(row)
        out[key] = rows
    return out


def per_example_reference(im, layers, texts):
    """Per text and tracked layer: (x [T, in], δ [T, out]) from a plain backward, and G == autograd."""
    model = im.model
    mods = get_modules(model, layers)
    store: dict[int, dict] = {}
    handles = []

    def fwd(i):
        def hook(mod, inputs, output):
            x = inputs[0].detach()
            store[i] = {"x": x.reshape(-1, x.shape[-1]).double(), "out": output}
            output.retain_grad()
        return hook

    for i, mod in enumerate(mods):
        handles.append(mod.register_forward_hook(fwd(i)))
    out = []
    try:
        for ids in im.tokenize(texts):
            x = torch.tensor([ids])
            m = torch.ones_like(x)
            model.zero_grad(set_to_none=True)
            for p in model.parameters():
                p.requires_grad_(True)
            store.clear()
            loss = im.summed_loss(model(input_ids=x, attention_mask=m, use_cache=False).logits, x, m).sum()
            loss.backward()
            per_layer = []
            for i, (t, mod) in enumerate(zip(layers, mods)):
                xi = store[i]["x"]
                g_out = store[i]["out"].grad
                d = (torch.zeros(xi.shape[0], t.out_features, dtype=torch.float64) if g_out is None
                     else g_out.detach().reshape(-1, g_out.shape[-1]).double())
                if t.bias:
                    xi = torch.cat([xi, torch.ones(xi.shape[0], 1, dtype=torch.float64)], dim=1)
                g = d.T @ xi
                w = mod.weight.grad if mod.weight.grad is not None else torch.zeros_like(mod.weight)
                auto = (w if t.kind == "linear" else w.T).double()
                if t.bias:
                    b = mod.bias.grad if mod.bias.grad is not None else torch.zeros_like(mod.bias)
                    auto = torch.cat([auto, b.double()[:, None]], dim=1)
                assert torch.allclose(g, auto, atol=1e-5, rtol=1e-4), t.name
                per_layer.append((xi, d, g))
            out.append(per_layer)
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(False)
    return out


def _dense_inverse_products(ref, fit, cand, layers, kind, damping=0.1):
    """Σ_l <(H_l + λ_l)⁻¹ ḡ_ref,l, g_cand,l> with H_l dense (kfac: S⊗A; ekfac: eigen-corrected)."""
    n_tok = sum(ex[0][0].shape[0] for ex in fit)
    scores = np.zeros(len(cand))
    for li in range(len(layers)):
        A = sum(ex[li][0].T @ ex[li][0] for ex in fit) / n_tok
        S = sum(ex[li][1].T @ ex[li][1] for ex in fit) / n_tok
        if kind == "kfac":
            H = torch.kron(S, A)  # row-major vec([out, in])
            # kronfluence's relative damping: 0.1 x the mean Kronecker eigenvalue
            lam_mean = float(torch.linalg.eigvalsh(S).clamp_min(0).mean()
                             * torch.linalg.eigvalsh(A).clamp_min(0).mean())
        else:
            ea, qa = torch.linalg.eigh(A)
            es, qs = torch.linalg.eigh(S)
            lam = sum((qs.T @ ex[li][2] @ qa) ** 2 for ex in fit) / len(fit)
            q = torch.kron(qs, qa)  # eigenbasis of row-major vec([out, in])
            H = (q * lam.reshape(-1)) @ q.T
            lam_mean = float(lam.mean())
        lam_d = damping * lam_mean
        gbar = sum(ex[li][2] for ex in ref).reshape(-1) / len(ref)
        pre = torch.linalg.solve(H + lam_d * torch.eye(H.shape[0], dtype=H.dtype), gbar)
        for j, ex in enumerate(cand):
            scores[j] += float(pre @ ex[li][2].reshape(-1))
    return scores


def _close(got, want, rtol=2e-4):
    scale = np.abs(want).max()
    assert scale > 0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def test_exact_features_equal_autograd(case):
    im, layers, refs = case
    fe = FeatureExtractor(im, layers=LAYERS.get(im.model.config.model_type, "all"), projection_dim=None,
                          include_bias=True)
    assert [t.name for t in fe.layers] == [t.name for t in layers]
    feats = fe.compute(CAND + REF, batch_size=3)  # padded batches, an empty text
    want = np.stack([torch.cat([g.reshape(-1) for _, _, g in ex]).numpy() for ex in refs["cand"] + refs["ref"]])
    np.testing.assert_allclose(feats.values, want, atol=1e-5, rtol=1e-4)
    assert np.abs(want).max() > 1e-3


@pytest.mark.parametrize("name", ["grad-dot", "grad-cos"])
def test_first_order_scorers_equal_exact(case, name):
    im = case[0]
    sc = make_scorer(name, im, layers=_layers_of(im), batch_size=3).fit(FIT).set_reference(REF)
    got = sc.score(CAND)
    r = _reference_for(case, sc.layers)
    ref, cand = r["ref"], r["cand"]
    flat = lambda ex: torch.cat([g.reshape(-1) for _, _, g in ex])  # noqa: E731
    R = torch.stack([flat(ex) for ex in ref])
    C = torch.stack([flat(ex) for ex in cand])
    if name == "grad-dot":
        want = (C @ R.mean(0)).numpy()
    else:
        rn = R / R.norm(dim=1, keepdim=True)
        cn = C.norm(dim=1)
        want = torch.where(cn > 0, (C @ rn.mean(0)) / torch.where(cn > 0, cn, 1.0), 0.0).numpy()
    _close(got, want)


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_curvature_scorers_equal_dense_inverse(case, name):
    im = case[0]
    sc = make_scorer(name, im, layers=_layers_of(im), batch_size=3, damping=0.1).fit(FIT).set_reference(REF)
    got = sc.score(CAND)
    r = _reference_for(case, sc.layers)
    _close(got, _dense_inverse_products(r["ref"], r["fit"], r["cand"], sc.layers, name), rtol=2e-3)


def test_tracked_groups_cover_attention_and_mlp(case):
    im = case[0]
    mt = im.model.config.model_type
    att = find_layers(im.model, "attention")
    assert len(att) >= 2 * im.model.config.num_hidden_layers  # at least qkv (fused or not) + output
    if mt == "mixtral":
        with pytest.raises(UntrackableLayersError, match="experts.gate_up_proj"):
            find_layers(im.model, "mlp")
        with pytest.raises(UntrackableLayersError, match="layers='attention'"):
            make_scorer("grad-dot", im)
    else:
        mlp = find_layers(im.model, "mlp")
        assert len(mlp) >= 2 * im.model.config.num_hidden_layers
        assert len(find_layers(im.model, "all")) == len(att) + len(mlp)


# ---------------------------------------------------------------- the attention scorer
def _query_rows(site, head):
    """Output rows of the query projection of ``head`` (from each architecture's modeling code)."""
    d, h = site.head_dim, head
    if site.kind in ("split", "concat", "falcon_mq"):
        return site.module.q_proj if site.kind == "split" else site.value_module, slice(h * d, (h + 1) * d)
    if site.kind in ("headwise", "interleaved"):
        return site.value_module, slice(3 * h * d, 3 * h * d + d)
    raise AssertionError(site.kind)


def test_attention_scorer_masks_like_zeroed_queries(case, monkeypatch):
    """A head whose query is zero attends uniformly over the allowed positions (q·k = 0 for every
    key; rotary of zero is zero; no positional bias in the scores): the scorer's masked loss must
    equal the plain loss of a copy of the model with those query rows zeroed."""
    import copy

    im = case[0]
    if im.model.config.model_type == "bloom":
        # ALiBi adds a position bias to the scores, so a zero query would not attend uniformly:
        # compare with ALiBi switched off (the masking replaces head outputs, whatever the scores)
        import transformers.models.bloom.modeling_bloom as mb

        orig = mb.build_alibi_tensor
        monkeypatch.setattr(mb, "build_alibi_tensor", lambda *a, **k: torch.zeros_like(orig(*a, **k)))
    sc = make_scorer("attention", im, heads=[[0, 0], [1, 1]], batch_size=3)
    texts = CAND + REF + ["word " * 30]  # longer than gemma2's sliding window of 8
    base, masked = sc.losses(texts)
    np.testing.assert_allclose(base, im.per_example_loss(texts), rtol=1e-5, atol=1e-5)
    im2 = copy.copy(im)
    im2.model = copy.deepcopy(im.model)
    sites = {s.layer: s for s in __import__("quadsel.influence.attention_heads", fromlist=["x"])
             .find_attention_sites(im2.model)}
    with torch.no_grad():
        for layer, head in sc.heads:
            mod, rows = _query_rows(sites[layer], head)
            if isinstance(mod, torch.nn.Linear):
                mod.weight[rows] = 0
            else:  # GPT-2 Conv1D: weight [in, out]
                mod.weight[:, rows] = 0
            if getattr(mod, "bias", None) is not None:
                mod.bias[rows] = 0
    want = im2.per_example_loss(texts)
    np.testing.assert_allclose(masked, want, rtol=1e-5, atol=1e-5)
    assert np.abs(masked - base).max() > 1e-3


# ---------------------------------------------------------------- modules= (e.g. LoRA adapters)
class _LoraLinear(torch.nn.Module):
    """A peft-style LoRA wrapper (same module names as peft: base_layer, lora_A.default, lora_B.default)."""

    def __init__(self, base: torch.nn.Linear, r: int = 4, scaling: float = 2.0) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(r, base.out_features, bias=False)})
        torch.nn.init.normal_(self.lora_B["default"].weight, std=0.3)  # peft starts at 0; nonzero to test lora_A
        self.scaling = scaling

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x)) * self.scaling


@pytest.fixture(scope="module")
def lora_im():
    im = tiny_arch_influence_model("llama", max_length=20, batch_size=3, seed=3)
    torch.manual_seed(4)
    for layer in im.model.model.layers:
        layer.self_attn.q_proj = _LoraLinear(layer.self_attn.q_proj)
        layer.self_attn.v_proj = _LoraLinear(layer.self_attn.v_proj)
    return im


def test_modules_select_lora_adapters(lora_im):
    im = lora_im
    pats = [r".*\.lora_[AB]\.default"]
    layers = find_layers(im.model, modules=pats)
    names = [t.name for t in layers]
    assert len(names) == 2 * 2 * 2 and all(".lora_A.default" in n or ".lora_B.default" in n for n in names)
    assert {t.group for t in layers} == {"attention"}
    fe = FeatureExtractor(im, projection_dim=None, modules=pats)
    assert [t.name for t in fe.layers] == names
    feats = fe.compute(CAND + REF, batch_size=3)
    ref = per_example_reference(im, layers, CAND + REF)  # asserts G == autograd's lora weight.grad
    want = np.stack([torch.cat([g.reshape(-1) for _, _, g in ex]).numpy() for ex in ref])
    np.testing.assert_allclose(feats.values, want, atol=1e-5, rtol=1e-4)
    # scorers take the option; ekfac on the adapters only equals the dense inverse
    sc = make_scorer("ekfac", im, modules=pats, batch_size=3).fit(FIT).set_reference(REF)
    assert [t.name for t in sc.layers] == names
    fit, rr, cand = (per_example_reference(im, layers, t) for t in (FIT, REF, CAND))
    _close(sc.score(CAND), _dense_inverse_products(rr, fit, cand, layers, "ekfac"), rtol=2e-3)
    sc = make_scorer("grad-dot", im, modules=[r"model\.layers\.0\.self_attn\.v_proj\.lora_B\.default"])
    assert [t.name for t in sc.layers] == ["model.layers.0.self_attn.v_proj.lora_B.default"]


def test_modules_patterns_and_errors():
    im = tiny_arch_influence_model("llama", max_length=20)
    m = im.model
    got = [t.name for t in find_layers(m, modules=[r".*\.(q|v)_proj", "model.layers.1.mlp.down_proj"])]
    assert got == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                   "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
                   "model.layers.1.mlp.down_proj"]
    # a group still restricts; names match whole (a prefix is no match)
    assert [t.name for t in find_layers(m, "mlp", modules=[r"model\.layers\.1\..*"])] == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="match\\(es\\) no Linear"):
        find_layers(m, modules=["model.layers.0.self_attn"])
    with pytest.raises(ValueError, match="match\\(es\\) no Linear"):
        find_layers(m, modules=[r".*q_proj", r".*lora_A.*"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        find_layers(m, modules=["(unclosed"])
    with pytest.raises(ValueError, match="not both"):
        find_layers(m, ["model.layers.0.self_attn.q_proj"], modules=[".*"])
    with pytest.raises(ValueError, match="no module matches both"):
        find_layers(m, "mlp", modules=[r".*q_proj"])
    sc = make_scorer("grad-dot", im, modules=r".*o_proj")  # one string is one pattern
    assert [t.name for t in sc.layers] == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    # Mixtral: the experts are refused for "all" but modules= picks Linear layers knowingly
    mx = tiny_arch_influence_model("mixtral", max_length=20).model
    assert len(find_layers(mx, modules=[r".*self_attn\..*"])) == 8
    # the predictor forwards modules= to its base scorer
    pred = make_scorer("predictor", im, modules=[r".*o_proj"], base="grad-dot")
    assert [t.name for t in pred._make_base().layers] == [t.name for t in sc.layers]


# ---------------------------------------------------------------- check_compatible
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_check_compatible_from_config(model_type):
    from quadsel.influence.compat import check_compatible
    from quadsel.influence.testing import tiny_arch_config

    cfg = tiny_arch_config(model_type)  # built on the meta device: no weights
    for scorer in ("grad-dot", "grad-cos", "kfac", "ekfac", "datainf", "attention", "el2n", "vog", "predictor"):
        problems = check_compatible(cfg, scorer)
        if model_type == "mixtral" and scorer not in ("attention", "el2n", "vog"):
            assert len(problems) == 1 and "experts.gate_up_proj" in problems[0] and "layers='attention'" in problems[0]
            assert check_compatible(cfg, scorer, layers="attention") == []
        else:
            assert problems == [], (scorer, problems)
    assert "unknown" in check_compatible(cfg, "nope")[0]
    assert "match(es) no Linear" in check_compatible(cfg, "ekfac", modules=[r".*lora_A.*"])[0]


def test_check_compatible_model_dir_and_unsupported(tmp_path):
    from quadsel.influence.compat import check_compatible
    from quadsel.influence.testing import tiny_arch_config

    tiny_arch_config("gpt_bigcode").save_pretrained(tmp_path)  # config.json only
    assert check_compatible(tmp_path, "attention") == []
    assert check_compatible(str(tmp_path), "ekfac", layers="mlp") == []
    assert "cannot build" in check_compatible(tmp_path / "missing", "ekfac")[0]
    # BLOOM with slow_but_exact tensor-parallel slicing bypasses its dense module: refused up front
    problems = check_compatible(tiny_arch_config("bloom", pretraining_tp=2, slow_but_exact=True), "attention")
    assert len(problems) == 1 and "slow_but_exact" in problems[0]


def test_datainf_equals_sherman_morrison(case):
    """DataInf: w_l = (1/(nλ_l)) Σ_i (v − (g_iᵀv)/(λ_l + ‖g_i‖²) g_i), v = ḡ_ref, λ_l = 0.1·mean‖g_i‖²/d_l."""
    im = case[0]
    sc = make_scorer("datainf", im, layers=_layers_of(im), batch_size=3).fit(FIT).set_reference(REF)
    got = sc.score(CAND)
    r = _reference_for(case, sc.layers)
    want = np.zeros(len(CAND))
    for li, (t, lam) in enumerate(zip(sc.layers, sc.lambdas)):
        g = torch.stack([ex[li][2].reshape(-1) for ex in r["fit"]])
        v = torch.stack([ex[li][2].reshape(-1) for ex in r["ref"]]).mean(0)
        assert lam == pytest.approx(0.1 * float((g * g).sum(1).mean()) / t.numel, rel=1e-5)
        n = g.shape[0]
        w = (n * v - ((g @ v) / (lam + (g * g).sum(1))) @ g) / (n * lam)
        want += np.array([float(ex[li][2].reshape(-1) @ w) for ex in r["cand"]])
    _close(got, want, rtol=1e-4)
