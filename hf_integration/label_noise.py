"""Label noise on purpose, for controlled experiments on learned data weights: random flips and the confusable ones.

* ``"symmetric"``: ``round(rate * n)`` random examples get another class, uniformly among the others.
* ``"pairwise"``: the same examples get the next class, ``c -> (c + 1) mod K`` (systematic confusion between
  neighbouring classes).
* ``"confusable"``: instance-dependent noise, as annotators make it: the flipped examples are the ``round(rate * n)``
  that a cheap model finds most confusable, each flipped to that model's likeliest wrong class. The model is TF-IDF
  features and a logistic regression, cross-validated on the clean training labels (each example is judged by a model
  that did not see it); an example's confusability is the largest probability it gives a wrong class,
  ``max_{c != y} p(c | x)``. Random flips pick examples at random, which a pretrained model resists far better; this
  noise lands where the classes are hard to tell apart, so a hard-but-right example and a flipped one look alike.

Every kind marks the flipped examples in a boolean ``corrupted`` column (the ground truth a learned weighting is judged
against) and is deterministic for a given ``seed``.
"""

from __future__ import annotations

import datasets
import numpy as np

__all__ = ["NOISE_TYPES", "flip_labels", "confusable_flips"]

NOISE_TYPES = ("symmetric", "pairwise", "confusable")
_FOLDS = 5


def confusable_flips(texts: list[str], labels: np.ndarray, num_labels: int, count: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` most confusable examples and the class each is flipped to (see the module docstring).

    Returns ``(flipped, new_labels)``: a boolean mask over the examples and every example's label afterwards.
    Ties in confusability are broken by a permutation drawn from ``seed``.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    labels = np.asarray(labels, dtype=np.int64)
    smallest = np.bincount(labels, minlength=num_labels)
    smallest = int(smallest[smallest > 0].min())
    if smallest < 2:
        raise ValueError("confusable noise needs at least 2 training examples of every class present (a "
                         "cross-validated model judges each example)")
    features = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2)).fit_transform(texts)
    folds = StratifiedKFold(n_splits=min(_FOLDS, smallest), shuffle=True, random_state=seed)
    present = np.unique(labels)
    proba = np.zeros((len(labels), num_labels))
    proba[:, present] = cross_val_predict(LogisticRegression(max_iter=2000), features, labels, cv=folds,
                                          method="predict_proba")
    wrong = proba.copy()
    wrong[np.arange(len(labels)), labels] = -np.inf
    confusability = wrong.max(axis=1)
    tie_break = np.random.default_rng(seed).permutation(len(labels))
    order = np.lexsort((tie_break, -confusability))  # most confusable first; ties in the seeded order
    flipped = np.zeros(len(labels), dtype=bool)
    flipped[order[:count]] = True
    return flipped, np.where(flipped, wrong.argmax(axis=1), labels)


def flip_labels(dataset: datasets.Dataset, rate: float, num_labels: int, seed: int,
                noise_type: str = "symmetric", text_columns: tuple[str, ...] = ("text", "text_pair")
                ) -> datasets.Dataset:
    """Replace the label of ``round(rate * n)`` examples by another class, by ``noise_type`` (one of
    :data:`NOISE_TYPES`; ``"confusable"`` reads the ``text_columns`` present, joined).

    The flipped examples are marked ``True`` in a boolean ``corrupted`` column (ground truth for judging learned
    data weights). ``rate == 0`` leaves the labels alone and keeps an existing ``corrupted`` column, else adds an
    all-``False`` one.
    """
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {noise_type!r}")
    n = len(dataset)
    if rate == 0.0:
        if "corrupted" in dataset.column_names:
            return dataset
        return dataset.add_column("corrupted", [False] * n)
    labels = np.asarray(dataset["labels"])
    count = int(round(rate * n))
    if noise_type == "confusable":
        columns = [c for c in text_columns if c in dataset.column_names]
        if not columns:
            raise ValueError(f"noise_type='confusable' reads the text, but the dataset has none of the columns "
                             f"{text_columns}")
        texts = [" ".join(str(part) for part in parts if part) for parts in zip(*(dataset[c] for c in columns))]
        flipped, new_labels = confusable_flips(texts, labels, num_labels, count, seed)
    else:
        rng = np.random.default_rng(seed)
        flipped = np.zeros(n, dtype=bool)
        flipped[rng.permutation(n)[:count]] = True
        shift = rng.integers(1, num_labels, size=n)  # a different class, uniformly among the others
        if noise_type == "pairwise":
            shift = np.ones(n, dtype=np.int64)
        new_labels = np.where(flipped, (labels + shift) % num_labels, labels)
    if "corrupted" in dataset.column_names:
        dataset = dataset.remove_columns("corrupted")
    features = dataset.features
    dataset = dataset.remove_columns("labels").add_column("labels", new_labels.tolist())
    dataset = dataset.cast_column("labels", features["labels"])
    return dataset.add_column("corrupted", flipped.tolist())
