"""`hf_integration.rivals`: the weighted loss, the loss filter's ranking (at a step, or of the initial model), the rivals' folders and data."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from torch import nn
from transformers import TrainingArguments

from hf_integration.recipe import TRUSTED_COLUMN, append_outer_rows
from hf_integration.rivals import (FIXED_SCORE_RIVALS, RIVALS, LossFilterTrainer, ScoreFilterTrainer, WeightedTrainer,
                                   filter_ranking, train_rival)


class Linear(nn.Module):
    """A linear classifier of a 2-feature input, with the forward signature `Trainer` expects."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(2, 2)

    def forward(self, x, labels=None):
        logits = self.linear(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def _data(n: int = 40) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    x = 0.3 * rng.normal(size=(n, 2)) + 2.0 * (2 * labels[:, None] - 1)
    noisy = labels.copy()
    noisy[:8] = 1 - noisy[:8]  # the first 8 examples are mislabelled
    return datasets.Dataset.from_dict({"x": x.tolist(), "labels": noisy.tolist(), "example_id": list(range(n))})


def _args(tmp_path, steps: int) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=0.5, report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True, logging_steps=100)


def test_weighted_loss_is_the_normalized_weighted_mean(tmp_path):
    data = _data()
    weights = torch.linspace(0.0, 1.0, len(data))
    trainer = WeightedTrainer(model=Linear(), args=_args(tmp_path, 1), train_dataset=data, weights=weights)
    batch = {"x": torch.tensor(data["x"][:5]), "labels": torch.tensor(data["labels"][:5]),
             "example_id": torch.arange(5)}
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    losses = nn.functional.cross_entropy(trainer.model.linear(batch["x"]), batch["labels"], reduction="none")
    w = weights[:5]
    torch.testing.assert_close(loss, (w * losses).sum() / w.sum())
    zero = WeightedTrainer(model=Linear(), args=_args(tmp_path, 1), train_dataset=data,
                           weights=torch.zeros(len(data)))
    assert zero.compute_loss(zero.model, dict(batch)).item() == 0.0  # a batch of dropped examples: no update


def test_loss_filter_drops_the_highest_loss_fraction_at_its_step(tmp_path):
    data = _data()
    trainer = LossFilterTrainer(model=Linear(), args=_args(tmp_path, 12), train_dataset=data, fraction=0.2,
                                filter_step=10)
    trainer.train()
    assert len(trainer.dropped) == 8 and trainer.weights.sum() == 32
    assert set(trainer.dropped.tolist()) == set(np.argsort(-trainer.losses)[:8].tolist())
    assert set(trainer.dropped.tolist()) == set(range(8))  # the mislabelled ones, on this easy problem
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\)"):
        LossFilterTrainer(model=Linear(), args=_args(tmp_path, 1), train_dataset=data, fraction=1.0, filter_step=1)


@pytest.mark.parametrize("name", RIVALS)
def test_train_rival_runs_each_rival_in_its_own_folder(name, tmp_path):
    data = _data()
    validation = data.select(range(8, 16)).remove_columns("example_id")
    scores = -np.arange(len(data), dtype=float) if name in FIXED_SCORE_RIVALS else None
    trainer, seconds = train_rival(name, Linear, _args(tmp_path, 3), data, validation, filter_fraction=0.2,
                                   filter_step=2, filter_scores=scores)
    assert seconds > 0 and trainer.state.global_step == 3
    assert trainer.args.output_dir.endswith(f"baseline-{name}")
    expected = {"uniform": 40, "uniform_train_val": 48}.get(name, 40)
    assert len(trainer.train_dataset) == expected
    with pytest.raises(ValueError, match="unknown rival"):
        train_rival("nope", Linear, _args(tmp_path, 1), data, validation, filter_fraction=0.2, filter_step=1)


def test_a_score_filter_drops_the_highest_scores_before_training_and_reports_its_ranking(tmp_path):
    data = _data()
    scores = np.where(np.arange(40) < 8, 10.0 + np.arange(40), np.arange(40) / 100)  # the 8 mislabelled score high
    scores[3] = np.inf
    for name in FIXED_SCORE_RIVALS:
        with pytest.raises(ValueError, match=rf"rival '{name}' needs filter_scores"):
            train_rival(name, Linear, _args(tmp_path, 1), data, data, filter_fraction=0.2)
    with pytest.raises(ValueError, match="takes no filter_scores"):
        train_rival("uniform", Linear, _args(tmp_path, 1), data, data, filter_scores=scores)
    trainer, _ = train_rival("reference_filter", Linear, _args(tmp_path, 2), data, data, filter_fraction=0.2,
                             filter_scores=scores)
    assert isinstance(trainer, ScoreFilterTrainer) and trainer.state.global_step == 2
    assert set(trainer.dropped.tolist()) == set(range(8)) and trainer.weights.sum() == 32
    corrupted = np.arange(40) < 8
    report = filter_ranking(trainer, data["example_id"], corrupted, ["bad"] * 8 + [""] * 32)
    assert report["fraction_dropped"] == 0.2 and report["auc_ranking_vs_corrupted"] == 1.0
    assert report["auc_ranking_by_corruption"] == {"bad": 1.0}
    loss_filter = LossFilterTrainer(model=Linear(), args=_args(tmp_path, 2), train_dataset=data, fraction=0.2,
                                    filter_step=0)
    loss_filter.train()
    assert "auc_high_loss_vs_corrupted" in filter_ranking(loss_filter, data["example_id"], corrupted)


def test_outer_rows_join_the_training_rows_flagged_or_not():
    train, val = _data(6), _data(4).remove_columns("example_id")
    joined = append_outer_rows(train, val, flag_column=None, drop=("example_id",))
    assert len(joined) == 10 and "example_id" not in joined.column_names
    flagged = append_outer_rows(train, val, drop=("example_id",))
    assert list(flagged[TRUSTED_COLUMN]) == [0] * 6 + [1] * 4
    assert list(flagged["labels"]) == list(train["labels"]) + list(val["labels"])


def test_the_loss_filter_at_step_0_ranks_by_the_initial_model(tmp_path):
    """The instruction job's rival: one forward pass of the untrained model ranks the examples."""
    data = _data()
    trainer = LossFilterTrainer(model=Linear(), args=_args(tmp_path, 2), train_dataset=data, fraction=0.25,
                                filter_step=0)
    initial = Linear()
    with torch.no_grad():
        losses = nn.functional.cross_entropy(initial.linear(torch.tensor(data["x"])), torch.tensor(data["labels"]),
                                             reduction="none").double().numpy()
    trainer.train()
    np.testing.assert_allclose(trainer.losses, losses, rtol=1e-6)
    assert set(trainer.dropped.tolist()) == set(np.argsort(-losses, kind="stable")[:10].tolist())
    assert trainer.ranking_time_s > 0
