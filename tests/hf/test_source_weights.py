"""SourceWeights (one learned weight per data source), CombinedWeights (products of weightings), add_source_ids
and the mixture sampler: values and gradients against closed forms, a closed-form hypergradient, the trainer on a
tiny classifier with a label-flipped source, persistence, errors, sampling proportions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict
from torch.func import functional_call, grad, jvp, vmap

from hf_integration import (BilevelTrainer, CombinedWeights, DataWeights, LoraRegularization, LossWeights, OuterModule,
                            SourceWeights, add_source_ids, example_sampling_probabilities, mixture_sampler,
                            source_counts)
from hypergrad import approx_hypergrad

from .trainer_utils import bilevel_args, tiny_classifier, token_task

NAMES = ["books", "code", "web"]


def _source_weights(logits=(0.3, -1.2, 0.8), dtype=torch.float64) -> SourceWeights:
    sw = SourceWeights(NAMES).to(dtype)
    with torch.no_grad():
        sw.logits.copy_(torch.tensor(logits, dtype=dtype))
    return sw


# ------------------------------------------------------------------------------- (a) objective and gradient


def test_init_is_uniform_and_forward_is_the_plain_mean():
    sw = SourceWeights(NAMES)
    torch.testing.assert_close(sw.weights(), torch.ones(3))
    torch.testing.assert_close(sw.mixture(), torch.full((3,), 1 / 3))
    losses = torch.tensor([1.0, 2.0, 3.0, 6.0])
    torch.testing.assert_close(sw(losses, {"source_id": torch.tensor([0, 2, 2, 1])}, {}), losses.mean())
    assert [n for n, _ in sw.named_parameters()] == ["logits"] and sw.num_sources == 3


def test_forward_and_logit_gradient_match_closed_form_and_finite_differences():
    sw = _source_weights()
    ids = torch.tensor([0, 2, 2, 1, 0, 2])
    losses = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25, 1.5], dtype=torch.float64)
    batch = {"source_id": ids}
    a = sw.logits.detach().clone()

    # by hand: w_s = S exp(a_s) / sum_t exp(a_t), L = sum_i w_s(i) l_i / sum_i w_s(i)
    e = [math.exp(v) for v in a.tolist()]
    w = [3 * v / sum(e) for v in e]
    wi = [w[s] for s in ids.tolist()]
    total = sum(x * l for x, l in zip(wi, losses.tolist())) / sum(wi)
    assert float(sw(losses, batch, {}).detach()) == pytest.approx(total, rel=1e-14)
    torch.testing.assert_close(sw.weights(), torch.tensor(w, dtype=torch.float64))
    assert float(sw.weights().mean()) == pytest.approx(1.0, rel=1e-14)

    # closed-form gradient: dL/dw_s = sum_{i in s} (l_i - L) / W, dw_s/da_t = w_s (delta_st - p_t)
    p = [v / 3 for v in w]
    dL_dw = [sum(l - total for l, s in zip(losses.tolist(), ids.tolist()) if s == k) / sum(wi) for k in range(3)]
    inner = sum(g * ws for g, ws in zip(dL_dw, w))
    closed = torch.tensor([dL_dw[t] * w[t] - p[t] * inner for t in range(3)], dtype=torch.float64)

    g = grad(lambda params: functional_call(sw, params, (losses, batch, {})))({"logits": a})["logits"]
    torch.testing.assert_close(g, closed, rtol=1e-12, atol=1e-15)
    assert abs(float(g.sum())) < 1e-14  # adding a constant to every logit changes nothing

    eps = 1e-6
    fd = torch.zeros(3, dtype=torch.float64)
    for t in range(3):
        values = []
        for sign in (1, -1):
            shifted = a.clone()
            shifted[t] += sign * eps
            values.append(float(functional_call(sw, {"logits": shifted}, (losses, batch, {}))))
        fd[t] = (values[0] - values[1]) / (2 * eps)
    torch.testing.assert_close(g, fd, rtol=1e-7, atol=1e-10)


def test_gradient_in_the_losses_under_jvp_and_vmap():
    """Tangents over the losses (as when they depend on the inner parameters), batched with vmap."""
    sw = _source_weights()
    ids = torch.tensor([1, 0, 2])
    losses = torch.rand(3, dtype=torch.float64)
    params = dict(sw.named_parameters())
    fn = lambda l: functional_call(sw, params, (l, {"source_id": ids}, {}))  # noqa: E731
    _, out = vmap(lambda t: jvp(fn, (losses,), (t,)))(torch.eye(3, dtype=torch.float64))
    w = sw.weights().detach()[ids]
    torch.testing.assert_close(out, w / w.sum())


def test_column_vector_ids_custom_column_and_float32_losses():
    sw = SourceWeights(NAMES, id_column="domain_id")
    with torch.no_grad():
        sw.logits.copy_(torch.tensor([0.1, 0.2, -0.3]))
    losses = torch.rand(3)
    a = sw(losses, {"domain_id": torch.tensor([[0], [1], [2]])}, {})
    b = sw(losses, {"domain_id": torch.tensor([0, 1, 2])}, {})
    torch.testing.assert_close(a, b)
    double = _source_weights((0.1, 0.2, -0.3))
    out = double(losses, {"source_id": torch.tensor([0, 1, 2])}, {})  # losses promoted to the weights' dtype
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), a)


# ------------------------------------------------------------------------------- (b) hypergradients


def test_hypergradient_of_weighted_ridge_regression_matches_closed_form():
    """Inner: theta*(a) = argmin sum_i w_s(i) l_i / sum_i w_s(i) + lam/2 |theta|^2 with l_i = (x_i.theta - y_i)^2 / 2,
    solved in closed form; outer: the mean squared error on clean validation data. The implicit hypergradient
    (exact solve) through SourceWeights equals the derivative of the closed-form solution, and the source whose
    targets are negated gets a positive hypergradient (up-weighting it hurts)."""
    gen = torch.Generator().manual_seed(0)
    d, n, lam = 4, 30, 0.1
    truth = torch.randn(d, generator=gen, dtype=torch.float64)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    ids = torch.arange(n) % 3
    y = x @ truth + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    y = torch.where(ids == 2, -y, y)  # source 2 ("web") is corrupted
    xv = torch.randn(20, d, generator=gen, dtype=torch.float64)
    yv = xv @ truth
    sw = _source_weights((0.2, -0.4, 0.1))
    batch = {"source_id": ids}

    def theta_star(a):
        w = (3 * torch.softmax(a, 0))[ids]
        lhs = (x.T * w) @ x / w.sum() + lam * torch.eye(d, dtype=torch.float64)
        return torch.linalg.solve(lhs, (x.T * w) @ y / w.sum())

    def outer_of_logits(a):
        return 0.5 * ((xv @ theta_star(a) - yv) ** 2).mean()

    a = sw.logits.detach().clone()
    true = torch.func.grad(outer_of_logits)(a)

    def inner(i, o):
        losses = 0.5 * (x @ i["theta"] - y) ** 2
        return functional_call(sw, o, (losses, batch, {})) + 0.5 * lam * (i["theta"] ** 2).sum()

    def outer(i, o):
        return 0.5 * ((xv @ i["theta"] - yv) ** 2).mean()

    ours = approx_hypergrad.exact(inner, outer, {"theta": theta_star(a)}, {"logits": a})["logits"]
    torch.testing.assert_close(ours, true, rtol=1e-9, atol=1e-12)

    eps = 1e-6
    fd = torch.stack([(outer_of_logits(a + eps * e) - outer_of_logits(a - eps * e)) / (2 * eps)
                      for e in torch.eye(3, dtype=torch.float64)])
    torch.testing.assert_close(ours, fd, rtol=1e-6, atol=1e-10)
    assert ours[2] > 0 and ours[2] == ours.max()


def _mixed_source_datasets(n_train: int = 48, n_val: int = 32, seed: int = 0):
    """``token_task`` rows assigned round-robin to three sources; every label of source ``flipped`` is wrong."""
    train = token_task(n_train, 0.0, seed)
    sources = [("clean_a", "clean_b", "flipped")[i % 3] for i in range(n_train)]
    labels = [1 - y if s == "flipped" else y for y, s in zip(train["label"], sources)]
    train = train.remove_columns(["label"]).add_column("label", labels).add_column("source", sources)
    train, names = add_source_ids(train, "source")
    return train, token_task(n_val, 0.0, seed + 1), names


def test_trainer_learns_to_down_weight_the_label_flipped_source(tmp_path):
    train, val, names = _mixed_source_datasets()
    assert names == ["clean_a", "clean_b", "flipped"]
    weights = SourceWeights(names)
    args = bilevel_args(tmp_path, max_steps=8, unroll_steps=2, hypergrad_train_batch_size=48, outer_batch_size=32,
                        outer_learning_rate=0.5, logging_steps=4)
    trainer = BilevelTrainer(model=tiny_classifier(), args=args, train_dataset=train, eval_dataset=val,
                             outer_module=weights)
    assert trainer.id_column == "source_id"

    train_batch, eval_batch, gen = trainer._batches(step=0)
    assert "source_id" in train_batch and train_batch["source_id"].dtype == torch.long
    first = trainer.compute_hypergradient(train_batch, eval_batch, gen)["outer_module.logits"]
    assert first[2] > 0 and int(first.argmax()) == 2  # up-weighting the flipped source raises the outer loss

    trainer.train()
    w = weights.weights().detach()
    assert int(w.argmin()) == 2 and float(w[2]) < 0.9 * float(w[:2].min())
    assert float(w.mean()) == pytest.approx(1.0, rel=1e-5)
    logged = [entry for entry in trainer.state.log_history if "outer/weight[flipped]" in entry]
    assert logged and logged[-1]["outer/weight[flipped]"] == pytest.approx(float(w[2]), rel=1e-6)


def test_trainer_with_source_times_loss_weights_takes_exact_hvps_only(tmp_path):
    train, val, names = _mixed_source_datasets(12, 8)
    combined = CombinedWeights([SourceWeights(names), LossWeights()])
    assert combined.stops_gradients and combined.id_column == "source_id"
    args = bilevel_args(tmp_path, max_steps=2, unroll_steps=1, per_device_train_batch_size=6,
                        hvp_mode="finite_diff")
    with pytest.raises(ValueError, match="hvp_mode='finite_diff' cannot differentiate the objective of CombinedWeights"):
        BilevelTrainer(model=tiny_classifier(), args=args, train_dataset=train, eval_dataset=val, outer_module=combined)
    args.hvp_mode = "auto"
    trainer = BilevelTrainer(model=tiny_classifier(), args=args, train_dataset=train, eval_dataset=val,
                             outer_module=combined)
    trainer.train()
    assert trainer.hvp_mode in ("rev_rev", "fwd_rev") and trainer.outer_step >= 1
    assert combined.parts[0].logits.abs().sum() > 0 and torch.isfinite(combined.parts[1].loss_scale_raw)


# ------------------------------------------------------------------------------- (c) persistence


def test_source_weights_save_and_load(tmp_path):
    sw = _source_weights(dtype=torch.float32)
    sw.save_pretrained(str(tmp_path), metadata={"method": "nystrom"})
    loaded = OuterModule.from_pretrained(str(tmp_path), expected={"source_names": NAMES, "id_column": "source_id"})
    assert isinstance(loaded, SourceWeights) and loaded.source_names == NAMES
    torch.testing.assert_close(loaded.logits, sw.logits)
    assert loaded.metadata["method"] == "nystrom" and loaded.config_dict() == sw.config_dict()
    card = (tmp_path / "README.md").read_text()
    assert "S * softmax(a)_s" in card and "sum_i w_s(i) l_i / sum_i w_s(i)" in card
    assert all(f"`{name}`" in card for name in NAMES)
    with pytest.raises(ValueError, match="source_names"):
        SourceWeights.from_pretrained(str(tmp_path), expected={"source_names": ["books", "web", "code"]})

    balanced = SourceWeights(NAMES, init_weights=[2.0, 1.0, 1.0])
    torch.testing.assert_close(balanced.weights(), torch.tensor([1.5, 0.75, 0.75]))
    balanced.save_pretrained(str(tmp_path / "b"))
    assert OuterModule.from_pretrained(str(tmp_path / "b")).init_weights == [1.5, 0.75, 0.75]


@pytest.mark.parametrize("second", ["data", "loss"])
def test_combined_weights_save_and_load(tmp_path, second):
    part = DataWeights(5) if second == "data" else LossWeights(init_loss_scale=0.7)
    combined = CombinedWeights([_source_weights(dtype=torch.float32), part])
    with torch.no_grad():
        for p in combined.parameters():
            p.add_(0.25)
    keys = {"data": ["parts.0.logits", "parts.1.logits"], "loss": ["parts.0.logits", "parts.1.loss_scale_raw"]}
    assert list(combined.state_dict()) == keys[second]
    combined.save_pretrained(str(tmp_path))
    loaded = CombinedWeights.from_pretrained(str(tmp_path))
    assert [type(p) for p in loaded.parts] == [SourceWeights, type(part)]
    assert loaded.config_dict() == combined.config_dict() and loaded.config_dict()["parts"][0]["source_names"] == NAMES
    for key, value in combined.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    assert loaded.stops_gradients == (second == "loss")
    card = (tmp_path / "README.md").read_text()
    assert "prod_k w_i^(k)" in card and "Part 0" in card and "Part 1" in card
    stats = loaded.summary_stats()
    assert "source_weights/weight[web]" in stats and all(isinstance(v, float) for v in stats.values())


# ------------------------------------------------------------------------------- (d) errors


def test_batch_errors():
    sw = SourceWeights(NAMES)
    losses = torch.rand(2)
    with pytest.raises(KeyError, match=r"'source_id'.*add_source_ids.*remove_unused_columns"):
        sw(losses, {"input_ids": torch.zeros(2, 3, dtype=torch.long)}, {})
    with pytest.raises(IndexError, match=r"source id 3 .*out of range.*3 sources \['books', 'code', 'web'\]"):
        sw(losses, {"source_id": torch.tensor([0, 3])}, {})
    with pytest.raises(IndexError, match="source id -1"):
        sw(losses, {"source_id": torch.tensor([-1, 0])}, {})
    with pytest.raises(TypeError, match="integer source ids"):
        sw(losses, {"source_id": torch.tensor([0.0, 1.0])}, {})
    with pytest.raises(ValueError, match="3 ids but per_example_loss has 2"):
        sw(losses, {"source_id": torch.tensor([0, 1, 2])}, {})
    with pytest.raises(ValueError, match=r"shape \(batch_size,\)"):
        sw(torch.rand(2, 4), {"source_id": torch.tensor([0, 1])}, {})


def test_constructor_errors():
    with pytest.raises(ValueError, match="empty"):
        SourceWeights([])
    with pytest.raises(ValueError, match="duplicates"):
        SourceWeights(["a", "b", "a"])
    with pytest.raises(TypeError, match="list of source names"):
        SourceWeights("abc")
    with pytest.raises(ValueError, match="init_weights"):
        SourceWeights(NAMES, init_weights=[1.0, 0.0, 1.0])
    with pytest.raises(TypeError, match="LoraRegularization cannot be a part"):
        CombinedWeights([SourceWeights(NAMES), LoraRegularization(["m"])])
    with pytest.raises(ValueError, match="empty"):
        CombinedWeights([])
    sw = SourceWeights(NAMES)
    with pytest.raises(ValueError, match="same module twice"):
        CombinedWeights([sw, sw])


def test_add_source_ids_names_order_and_errors():
    ds = Dataset.from_dict({"domain": ["web", "code", "web", "books"], "x": [0, 1, 2, 3]})
    with_ids, names = add_source_ids(ds, "domain")
    assert names == NAMES and with_ids["source_id"] == [2, 1, 2, 0]
    shuffled, _ = add_source_ids(ds.shuffle(seed=3), "domain")  # ids follow their rows
    assert all(NAMES[i] == d for i, d in zip(shuffled["source_id"], shuffled["domain"]))
    given, names2 = add_source_ids(ds, "domain", id_column="dom", names=["web", "books", "code", "math"])
    assert names2 == ["web", "books", "code", "math"] and given["dom"] == [0, 2, 0, 1]

    numbers, num_names = add_source_ids(Dataset.from_dict({"src": [10, 2, 10]}), "src")
    assert num_names == ["2", "10"] and numbers["source_id"] == [1, 0, 1]  # sorted as numbers
    labelled = Dataset.from_dict({"lang": [1, 0, 1]}).cast_column("lang", ClassLabel(names=["de", "en", "fr"]))
    labelled, label_names = add_source_ids(labelled, "lang")
    assert label_names == ["de", "en", "fr"] and labelled["source_id"] == [1, 0, 1]
    splits, split_names = add_source_ids(DatasetDict(train=ds, val=Dataset.from_dict({"domain": ["math"]})), "domain")
    assert split_names == ["books", "code", "math", "web"] and splits["val"]["source_id"] == [2]

    with pytest.raises(ValueError, match=r"column 'domain' holds the source 'books', which is not among the names"):
        add_source_ids(ds, "domain", names=["code", "web"])
    with pytest.raises(KeyError, match="no source column 'topic'"):
        add_source_ids(ds, "topic")
    with pytest.raises(ValueError, match="already has a column 'source_id'"):
        add_source_ids(with_ids, "domain")
    with pytest.raises(TypeError, match="strings or integers"):
        add_source_ids(Dataset.from_dict({"f": [0.5, 1.5]}), "f")


# ------------------------------------------------------------------------------- (e) sampling by the mixture


def test_mixture_sampler_draws_sources_in_the_learned_proportions():
    ds, _ = add_source_ids(Dataset.from_dict({"domain": ["books"] * 60 + ["code"] * 30 + ["web"] * 10}), "domain")
    sw = _source_weights((0.0, 0.5, 1.5))
    counts = source_counts(ds, 3)
    assert counts.tolist() == [60, 30, 10]
    w = sw.weights().detach()
    q = sw.mixture(counts).detach()
    torch.testing.assert_close(q, torch.tensor(counts, dtype=torch.float64) * w / (torch.tensor(counts) * w).sum())
    torch.testing.assert_close(sw.mixture(), w / 3)

    ids = torch.tensor(ds["source_id"])
    probs = sw.sampling_weights(ids)
    torch.testing.assert_close(probs, w[ids] / w[ids].sum())  # = q_s / n_s: realises the weighted objective
    assert float(probs.sum()) == pytest.approx(1.0)

    draws = 20_000
    sampler = mixture_sampler(ds, sw, num_samples=draws, generator=torch.Generator().manual_seed(0))
    rows = list(sampler)
    assert len(rows) == len(sampler) == draws and min(rows) >= 0 and max(rows) < len(ds)
    freq = np.bincount(ids[rows].numpy(), minlength=3) / draws
    np.testing.assert_allclose(freq, q.numpy(), atol=0.015)
    assert len(set(rows)) == len(ds)  # every row of every source gets drawn

    explicit = mixture_sampler(ds, [0.2, 0.3, 0.5], num_samples=draws, generator=torch.Generator().manual_seed(1))
    freq = np.bincount(ids[list(explicit)].numpy(), minlength=3) / draws
    np.testing.assert_allclose(freq, [0.2, 0.3, 0.5], atol=0.015)
    first, second = (list(mixture_sampler(ds, [0.2, 0.3, 0.5], num_samples=200,
                                          generator=torch.Generator().manual_seed(5))) for _ in range(2))
    assert first == second  # reproducible from the generator's seed

    torch.testing.assert_close(example_sampling_probabilities([0, 0, 1], [1.0, 3.0]),
                               torch.tensor([0.125, 0.125, 0.75], dtype=torch.float64))
    with pytest.raises(ValueError, match="no examples"):
        example_sampling_probabilities([0, 0], [0.5, 0.5])
    with pytest.raises(IndexError, match="out of range for 2 sources"):
        mixture_sampler(ds, [0.5, 0.5])


# ------------------------------------------------------------------------------- (f) products of weightings


def test_combined_weights_equal_the_product_of_their_parts():
    sw = _source_weights()
    dw = DataWeights(6).double()
    lw = LossWeights(init_loss_scale=0.6).double()
    with torch.no_grad():
        dw.logits.copy_(torch.linspace(-1, 1, 6, dtype=torch.float64))
    losses = torch.tensor([0.3, 1.2, 0.7, 2.5], dtype=torch.float64)
    batch = {"source_id": torch.tensor([2, 0, 1, 2]), "example_id": torch.tensor([5, 0, 3, 1])}

    combined = CombinedWeights([sw, dw, lw])
    assert combined.id_columns == ("source_id", "example_id") and combined.id_column == "source_id"
    assert combined.stops_gradients and not CombinedWeights([sw, dw]).stops_gradients
    product = sw.example_weights(losses, batch) * dw.example_weights(losses, batch) * lw.example_weights(losses, batch)
    expected_w = (sw.weights()[batch["source_id"]] * torch.sigmoid(dw.logits[batch["example_id"]])
                  * torch.sigmoid(-0.6 * losses))
    torch.testing.assert_close(product, expected_w)
    torch.testing.assert_close(combined.example_weights(losses, batch), product)
    torch.testing.assert_close(combined(losses, batch, {}), (product * losses).sum() / product.sum())
    # a single part is that part's own objective
    torch.testing.assert_close(CombinedWeights([sw])(losses, batch, {}), sw(losses, batch, {}))

    params = {k: v.detach() for k, v in combined.named_parameters()}
    assert set(params) == {"parts.0.logits", "parts.1.logits", "parts.2.loss_scale_raw"}
    grads = grad(lambda p: functional_call(combined, p, (losses, batch, {})))(params)
    # d/d(source logits) of the product objective, with the data/loss factors as fixed per-example multipliers
    other = (dw.example_weights(losses, batch) * lw.example_weights(losses, batch)).detach()

    def by_source(a):
        w = 3 * torch.softmax(a, 0)[batch["source_id"]] * other
        return (w * losses).sum() / w.sum()

    torch.testing.assert_close(grads["parts.0.logits"], torch.func.grad(by_source)(params["parts.0.logits"]))
    assert all(float(g.abs().sum()) > 0 for g in grads.values())
    stats = CombinedWeights([SourceWeights(NAMES), SourceWeights(["a", "b"], id_column="lang_id")]).summary_stats()
    assert "source_weights.0/weight[web]" in stats and "source_weights.1/weight[b]" in stats
