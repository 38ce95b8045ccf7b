"""DataWeights, LossWeights and LoraRegularization: values, gradients, torch.func compatibility, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call, grad, jvp, vmap

from hf_integration import (CombinedWeights, DataWeights, LoraRegularization, LossWeights, OuterModule, SourceWeights,
                            find_lora_modules, parse_layer_index)

PREFIX = "base_model.model.model.layers"
EXPECTED_MODULES = [
    f"{PREFIX}.0.self_attn.q_proj",
    f"{PREFIX}.0.self_attn.v_proj",
    f"{PREFIX}.1.self_attn.q_proj",
    f"{PREFIX}.1.self_attn.v_proj",
]


def _inner(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------ DataWeights


@pytest.fixture
def data_weights() -> DataWeights:
    torch.manual_seed(0)
    dw = DataWeights(10)
    with torch.no_grad():
        dw.logits.normal_()
    return dw


def test_data_weights_forward_is_normalized_weighted_mean(data_weights):
    ids = torch.tensor([3, 7, 0, 3, 9])  # duplicates allowed
    losses = torch.rand(5)
    out = data_weights(losses, {"example_id": ids}, {})
    w = torch.sigmoid(data_weights.logits.detach())[ids]
    manual = (w * losses).sum() / w.sum()
    torch.testing.assert_close(out, manual)
    assert out.dim() == 0


def test_data_weights_init_zero_gives_plain_mean():
    dw = DataWeights(4)
    losses = torch.tensor([1.0, 2.0, 3.0, 6.0])
    torch.testing.assert_close(dw(losses, {"example_id": torch.arange(4)}, {}), losses.mean())
    torch.testing.assert_close(dw.weights(), torch.full((4,), 0.5))


def test_data_weights_grad_via_functional_call_matches_manual(data_weights):
    ids = torch.tensor([1, 4, 4, 8])
    losses = torch.tensor([0.5, 2.0, 1.0, 3.0])
    batch = {"example_id": ids}
    params = {"logits": data_weights.logits.detach().clone()}

    g = grad(lambda p: functional_call(data_weights, p, (losses, batch, {})))(params)["logits"]

    # Manual: L = sum_j w_j l_j / W, dL/dw_j = (l_j - L) / W, dw/ds = w (1 - w), summed over duplicate ids.
    w = torch.sigmoid(params["logits"][ids])
    total = (w * losses).sum() / w.sum()
    per_row = (losses - total) / w.sum() * w * (1 - w)
    manual = torch.zeros(10).index_add_(0, ids, per_row)
    torch.testing.assert_close(g, manual)
    # Examples not in the batch get no gradient.
    assert torch.all(g[[0, 2, 3, 5, 6, 7, 9]] == 0)


def test_data_weights_under_jvp_and_vmap(data_weights):
    """Tangents over losses (as when the per-example losses depend on inner params) batched with vmap."""
    ids = torch.tensor([0, 5, 2])
    losses = torch.rand(3)
    params = dict(data_weights.named_parameters())
    fn = lambda l: functional_call(data_weights, params, (l, {"example_id": ids}, {}))  # noqa: E731
    tangents = torch.eye(3)
    _, out = vmap(lambda t: jvp(fn, (losses,), (t,)))(tangents)
    w = torch.sigmoid(data_weights.logits.detach()[ids])
    torch.testing.assert_close(out, w / w.sum())


def test_data_weights_accepts_column_vector_ids(data_weights):
    losses = torch.rand(3)
    a = data_weights(losses, {"example_id": torch.tensor([[1], [2], [3]])}, {})
    b = data_weights(losses, {"example_id": torch.tensor([1, 2, 3])}, {})
    torch.testing.assert_close(a, b)


def test_data_weights_custom_id_column():
    dw = DataWeights(3, id_column="idx")
    dw(torch.ones(2), {"idx": torch.tensor([0, 2])}, {})
    with pytest.raises(KeyError, match="'idx'"):
        dw(torch.ones(2), {"example_id": torch.tensor([0, 2])}, {})


def test_data_weights_errors(data_weights):
    losses = torch.rand(2)
    with pytest.raises(KeyError, match="add_example_ids"):
        data_weights(losses, {"input_ids": torch.zeros(2, 3, dtype=torch.long)}, {})
    with pytest.raises(IndexError, match="out of range.*num_examples=10"):
        data_weights(losses, {"example_id": torch.tensor([1, 10])}, {})
    with pytest.raises(IndexError, match="-1"):
        data_weights(losses, {"example_id": torch.tensor([-1, 2])}, {})
    with pytest.raises(TypeError, match="integer"):
        data_weights(losses, {"example_id": torch.tensor([1.0, 2.0])}, {})
    with pytest.raises(ValueError, match="3 ids but per_example_loss has 2"):
        data_weights(losses, {"example_id": torch.tensor([1, 2, 3])}, {})
    with pytest.raises(ValueError, match="batch_size"):
        data_weights(torch.rand(2, 4), {"example_id": torch.tensor([1, 2])}, {})
    with pytest.raises(ValueError):
        DataWeights(0)


def test_data_weights_summary_stats_and_config(data_weights):
    stats = data_weights.summary_stats()
    w = torch.sigmoid(data_weights.logits.detach())
    assert stats["weight_mean"] == pytest.approx(float(w.mean()))
    assert stats["weight_min"] == pytest.approx(float(w.min()))
    assert stats["weight_max"] == pytest.approx(float(w.max()))
    assert all(isinstance(v, float) for v in stats.values())
    assert data_weights.config_dict() == {"kind": "data_weights", "num_examples": 10, "id_column": "example_id",
                                          "init": 0.0}
    assert isinstance(data_weights, OuterModule) and DataWeights.kind == "data_weights"
    assert [n for n, _ in data_weights.named_parameters()] == ["logits"]


# ------------------------------------------------------------------------------------ LoraRegularization


def test_find_lora_modules_on_peft_model(tiny_lora_llama):
    modules, adapter = find_lora_modules(tiny_lora_llama.named_parameters())
    assert modules == EXPECTED_MODULES
    assert adapter == "default"


def test_lora_regularization_module_granularity(tiny_lora_llama):
    reg = LoraRegularization.from_peft_model(tiny_lora_llama, granularity="module")
    assert reg.module_names == EXPECTED_MODULES
    assert reg.group_names == EXPECTED_MODULES
    assert reg.log_strength.shape == (4,)
    assert reg.adapter_name == "default"


def test_lora_regularization_layer_granularity(tiny_lora_llama):
    reg = LoraRegularization.from_peft_model(tiny_lora_llama, granularity="layer")
    assert reg.module_names == EXPECTED_MODULES
    assert reg.group_names == ["layer.0", "layer.1"]
    assert reg.group_index == [0, 0, 1, 1]
    assert reg.log_strength.shape == (2,)
    glob = LoraRegularization.from_peft_model(tiny_lora_llama, granularity="global")
    assert glob.log_strength.shape == (1,)


def test_parse_layer_index():
    assert parse_layer_index(f"{PREFIX}.3.self_attn.q_proj") == 3
    assert parse_layer_index("base_model.model.transformer.h.11.attn.c_attn") == 11
    assert parse_layer_index("bert.encoder.layer.7.attention.self.query") == 7
    assert parse_layer_index("model.layers.12") == 12
    with pytest.raises(ValueError, match="granularity='module'"):
        parse_layer_index("base_model.model.lm_head")


@pytest.mark.parametrize("granularity", ["module", "layer"])
def test_lora_penalty_equals_manual_sum(tiny_lora_llama, granularity):
    reg = LoraRegularization.from_peft_model(tiny_lora_llama, granularity=granularity)
    torch.manual_seed(1)
    with torch.no_grad():
        reg.log_strength.normal_()
    inner = _inner(tiny_lora_llama)
    losses = torch.rand(3)

    manual = losses.mean()
    for k, m in enumerate(EXPECTED_MODULES):
        group = k if granularity == "module" else int(m.split(".layers.")[1].split(".")[0])
        a = inner[f"{m}.lora_A.default.weight"]
        b = inner[f"{m}.lora_B.default.weight"]
        manual = manual + 0.5 * math.exp(float(reg.log_strength.detach()[group])) * (a.pow(2).sum() + b.pow(2).sum())
    out = functional_call(reg, dict(reg.named_parameters()), (losses, {}, inner))
    torch.testing.assert_close(out, manual)
    torch.testing.assert_close(reg.strengths(), reg.log_strength.exp())
    assert float(reg.penalty(inner).detach()) > 0


def test_lora_hvp_under_vmap_jvp_grad(tiny_lora_llama):
    """The inner Hessian of the penalty is exp(s_g) * I: check an HVP built with vmap(jvp(grad(...)))."""
    reg = LoraRegularization.from_peft_model(tiny_lora_llama, granularity="layer")
    with torch.no_grad():
        reg.log_strength.copy_(torch.tensor([-1.0, 0.5]))
    outer = dict(reg.named_parameters())
    inner = _inner(tiny_lora_llama)
    losses = torch.zeros(2)

    def inner_obj(p):
        return functional_call(reg, outer, (losses, {}, p))

    def hvp(v):
        return jvp(grad(inner_obj), (inner,), (v,))[1]

    torch.manual_seed(0)
    tangents = {k: torch.randn(3, *t.shape) for k, t in inner.items()}
    out = vmap(hvp)(tangents)
    for k, v in tangents.items():
        layer = int(k.split(".layers.")[1].split(".")[0])
        torch.testing.assert_close(out[k], math.exp(float(reg.log_strength.detach()[layer])) * v)


def test_lora_outer_gradient_through_real_model(tiny_lora_llama):
    """End to end: per-example LM losses from the PEFT model, gradient of the inner objective w.r.t. log_strength."""
    reg = LoraRegularization.from_peft_model(tiny_lora_llama)
    inner = _inner(tiny_lora_llama)
    input_ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    logits = tiny_lora_llama(input_ids=input_ids).logits
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 128), input_ids[:, 1:].reshape(-1), reduction="none"
    ).view(2, -1)
    losses = per_token.mean(1).detach()
    g = grad(lambda p: functional_call(reg, p, (losses, {}, inner)))(dict(reg.named_parameters()))["log_strength"]
    expected = 0.5 * reg.strengths().detach() * reg.squared_norms(inner)
    torch.testing.assert_close(g, expected)


def test_lora_regularization_errors(tiny_lora_llama):
    from transformers import LlamaConfig, LlamaForCausalLM

    plain = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    with pytest.raises(ValueError, match="no trainable LoRA parameters"):
        LoraRegularization.from_peft_model(plain)
    with pytest.raises(ValueError, match="adapters found"):
        LoraRegularization.from_peft_model(tiny_lora_llama, adapter_name="other")
    with pytest.raises(ValueError, match="granularity"):
        LoraRegularization(EXPECTED_MODULES, granularity="row")
    with pytest.raises(ValueError, match="empty"):
        LoraRegularization([])
    # a LoRA module outside the transformer layers (here a head) is a layer group of its own
    head = LoraRegularization(["m.layers.1.q", "m.lm_head", "m.layers.0.q", "m.layers.1.v"], granularity="layer")
    assert head.group_names == ["layer.0", "layer.1", "m.lm_head"] and head.group_index == [1, 2, 0, 1]

    reg = LoraRegularization.from_peft_model(tiny_lora_llama)
    inner = {f"module.{k}": v for k, v in _inner(tiny_lora_llama).items()}  # e.g. a DDP-wrapped naming
    with pytest.raises(KeyError, match="not found among inner_params"):
        reg(torch.rand(2), {}, inner)


def test_lora_summary_stats_and_config(tiny_lora_llama):
    reg = LoraRegularization.from_peft_model(tiny_lora_llama, granularity="layer", init_log_strength=math.log(0.1))
    stats = reg.summary_stats()
    assert stats["strength_mean"] == pytest.approx(0.1)
    assert stats["strength[layer.0]"] == pytest.approx(0.1)
    cfg = reg.config_dict()
    assert cfg["kind"] == "lora_regularization"
    assert cfg["module_names"] == EXPECTED_MODULES
    assert cfg["granularity"] == "layer" and cfg["group_names"] == ["layer.0", "layer.1"]


# ------------------------------------------------------------------------------------------- LossWeights
def test_loss_weights_forward_and_stop_gradient():
    weights = LossWeights(init_loss_scale=2.0).double()
    losses = torch.tensor([0.1, 0.7, 2.0, 3.5], dtype=torch.float64, requires_grad=True)
    w = torch.sigmoid(-2.0 * losses.detach())
    out = weights(losses, {}, {})
    torch.testing.assert_close(out, (w * losses.detach()).sum() / w.sum())
    torch.testing.assert_close(weights.weights_for(losses), w)
    # no gradient flows through the losses inside the weights: d out / d l_i = w_i / sum_j w_j exactly
    (grad,) = torch.autograd.grad(out, losses)
    torch.testing.assert_close(grad, w / w.sum())
    # the outer gradient: d out / d s = sum_i (dw_i/ds) (l_i - out) / sum_j w_j, with dw_i/ds = -w_i (1 - w_i) l_i,
    # times d s / d raw = sigmoid(raw) for s = softplus(raw)
    (g_raw,) = torch.autograd.grad(weights(losses, {}, {}), weights.loss_scale_raw)
    l = losses.detach()
    expected = (-w * (1 - w) * l * (l - out.detach())).sum() / w.sum() * torch.sigmoid(weights.loss_scale_raw.detach())
    torch.testing.assert_close(g_raw, expected)
    assert float(weights.loss_scale.detach()) == pytest.approx(2.0)
    assert LossWeights(init_loss_scale=1e-8)(torch.tensor([1.0, 3.0]), {}, {}).item() == pytest.approx(2.0)  # ~mean


def test_loss_weights_under_functional_call_jvp_and_vmap():
    weights = LossWeights()
    params = {"loss_scale_raw": torch.tensor(math.log(math.expm1(1.5)))}
    losses = torch.tensor([0.5, 1.0, 2.0])

    def objective(p, l):
        return functional_call(weights, p, (l, {}, {}))

    grads = grad(objective)(params, losses)
    assert set(grads) == {"loss_scale_raw"} and grads["loss_scale_raw"] < 0  # raising the scale lowers the loss
    tangents = torch.eye(3)
    jvps = vmap(lambda t: jvp(lambda l: objective(params, l), (losses,), (t,))[1])(tangents)
    w = torch.sigmoid(-1.5 * losses)
    torch.testing.assert_close(jvps, w / w.sum())


def test_loss_weights_errors_stats_and_config():
    for bad in (float("nan"), 0.0, -0.5):
        with pytest.raises(ValueError, match="init_loss_scale must be a finite number > 0"):
            LossWeights(init_loss_scale=bad)
    with pytest.raises(ValueError, match=r"per_example_loss must have shape \(batch_size,\)"):
        LossWeights()(torch.zeros(2, 3), {}, {})
    weights = LossWeights(init_loss_scale=0.5)
    assert weights.summary_stats()["loss_scale"] == pytest.approx(0.5)
    assert weights.config_dict() == {"kind": "loss_weights", "init_loss_scale": 0.5, "trusted_column": None,
                                     "warmup_steps": 0, "trusted_share": "max_weight", "reference_column": None,
                                     "init_reference_scale": 0.0}
    assert [n for n, _ in weights.named_parameters()] == ["loss_scale_raw"]  # one number without a reference
    with pytest.raises(ValueError, match=r"trusted_share must be one of \['max_weight', 'uniform'\]"):
        LossWeights(trusted_column="trusted", trusted_share="fixed")
    # without trusted rows there is nothing to share: the plain weighting (a trainer may set the column later)
    plain, uniform = LossWeights(init_loss_scale=2.0), LossWeights(init_loss_scale=2.0, trusted_share="uniform")
    losses = torch.tensor([0.1, 2.0, 0.7])
    torch.testing.assert_close(uniform(losses, {}, {}), plain(losses, {}, {}))
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="warmup_steps must be an integer >= 0"):
            LossWeights(warmup_steps=bad)
    assert weights.id_column is None and weights.stops_gradients  # no ids needed; exact HVP modes only


def test_loss_weights_give_trusted_rows_the_weight_of_a_zero_loss():
    weights = LossWeights(init_loss_scale=1.5, trusted_column="trusted").double()
    losses = torch.tensor([0.2, 3.0, 2.5, 0.9], dtype=torch.float64)
    batch = {"trusted": torch.tensor([0, 1, 0, 1])}
    w = torch.sigmoid(-1.5 * losses)
    w[1] = w[3] = 0.5  # sigmoid(-s * 0), the largest weight, whatever the row's loss
    torch.testing.assert_close(weights.example_weights(losses, batch), w)
    torch.testing.assert_close(weights(losses, batch, {}), (w * losses).sum() / w.sum())
    # the trusted rows' weights do not move with loss_scale: the outer gradient comes from the others only
    (g_raw,) = torch.autograd.grad(weights.example_weights(losses, batch).sum(), weights.loss_scale_raw)
    s_prime = torch.sigmoid(weights.loss_scale_raw.detach())
    expected = sum(-w[i] * (1 - w[i]) * losses[i] for i in (0, 2)) * s_prime
    torch.testing.assert_close(g_raw, expected)
    with pytest.raises(KeyError, match="batch has no 'trusted' column .*trusted_column"):
        weights(losses, {}, {})
    with pytest.raises(IndexError, match="holds 2; trusted flags are 0 or 1"):
        weights(losses, {"trusted": torch.tensor([0, 2, 0, 1])}, {})
    with pytest.raises(ValueError, match="trusted_column must be a column name or None"):
        LossWeights(trusted_column="")


def test_loss_weights_against_a_reference_loss():
    """w_i = sigmoid(-s (l_i - b ref_i)), trusted rows at 1/2, and the outer gradient of b in closed form."""
    weights = LossWeights(init_loss_scale=1.5, trusted_column="trusted", reference_column="ref",
                          init_reference_scale=0.4).double()
    losses = torch.tensor([0.2, 3.0, 2.5, 0.9, 1.7], dtype=torch.float64)
    ref = torch.tensor([0.5, 4.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    batch = {"trusted": torch.tensor([0, 0, 0, 1, 0]), "ref": ref}
    w = torch.sigmoid(-1.5 * (losses - 0.4 * ref))
    w[3] = 0.5
    torch.testing.assert_close(weights.example_weights(losses, batch), w)
    torch.testing.assert_close(weights(losses, batch, {}), (w * losses).sum() / w.sum())
    # d w_i / d b = w_i (1 - w_i) s ref_i on the untrusted rows, none on the trusted one
    (g_b,) = torch.autograd.grad(weights.example_weights(losses, batch).sum(), weights.reference_scale)
    torch.testing.assert_close(g_b, sum(w[i] * (1 - w[i]) * 1.5 * ref[i] for i in (0, 1, 2, 4)))
    # b = 0: exactly the loss tilt alone
    zero = LossWeights(init_loss_scale=1.5, reference_column="ref").double()
    torch.testing.assert_close(zero.example_weights(losses, batch), torch.sigmoid(-1.5 * losses))
    assert weights.batch_columns() == ("trusted", "ref")
    assert weights.summary_stats() == {"loss_scale": pytest.approx(1.5), "reference_scale": pytest.approx(0.4)}
    with pytest.raises(KeyError, match="batch has no 'ref' column .*reference_column"):
        weights(losses, {"trusted": batch["trusted"]}, {})
    with pytest.raises(ValueError, match=r"batch\['ref'\] must hold one float reference loss per example \(5\)"):
        weights(losses, {**batch, "ref": torch.tensor([1, 2, 3, 4, 5])}, {})
    with pytest.raises(ValueError, match=r"batch\['ref'\] holds a non-finite reference loss"):
        weights(losses, {**batch, "ref": torch.tensor([0.5, float("nan"), 1.0, 2.0, 3.0])}, {})
    with pytest.raises(ValueError, match="needs each example's reference_loss"):
        weights.weights_for(losses)
    with pytest.raises(ValueError, match="reference_column must be a column name other than trusted_column"):
        LossWeights(trusted_column="t", reference_column="t")
    for bad in (float("inf"), True, "0.5"):
        with pytest.raises(ValueError, match="init_reference_scale must be a finite number"):
            LossWeights(reference_column="ref", init_reference_scale=bad)


def test_loss_weights_keep_the_trusted_rows_uniform_share():
    """trusted_share="uniform": L = (sum_F l_i + |R| sum_R w_i l_i / sum_R w_i) / n, F the trusted rows."""
    weights = LossWeights(init_loss_scale=1.5, trusted_column="trusted", trusted_share="uniform").double()
    losses = torch.tensor([0.2, 3.0, 2.5, 0.9, 1.7], dtype=torch.float64)
    flags = torch.tensor([0, 1, 0, 1, 0])
    batch = {"trusted": flags}

    def closed_form(s):
        w = torch.sigmoid(-s * losses)
        rest = flags == 0
        return (losses[~rest].sum() + rest.sum() * (w[rest] * losses[rest]).sum() / w[rest].sum()) / len(losses)

    torch.testing.assert_close(weights(losses, batch, {}), closed_form(1.5))
    # the reported weights are those of "max_weight": the trusted rows at 1/2, the others sigmoid(-s l)
    w = torch.sigmoid(-1.5 * losses)
    w[1] = w[3] = 0.5
    torch.testing.assert_close(weights.example_weights(losses, batch), w)
    # whatever loss_scale, the trusted rows carry 2/5 of the batch: a larger scale moves mass among the others only
    for s in (0.01, 1.5, 40.0):
        with torch.no_grad():
            weights.loss_scale_raw.fill_(math.log(math.expm1(s)))
        shifted = losses + torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
        torch.testing.assert_close(weights(shifted, batch, {}) - weights(losses, batch, {}),
                                   torch.tensor(2 / 5, dtype=torch.float64))
    # the outer gradient against a central finite difference of the closed form in loss_scale_raw
    with torch.no_grad():
        weights.loss_scale_raw.fill_(0.3)
    (g_raw,) = torch.autograd.grad(weights(losses, batch, {}), weights.loss_scale_raw)
    eps = 1e-6
    softplus = torch.nn.functional.softplus
    fd = (closed_form(softplus(torch.tensor(0.3 + eps, dtype=torch.float64)))
          - closed_form(softplus(torch.tensor(0.3 - eps, dtype=torch.float64)))) / (2 * eps)
    torch.testing.assert_close(g_raw, fd, rtol=1e-7, atol=1e-10)
    # only trusted rows: their plain mean; no trusted row: the normalized weighted mean of "max_weight"
    torch.testing.assert_close(weights(losses, {"trusted": torch.ones(5, dtype=torch.long)}, {}), losses.mean())
    zeros = {"trusted": torch.zeros(5, dtype=torch.long)}
    w = torch.sigmoid(-softplus(torch.tensor(0.3, dtype=torch.float64)) * losses)
    torch.testing.assert_close(weights(losses, zeros, {}), (w * losses).sum() / w.sum())
    # inside CombinedWeights, the trusted rows keep their share of the product weighting
    sources = SourceWeights(["a", "b"]).double()
    with torch.no_grad():
        sources.logits.copy_(torch.tensor([0.4, -0.4], dtype=torch.float64))
    combined = CombinedWeights([sources, weights])
    batch = {"trusted": flags, "source_id": torch.tensor([0, 1, 1, 0, 1])}
    w = combined.example_weights(losses, batch)
    rest = flags == 0
    expected = (losses[~rest].sum() + rest.sum() * (w[rest] * losses[rest]).sum() / w[rest].sum()) / len(losses)
    torch.testing.assert_close(combined(losses, batch, {}), expected)
    assert combined.fixed_share_rows(batch, 5).tolist() == [False, True, False, True, False]
    assert CombinedWeights([SourceWeights(["a", "b"]), LossWeights()]).fixed_share_rows(batch, 5) is None


def test_loss_weights_warm_up_the_tilt_linearly():
    weights = LossWeights(init_loss_scale=2.0, warmup_steps=4).double()
    losses = torch.tensor([0.1, 0.7, 2.0], dtype=torch.float64)
    torch.testing.assert_close(weights.weights_for(losses), torch.sigmoid(-2.0 * losses))  # untold: full tilt
    for step, r in ((0, 0.0), (1, 0.25), (3, 0.75), (4, 1.0), (9, 1.0)):
        weights.set_inner_step(step)
        assert weights.warmup_factor == r
        torch.testing.assert_close(weights.weights_for(losses), torch.sigmoid(-r * 2.0 * losses))
        assert ("warmup_factor" in weights.summary_stats()) == (r < 1)
    weights.set_inner_step(0)  # no tilt: uniform weights, and the outer gradient vanishes
    (g_raw,) = torch.autograd.grad(weights(losses, {}, {}), weights.loss_scale_raw)
    assert float(g_raw) == 0.0
    no_warmup = LossWeights(init_loss_scale=2.0)
    no_warmup.set_inner_step(0)
    assert no_warmup.warmup_factor == 1.0
    # a combined module passes the step on to its parts
    combined = CombinedWeights([SourceWeights(["a", "b"]), LossWeights(warmup_steps=10)])
    combined.set_inner_step(5)
    assert combined.parts[1].warmup_factor == 0.5


def test_loss_weights_save_and_load(tmp_path):
    weights = LossWeights()
    with torch.no_grad():
        weights.loss_scale_raw.fill_(math.log(math.expm1(2.5)))
    weights.save_pretrained(str(tmp_path), metadata={"method": "identity"})
    loaded = OuterModule.from_pretrained(str(tmp_path))
    assert isinstance(loaded, LossWeights) and loaded.metadata["method"] == "identity"
    assert float(loaded.loss_scale.detach()) == pytest.approx(2.5) and loaded.trusted_column is None
    LossWeights(trusted_column="is_validation").save_pretrained(str(tmp_path / "trusted"))
    assert OuterModule.from_pretrained(str(tmp_path / "trusted")).trusted_column == "is_validation"
    LossWeights(trusted_column="trusted", trusted_share="uniform").save_pretrained(str(tmp_path / "share"))
    loaded = OuterModule.from_pretrained(str(tmp_path / "share"))
    assert loaded.trusted_share == "uniform" and "uniform share of each batch" in (
        tmp_path / "share" / "README.md").read_text()
    LossWeights(warmup_steps=30).save_pretrained(str(tmp_path / "warmup"))
    loaded = OuterModule.from_pretrained(str(tmp_path / "warmup"))
    assert loaded.warmup_steps == 30 and loaded.warmup_factor == 1.0  # a loaded module weights at full tilt
    assert "first 30 inner steps" in (tmp_path / "warmup" / "README.md").read_text()
    card = (tmp_path / "README.md").read_text()
    assert "sigmoid(-loss_scale * l_i)" in card and "loss_scale = 2.5000" in card
    referenced = LossWeights(reference_column="ref", init_reference_scale=0.25)
    with torch.no_grad():
        referenced.reference_scale.fill_(0.75)
    referenced.save_pretrained(str(tmp_path / "reference"))
    loaded = OuterModule.from_pretrained(str(tmp_path / "reference"))
    assert loaded.reference_column == "ref" and loaded.init_reference_scale == 0.25
    assert float(loaded.reference_scale.detach()) == pytest.approx(0.75)
    assert "reference_scale = 0.7500" in (tmp_path / "reference" / "README.md").read_text()
