"""A small, deterministic, sentiment-like text-classification dataset generated from word lists.

Why generated: the examples must run offline (no dataset download), and a controlled data-reweighting
experiment needs a task whose *clean* labelling rule a small pretrained encoder learns in a few dozen
steps; otherwise no method can tell corrupted labels from hard examples.

Each sentence is built from a template holding one or two opinion words of the same polarity among neutral
words (a subject such as "the soundtrack", a neutral clause such as "we went on a tuesday"). The label
rule is clean and lexical: ``1`` ("positive") when the opinion words are positive, ``0`` ("negative")
otherwise. The same seed gives the same sentences on every machine (numpy's ``default_rng``).

    >>> from hf_integration.demo.sentiment import make_splits
    >>> splits = make_splits(num_train=600, num_validation=200, num_test=400, seed=0)
    >>> splits["train"][:3]
    {'text': ['what a pleasant movie!', 'we arrived a bit early, and the staff was ugly.',
              'honestly, the show is pleasant and terrific.'], 'label': [1, 0, 1]}
"""

from __future__ import annotations

import datasets
import numpy as np

__all__ = ["POSITIVE_WORDS", "NEGATIVE_WORDS", "LABEL_NAMES", "generate", "make_splits"]

LABEL_NAMES = ["negative", "positive"]

POSITIVE_WORDS = [
    "great", "excellent", "wonderful", "delightful", "superb", "fantastic", "brilliant", "lovely",
    "charming", "enjoyable", "pleasant", "terrific", "amazing", "outstanding", "beautiful", "impressive",
    "perfect", "marvelous", "splendid", "fun",
]
NEGATIVE_WORDS = [
    "awful", "terrible", "dreadful", "boring", "dull", "horrible", "disappointing", "bad", "poor",
    "tedious", "mediocre", "annoying", "painful", "bland", "clumsy", "ugly", "lifeless", "messy",
    "forgettable", "unbearable",
]
SUBJECTS = [
    "the movie", "the film", "the plot", "the acting", "the soundtrack", "the ending", "the dialogue",
    "the cast", "the story", "the script", "the book", "the restaurant", "the food", "the service",
    "the hotel", "the staff", "the camera", "the phone", "the concert", "the game", "the show",
    "the album", "the trip", "the room", "the coffee",
]
NOUNS = ["movie", "meal", "evening", "experience", "book", "show", "product", "place", "trip", "concert"]
CLAUSES = [
    "we went on a tuesday", "it lasted about two hours", "my sister came along", "the tickets were cheap",
    "it was raining outside", "we sat near the back", "i read the reviews first", "it opened last week",
    "we arrived a bit early", "i had heard a lot about it", "the place was quite full",
    "it was my first time",
]
TEMPLATES = [
    "{subj} was {a}.",
    "i found {subj} {a}.",
    "honestly, {subj} is {a} and {b}.",
    "what {an} {a} {noun}!",
    "{subj} felt {a}, {clause}.",
    "{clause}, and {subj} was {a}.",
    "my friends thought {subj} was {a}.",
    "overall {an} {a} {noun}; {subj} was {b}.",
    "{subj} turned out {a}.",
    "in short, {a}.",
]


def generate(num_examples: int, seed: int) -> dict[str, list]:
    """``num_examples`` sentences with balanced random labels, as ``{"text": [...], "label": [...]}``."""
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(num_examples):
        label = int(rng.integers(0, 2))
        words = POSITIVE_WORDS if label == 1 else NEGATIVE_WORDS
        a, b = rng.choice(len(words), size=2, replace=False)
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        texts.append(template.format(
            subj=SUBJECTS[int(rng.integers(len(SUBJECTS)))], a=words[a], b=words[b],
            an="an" if words[a][0] in "aeiou" else "a",
            noun=NOUNS[int(rng.integers(len(NOUNS)))], clause=CLAUSES[int(rng.integers(len(CLAUSES)))],
        ))
        labels.append(label)
    return {"text": texts, "label": labels}


def make_splits(num_train: int, num_validation: int, num_test: int, seed: int = 0) -> datasets.DatasetDict:
    """Clean ``train`` / ``validation`` / ``test`` splits (independent draws: seeds ``seed``, ``seed+1``, ``seed+2``).

    The ``label`` column is a ``ClassLabel(names=["negative", "positive"])``. Label noise, when wanted, is
    added by the caller (the data-reweighting example flips a fraction of the training labels and records
    which in a ``corrupted`` column).
    """
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=LABEL_NAMES)})
    sizes = {"train": num_train, "validation": num_validation, "test": num_test}
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict(generate(size, seed + offset), features=features)
        for offset, (split, size) in enumerate(sizes.items())
    })
