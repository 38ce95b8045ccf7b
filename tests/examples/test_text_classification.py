"""The shared data helpers of the examples: the generated dataset, loading by `--dataset_name` (a local
folder stands in for a Hub dataset, offline), label encoding, label noise."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from hf_integration.classification import DataArguments, load_splits
from hf_integration.demo.sentiment import NEGATIVE_WORDS, POSITIVE_WORDS, make_splits
from hf_integration.label_noise import flip_labels
from hf_integration.runs import InputError

from .script_utils import write_csv


def test_generated_data_is_deterministic_balanced_and_follows_the_rule():
    first, second = make_splits(300, 50, 50, seed=3), make_splits(300, 50, 50, seed=3)
    assert first["train"]["text"] == second["train"]["text"]
    assert first["train"]["text"] != make_splits(300, 50, 50, seed=4)["train"]["text"]
    assert first["train"].features["label"].names == ["negative", "positive"]
    labels = np.array(first["train"]["label"])
    assert 0.4 < labels.mean() < 0.6
    for text, label in zip(first["train"]["text"], labels):
        words = set(text.replace(",", " ").replace(".", " ").replace("!", " ").replace(";", " ").split())
        assert (words & set(POSITIVE_WORDS if label else NEGATIVE_WORDS)) and \
            not (words & set(NEGATIVE_WORDS if label else POSITIVE_WORDS))


def test_dataset_name_with_split_slices(tmp_path):
    rows = [(f"great film {i}", "pos") for i in range(6)] + [(f"dull film {i}", "neg") for i in range(6)]
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_csv(folder / "train.csv", rows)
    write_csv(folder / "test.csv", rows[:4] + rows[-4:])
    splits = load_splits(DataArguments(dataset_name=str(folder), train_split="train[:75%]",
                                       validation_split="train[75%:]", test_split="test"))
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (9, 3, 8)
    assert splits.label_names == ["neg", "pos"]
    assert splits.train.column_names == ["text", "labels"]
    assert splits.split_names["validation"] == "--validation_split 'train[75%:]'"


def test_unknown_split_names_the_argument(tmp_path):
    folder = tmp_path / "only_train"
    folder.mkdir()
    write_csv(folder / "train.csv", [("good", "pos"), ("bad", "neg")])
    with pytest.raises(InputError, match=r"--validation_split 'validation' cannot be loaded .*Unknown split"):
        load_splits(DataArguments(dataset_name=str(folder)))


def test_subsets_are_seeded_random_not_prefixes(tmp_path):
    rows = [(f"great film {i}", "pos") for i in range(50)] + [(f"dull film {i}", "neg") for i in range(50)]
    splits = load_splits(DataArguments(train_file=write_csv(tmp_path / "train.csv", rows),
                                       validation_file=write_csv(tmp_path / "val.csv", rows), max_train_samples=20))
    assert len(splits.train) == 20 and 0 < np.mean(splits.train["labels"]) < 1  # sorted file, both classes


def test_flip_labels_flips_the_requested_fraction():
    dataset = make_splits(200, 1, 1, seed=0)["train"].rename_column("label", "labels")
    noisy = flip_labels(dataset, 0.25, num_labels=2, seed=1)
    flipped = np.array(noisy["corrupted"])
    assert flipped.sum() == 50
    changed = np.array(noisy["labels"]) != np.array(dataset["labels"])
    np.testing.assert_array_equal(changed, flipped)
    assert noisy.features["labels"] == dataset.features["labels"]
    clean = flip_labels(dataset, 0.0, num_labels=2, seed=1)
    assert not any(clean["corrupted"]) and clean["labels"] == dataset["labels"]


def test_pairwise_noise_moves_each_corrupted_label_to_the_next_class():
    dataset = datasets.Dataset.from_dict({"text": ["t"] * 90, "labels": [i % 3 for i in range(90)]}).cast_column(
        "labels", datasets.ClassLabel(names=["a", "b", "c"]))
    noisy = flip_labels(dataset, 0.4, num_labels=3, seed=0, noise_type="pairwise")
    flipped = np.array(noisy["corrupted"])
    assert flipped.sum() == 36
    before, after = np.array(dataset["labels"]), np.array(noisy["labels"])
    np.testing.assert_array_equal(after[flipped], (before[flipped] + 1) % 3)
    np.testing.assert_array_equal(after[~flipped], before[~flipped])
    # the same examples are corrupted as with symmetric noise of the same seed
    assert noisy["corrupted"] == flip_labels(dataset, 0.4, num_labels=3, seed=0)["corrupted"]
    with pytest.raises(ValueError, match="noise_type must be one of"):
        flip_labels(dataset, 0.4, num_labels=3, seed=0, noise_type="nope")


def test_bad_noise_type_names_the_argument():
    with pytest.raises(InputError, match=r"--noise_type must be one of \('symmetric', 'pairwise', 'confusable'\)"):
        DataArguments(noise_type="uniform")


def _topic_set(seed: int = 0) -> datasets.Dataset:
    """Three topics of distinct words; the last 5 rows of each topic also hold words of the next topic (the
    confusable ones)."""
    vocab = [[f"{topic}{i}" for i in range(12)] for topic in ("sun", "rain", "snow")]
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for label in range(3):
        for row in range(30):
            words = list(rng.choice(vocab[label], 6))
            if row >= 25:  # as many words of the next topic: a cheap model cannot tell
                words += list(rng.choice(vocab[(label + 1) % 3], 6))
            texts.append(" ".join(words))
            labels.append(label)
    return datasets.Dataset.from_dict({"text": texts, "labels": labels}).cast_column(
        "labels", datasets.ClassLabel(names=["sun", "rain", "snow"]))


def test_confusable_noise_flips_the_ambiguous_examples_to_their_likeliest_wrong_class():
    dataset = _topic_set()
    noisy = flip_labels(dataset, 1 / 6, num_labels=3, seed=0, noise_type="confusable")
    flipped = np.array(noisy["corrupted"])
    ambiguous = np.array([row % 30 >= 25 for row in range(90)])
    assert flipped.sum() == 15
    np.testing.assert_array_equal(flipped, ambiguous)  # the mixed rows, not random ones
    before, after = np.array(dataset["labels"]), np.array(noisy["labels"])
    np.testing.assert_array_equal(after[flipped], (before[flipped] + 1) % 3)  # to the topic they also speak of
    np.testing.assert_array_equal(after[~flipped], before[~flipped])
    assert noisy["labels"] == flip_labels(dataset, 1 / 6, num_labels=3, seed=0, noise_type="confusable")["labels"]
    assert noisy.features["labels"] == dataset.features["labels"]


def test_confusable_noise_refuses_what_it_cannot_judge():
    dataset = _topic_set()
    with pytest.raises(ValueError, match="has none of the columns"):
        flip_labels(dataset.rename_column("text", "body"), 0.2, num_labels=3, seed=0, noise_type="confusable")
    lonely = dataset.select([*range(89), 89]).select(list(range(60)) + [60])  # one example of the third class
    with pytest.raises(ValueError, match="at least 2 training examples of every class"):
        flip_labels(lonely, 0.2, num_labels=3, seed=0, noise_type="confusable")
