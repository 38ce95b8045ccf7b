"""`hf_integration.holdout_reference`: the probe's losses against scikit-learn fitted directly, the choice of its
regularization by cross-validation, the refusal of classes it cannot judge, and the pooled encoder features against
a mean written out by hand (padding-invariant, training mode restored)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_integration.holdout_reference import (MIN_PROBABILITY, check_reference_labels, holdout_reference,
                                              holdout_reference_losses, pooled_features)


def _blobs(n_per_class: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = 3.0 * np.eye(classes, 5)
    labels = np.repeat(np.arange(classes), n_per_class)
    return centers[labels] + rng.normal(size=(len(labels), 5)), labels


def test_losses_are_the_probes_negative_log_likelihoods():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    outer_x, outer_y = _blobs(10, 3, seed=0)
    train_x, train_y = _blobs(20, 3, seed=1)
    flipped = np.arange(0, 60, 7)
    noisy = train_y.copy()
    noisy[flipped] = (noisy[flipped] + 1) % 3
    ref = holdout_reference_losses(outer_x, outer_y, train_x, noisy, num_labels=3, seed=4, candidates=(0.1, 1.0))

    probe = LogisticRegression(C=ref.inverse_regularization, max_iter=5000).fit(outer_x, outer_y)
    expected = -np.log(np.maximum(probe.predict_proba(train_x)[np.arange(60), noisy], MIN_PROBABILITY))
    np.testing.assert_allclose(ref.train, expected, rtol=1e-6)
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=4)
    out_of_fold = cross_val_predict(LogisticRegression(C=ref.inverse_regularization, max_iter=5000), outer_x,
                                    outer_y, cv=folds, method="predict_proba")
    np.testing.assert_allclose(ref.outer, -np.log(out_of_fold[np.arange(30), outer_y]), rtol=1e-6)
    assert ref.outer_accuracy == pytest.approx(float((out_of_fold.argmax(1) == outer_y).mean()))
    # the flipped labels are the implausible ones
    clean = np.setdiff1d(np.arange(60), flipped)
    assert ref.train[flipped].min() > np.median(ref.train[clean])


def test_regularization_is_chosen_by_cross_validated_log_loss():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    outer_x, outer_y = _blobs(6, 2, seed=2)
    candidates = (0.01, 1.0, 100.0)
    ref = holdout_reference_losses(outer_x, outer_y, outer_x, outer_y, num_labels=2, seed=0, candidates=candidates)
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    scores = {c: log_loss(outer_y, cross_val_predict(LogisticRegression(C=c, max_iter=5000), outer_x, outer_y,
                                                     cv=folds, method="predict_proba")) for c in candidates}
    assert ref.inverse_regularization == min(scores, key=scores.get)


def test_a_class_missing_from_the_outer_rows_gets_no_zero_probability():
    """Labels the probe has no column for are refused (they would get the floor probability), by name."""
    outer_x, outer_y = _blobs(4, 2, seed=0)
    with pytest.raises(ValueError, match=r"at least 2 validation rows of every class; classes \[2\] have \[0\]"):
        holdout_reference_losses(outer_x, outer_y, outer_x[:3], np.array([0, 1, 2]), num_labels=3)
    with pytest.raises(ValueError, match=r"classes \[1\] have \[1\]"):
        check_reference_labels([0, 0, 1], [0, 1], num_labels=2)
    assert check_reference_labels([0, 0, 1, 1, 1], [1], num_labels=3) == 2
    with pytest.raises(ValueError, match=r"one feature row per label"):
        holdout_reference_losses(outer_x, outer_y, outer_x[:2], np.array([0, 1, 1]), num_labels=2)


@pytest.fixture(scope="module")
def tiny_encoder():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config)


def _rows(lengths):
    import datasets

    rng = np.random.default_rng(0)
    ids = [rng.integers(1, 50, size=n).tolist() for n in lengths]
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * n for n in lengths],
                                       "labels": [i % 2 for i in range(len(lengths))],
                                       "example_id": list(range(len(lengths)))})


def _pad(rows):
    width = max(len(r["input_ids"]) for r in rows)
    return {k: torch.tensor([r[k] + [0] * (width - len(r[k])) for r in rows]) for k in ("input_ids", "attention_mask")}


def test_pooled_features_are_the_masked_mean_of_the_last_layer(tiny_encoder):
    rows = _rows([3, 7, 5])
    tiny_encoder.train()
    features = pooled_features(tiny_encoder, rows, _pad, batch_size=2)
    assert tiny_encoder.training  # restored
    assert features.shape == (3, 16) and features.dtype == np.float64
    tiny_encoder.eval()
    with torch.no_grad():
        for i in range(3):  # each row alone, unpadded: padding in a batch changes nothing
            row = {"input_ids": torch.tensor([rows[i]["input_ids"]]),
                   "attention_mask": torch.tensor([rows[i]["attention_mask"]])}
            mean = tiny_encoder(**row, output_hidden_states=True).hidden_states[-1][0].mean(0)
            np.testing.assert_allclose(features[i], (mean / mean.norm()).numpy(), atol=1e-5)


def test_holdout_reference_end_to_end(tiny_encoder):
    outer = _rows([4, 5, 6, 4, 5, 6, 7, 3, 5, 4])
    train = _rows([5, 6, 7, 8])
    ref = holdout_reference(tiny_encoder, train, outer, _pad, num_labels=2, batch_size=4)
    assert ref.train.shape == (4,) and ref.outer.shape == (10,)
    assert np.isfinite(ref.train).all() and (ref.train >= 0).all() and (ref.outer >= 0).all()
    with pytest.raises(ValueError, match=r"needs tokenized rows with input_ids and attention_mask"):
        pooled_features(tiny_encoder, train.remove_columns("attention_mask"), _pad)


def test_the_reference_in_your_own_script(tmp_path):
    """The three lines docs/data-reweighting.md adds to a recipe script: the probe's losses as a column of both sets,
    named in `outer_module_options`; the trusted rows keep the column, and the outer problem learns
    reference_scale beside loss_scale."""
    from hf_integration import BilevelTrainer, LossWeights

    from .trainer_utils import bilevel_args, datasets_with_ids, tiny_classifier

    class Pad:  # the rows are ids of one length; tokenized text would use DataCollatorWithPadding(tokenizer)
        def __call__(self, rows):
            return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}

    train, validation = datasets_with_ids(32, 16)
    model = tiny_classifier()
    reference = holdout_reference(model, train, validation, Pad(), num_labels=2, label_column="label")
    train = train.add_column("reference_loss", reference.train.tolist())
    validation = validation.add_column("reference_loss", reference.outer.tolist())
    args = bilevel_args(tmp_path, recipe="data_weighting", outer_module_options={"reference_column": "reference_loss"},
                        hvp_mode="rev_rev", max_steps=6, per_device_train_batch_size=8, outer_patience_steps=1)
    trainer = BilevelTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation)
    module = trainer.outer_module
    assert isinstance(module, LossWeights) and module.reference_column == "reference_loss"
    assert trainer.train_dataset["reference_loss"][32:] == validation["reference_loss"]  # the trusted rows' own
    trainer.train()
    assert trainer.outer_step >= 1 and float(module.reference_scale.detach()) != 0.0


def test_a_cached_trunk_gives_the_full_models_features():
    """With the frozen-trunk cache only the layers above it run for the probe: the same features as the full model."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    from hf_integration.frozen_trunk import CachedTrunkClassifier, add_feature_rows

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2)
    model = get_peft_model(BertForSequenceClassification(config), LoraConfig(
        task_type="SEQ_CLS", r=2, target_modules=["query", "value"], layers_to_transform=[2]))
    rows = add_feature_rows({"train": _rows([3, 7, 5, 6])})["train"]
    cached = CachedTrunkClassifier(copy.deepcopy(model))
    cached.cache_features({"train": rows}, _pad_with_rows, batch_size=3)
    assert cached.first_layer == 2
    np.testing.assert_allclose(pooled_features(cached, rows, _pad_with_rows, batch_size=2),
                               pooled_features(model, rows, _pad_with_rows, batch_size=4), atol=1e-5)  # no feature_row


def _pad_with_rows(rows):
    return {**_pad(rows), **({"feature_row": torch.tensor([r["feature_row"] for r in rows])}
                             if "feature_row" in rows[0] else {})}
