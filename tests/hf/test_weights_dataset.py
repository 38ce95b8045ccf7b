"""`hf_integration.weights_dataset`: the summary figures of a weight column, the dataset card, the local save and
the Hub push (HfApi and `Dataset.push_to_hub` patched: no network)."""

from __future__ import annotations

import math
from unittest import mock

import datasets
import numpy as np
import pytest
from huggingface_hub import DatasetCard

from hf_integration import hub, weights_dataset
from hf_integration.hub import HubError
from hf_integration.weights_dataset import (check_weights_repo, push_weights_dataset, render_weights_card,
                                            save_weights_dataset, weight_summary)


@pytest.fixture
def table() -> datasets.Dataset:
    weights = [0.9, 0.8, 0.1, 0.7, 0.2, 0.6]
    return datasets.Dataset.from_dict({
        "messages": [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
                     for i in range(6)],
        "source": ["math", "math", "math", "words", "words", "words"],
        "corrupted": [False, False, True, False, True, False],
        "weight": weights,
    })


def test_weight_summary(table):
    s = weight_summary(table)
    w = np.asarray(table["weight"])
    assert s["num_examples"] == 6 and math.isclose(s["weight_mean"], w.mean())
    assert math.isclose(s["weight_median"], np.median(w)) and s["weight_min"] == 0.1 and s["weight_max"] == 0.9
    assert math.isclose(s["weight_frac_below_half"], 2 / 6)
    assert s["num_corrupted"] == 2 and math.isclose(s["mean_weight_corrupted"], 0.15)
    assert math.isclose(s["mean_weight_clean"], 0.75)
    assert s["mean_weight_by_source"] == pytest.approx({"math": 0.6, "words": 0.5})
    assert s["count_by_source"] == {"math": 3, "words": 3}
    assert "num_corrupted" not in weight_summary(table.remove_columns("corrupted"))
    with pytest.raises(KeyError, match="no column 'w'"):
        weight_summary(table, "w")
    with pytest.raises(ValueError, match="finite"):
        weight_summary(table.remove_columns("weight").add_column("weight", [1.0, math.nan, 1, 1, 1, 1]))


def test_card_says_what_how_figures_and_usage(table):
    card = render_weights_card(table, repo_id="me/weights", description="w_i = sigmoid(s_i), one per example",
                               how={"base_model": "/a/local/folder", "method": "identity", "steps": 75},
                               figures={"auc_low_weight_vs_corrupted": 0.91234, "bilevel test_loss": 1.5},
                               example_fraction=0.7)
    parsed = DatasetCard(card)
    assert "hypergrad" in parsed.data.tags and parsed.data.size_categories == ["n<1K"]
    assert parsed.data.task_categories == ["text-generation"]
    assert "training set of 6 examples" in card and "w_i = sigmoid(s_i), one per example" in card
    assert "| method | `identity` |" in card and "| steps | `75` |" in card
    assert "/a/local/folder" not in card  # a machine path never reaches a card
    assert "| auc_low_weight_vs_corrupted | 0.9123 |" in card and "| bilevel test_loss | 1.5 |" in card
    assert "| weight_mean | 0.55 |" in card and "| mean_weight_corrupted | 0.15 |" in card
    assert "| math | 3 | 0.6 |" in card and "| words | 3 | 0.5 |" in card
    assert 'load_dataset("me/weights", split="train")' in card and "int(0.7 * len(ds))" in card
    assert "WeightedRandomSampler" in card and "`weight` (float64)" in card
    assert 'row["weight"] >= 0.4)' in card  # the 30% quantile: the same cut as keeping the top 70%


def test_save_weights_dataset(table, tmp_path):
    card = render_weights_card(table, repo_id=str(tmp_path / "weighted"), description="weights")
    assert f'datasets.load_from_disk("{tmp_path / "weighted"}")' in card
    save_weights_dataset(table, tmp_path / "weighted", card)
    assert datasets.load_from_disk(str(tmp_path / "weighted"))["weight"] == table["weight"]
    assert (tmp_path / "weighted" / "README.md").read_text() == card


def test_push_uploads_the_card_then_the_data(table):
    calls = []

    def push_to_hub(self, repo_id, **kwargs):
        calls.append(("data", repo_id, kwargs["split"], kwargs["token"], len(self)))
        return mock.Mock(commit_url="https://huggingface.co/datasets/me/weights/commit/2")

    with mock.patch.object(hub, "HfApi") as api_cls, mock.patch.object(weights_dataset, "HfApi") as upload_cls, \
            mock.patch("datasets.Dataset.push_to_hub", push_to_hub):
        api_cls.return_value.create_repo.return_value = mock.Mock(repo_id="me/weights")
        upload_cls.return_value.upload_file.side_effect = lambda **kw: calls.append(
            ("card", kw["repo_id"], kw["repo_type"], kw["path_in_repo"], kw["path_or_fileobj"]))
        url = push_weights_dataset(table, "me/weights", card="---\ntags: [x]\n---\n# card\n", token="hf_x",
                                   private=True)
    assert url == "https://huggingface.co/datasets/me/weights/commit/2"
    create = api_cls.return_value.create_repo.call_args
    assert create.args == ("me/weights",) and create.kwargs["repo_type"] == "dataset" and create.kwargs["private"]
    assert calls[0][:4] == ("card", "me/weights", "dataset", "README.md") and b"# card" in calls[0][4]
    assert calls[1] == ("data", "me/weights", "train", "hf_x", 6)


def test_push_failures_are_one_line_hub_errors(table, monkeypatch):
    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(HubError, match="no Hugging Face token"):
        check_weights_repo("me/weights")
    with mock.patch.object(hub, "HfApi") as api_cls:
        api_cls.return_value.create_repo.side_effect = OSError("no route to host")
        with pytest.raises(HubError, match=r"cannot create or reach the Hub dataset repo 'me/weights'.*no route"):
            check_weights_repo("me/weights", token="hf_x")
    with mock.patch.object(hub, "HfApi") as api_cls, mock.patch.object(weights_dataset, "HfApi"), \
            mock.patch("datasets.Dataset.push_to_hub", side_effect=RuntimeError("413 too large\ndetails")):
        api_cls.return_value.create_repo.return_value = mock.Mock(repo_id="me/weights")
        with pytest.raises(HubError) as info:
            push_weights_dataset(table, "me/weights", card="# c", token="hf_x")
    assert str(info.value) == ("uploading the weighted dataset to the Hub dataset repo 'me/weights' failed: "
                               "RuntimeError: 413 too large")
