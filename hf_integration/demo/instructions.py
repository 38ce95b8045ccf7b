"""A small, deterministic instruction-tuning set with checkable short answers, and controlled response noise.

Why generated: the instruction-data example (`instruction_data_weights.py`) must run offline, and judging learned
data weights needs ground truth: which training responses are wrong. Every example is a short task whose
correct answer is computed, so it is known exactly and greedy answers can be scored by exact match.

Task families (the ``source`` column; chosen so that a small chat model can learn their clean rule, without which
no method can tell a corrupted response from a hard example), each with a plausible *wrong* answer of its own kind:

* ``arithmetic``: ``What is 23 + 4?`` -> ``27`` (wrong: off by 1 to 3);
* ``reverse``: ``Reverse the order of these words: red car sky.`` -> ``sky car red`` (wrong: the words in the
  given order or shuffled);
* ``uppercase``: ``Write 'blue sky' in capital letters.`` -> ``BLUE SKY`` (wrong: unchanged or title case);
* ``count_letters``: ``How many letters are in the word 'banana'?`` -> ``6`` (wrong: off by 1 to 3);
* ``antonym``: ``What is the opposite of 'hot'?`` -> ``cold`` (wrong: another word's opposite);
* ``plural``: ``What is the plural of 'mouse'?`` -> ``mice`` (wrong: the naive ``-s`` plural, another plural);
* ``sort``: ``Sort these numbers from smallest to largest: 14, 3, 9.`` -> ``3, 9, 14`` (wrong: another order);
* ``capital``: ``What is the capital of France?`` -> ``Paris`` (wrong: another capital).

Rows are in TRL's conversational format: ``messages`` = ``[{"role": "user", ...}, {"role": "assistant", ...}]``,
plus ``source`` (the family), ``corrupted`` (bool) and ``corruption`` (``""`` for clean rows). The training split
has ``round(noise_rate * n)`` corrupted responses (:func:`corrupt_responses`), in four kinds, as evenly as
possible: ``wrong_answer``, ``swapped`` (another example's response, of another family), ``truncated`` (the
first half of the response) and ``off_task`` (a fluent reply that ignores the task). Validation and test are
clean. The same seed gives the same rows on every machine (numpy's ``default_rng``)::

    >>> from hf_integration.demo.instructions import make_instruction_splits
    >>> splits = make_instruction_splits(num_train=400, num_validation=100, num_test=200, noise_rate=0.3, seed=0)
    >>> splits["test"][0]["messages"]
    [{'role': 'user', 'content': '...'}, {'role': 'assistant', 'content': '...'}]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import datasets
import numpy as np

__all__ = ["FAMILIES", "CORRUPTIONS", "OFF_TASK_RESPONSES", "generate", "wrong_answer", "corrupt_responses",
           "make_instruction_splits", "FEATURES"]

CORRUPTIONS = ("wrong_answer", "swapped", "truncated", "off_task")

WORDS = [
    "garden", "window", "planet", "yellow", "silver", "forest", "bridge", "candle", "rocket", "pencil",
    "orange", "guitar", "castle", "button", "dragon", "island", "basket", "anchor", "marble", "tunnel",
    "apple", "river", "cloud", "stone", "light", "music", "horse", "table", "chair", "bread",
    "water", "tiger", "lemon", "sugar", "paper", "smile", "ocean", "green", "night", "dream",
]
PHRASE_WORDS = ["blue", "sky", "red", "car", "good", "morning", "happy", "day", "big", "city", "small", "dog",
                "warm", "tea", "fast", "train", "old", "book", "cold", "rain", "new", "song", "dark", "room"]
ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "up": "down", "early": "late", "light": "dark",
    "open": "closed", "full": "empty", "strong": "weak", "rich": "poor", "old": "young", "high": "low",
    "hard": "soft", "wet": "dry", "loud": "quiet", "long": "short", "thick": "thin", "clean": "dirty",
    "true": "false", "win": "lose", "push": "pull", "buy": "sell", "begin": "end", "inside": "outside",
    "above": "below", "first": "last", "heavy": "light", "near": "far", "day": "night", "love": "hate",
    "east": "west", "north": "south", "always": "never", "before": "after", "cheap": "expensive",
}
PLURALS = {
    "mouse": "mice", "child": "children", "tooth": "teeth", "foot": "feet", "man": "men", "woman": "women",
    "goose": "geese", "person": "people", "box": "boxes", "bus": "buses", "city": "cities", "baby": "babies",
    "knife": "knives", "leaf": "leaves", "wolf": "wolves", "potato": "potatoes", "hero": "heroes",
    "church": "churches", "dish": "dishes", "fox": "foxes", "cat": "cats", "dog": "dogs", "book": "books",
    "tree": "trees", "car": "cars", "house": "houses", "girl": "girls", "boy": "boys", "key": "keys",
    "day": "days", "sheep": "sheep", "fish": "fish", "ox": "oxen", "cactus": "cacti", "wife": "wives",
}
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa", "Greece": "Athens",
    "Portugal": "Lisbon", "Austria": "Vienna", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Poland": "Warsaw", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago", "Cuba": "Havana",
    "Thailand": "Bangkok", "England": "London", "Argentina": "Buenos Aires", "Mexico": "Mexico City",
    "India": "New Delhi", "Turkey": "Ankara", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Hungary": "Budapest", "Belgium": "Brussels",
}
OFF_TASK_RESPONSES = [
    "I'm sorry, but I can't help with that request.",
    "Here is a fun fact: octopuses have three hearts.",
    "Sure! Let me know if you have any other questions.",
    "The weather today is sunny with a light breeze.",
    "As an AI language model, I do not have personal opinions.",
    "Let's talk about something else instead.",
    "Once upon a time, there was a small village by the sea.",
    "Please check the documentation for more details.",
    "That is a great question! Many people wonder about it.",
    "I love reading books on rainy afternoons.",
]


def _arithmetic(rng: np.random.Generator) -> tuple[str, str]:
    a, b = int(rng.integers(2, 30)), int(rng.integers(1, 10))
    if rng.random() < 0.5:
        return f"What is {a} + {b}? Reply with the number only.", str(a + b)
    a = max(a, b + 1)
    return f"What is {a} - {b}? Reply with the number only.", str(a - b)


def _reverse(rng: np.random.Generator) -> tuple[str, str]:
    words = [str(w) for w in rng.choice(PHRASE_WORDS, size=int(rng.integers(3, 5)), replace=False)]
    return (f"Reverse the order of these words: {' '.join(words)}. Reply with the words only.",
            " ".join(reversed(words)))


def _uppercase(rng: np.random.Generator) -> tuple[str, str]:
    i = int(rng.integers(len(PHRASE_WORDS) // 2))
    phrase = f"{PHRASE_WORDS[2 * i]} {PHRASE_WORDS[2 * i + 1]}" if rng.random() < 0.6 else \
        f"{PHRASE_WORDS[rng.integers(len(PHRASE_WORDS))]} {WORDS[rng.integers(len(WORDS))]}"
    return f"Write '{phrase}' in capital letters. Reply with the text only.", phrase.upper()


def _count_letters(rng: np.random.Generator) -> tuple[str, str]:
    word = WORDS[rng.integers(len(WORDS))]
    return f"How many letters are in the word '{word}'? Reply with the number only.", str(len(word))


def _antonym(rng: np.random.Generator) -> tuple[str, str]:
    word = list(ANTONYMS)[rng.integers(len(ANTONYMS))]
    return f"What is the opposite of '{word}'? Reply with one word.", ANTONYMS[word]


def _plural(rng: np.random.Generator) -> tuple[str, str]:
    word = list(PLURALS)[rng.integers(len(PLURALS))]
    return f"What is the plural of '{word}'? Reply with one word.", PLURALS[word]


def _sort(rng: np.random.Generator) -> tuple[str, str]:
    numbers = [int(x) for x in rng.choice(np.arange(1, 40), size=3, replace=False)]
    shown = ", ".join(map(str, numbers))
    return (f"Sort these numbers from smallest to largest: {shown}. Reply with the sorted list only.",
            ", ".join(map(str, sorted(numbers))))


def _capital(rng: np.random.Generator) -> tuple[str, str]:
    country = list(CAPITALS)[rng.integers(len(CAPITALS))]
    return f"What is the capital of {country}? Reply with the city only.", CAPITALS[country]


# family name -> generator of (question, answer)
FAMILIES: dict[str, Callable[[np.random.Generator], tuple[str, str]]] = {
    "arithmetic": _arithmetic, "reverse": _reverse, "uppercase": _uppercase, "count_letters": _count_letters,
    "antonym": _antonym, "plural": _plural, "sort": _sort, "capital": _capital,
}

FEATURES = datasets.Features({
    "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
    "source": datasets.Value("string"),
    "corrupted": datasets.Value("bool"),
    "corruption": datasets.Value("string"),
})


def generate(size: int, seed: int) -> dict[str, list]:
    """``size`` clean examples, families drawn uniformly at random, as columns (``messages``, ``source``,
    ``corrupted``, ``corruption``)."""
    rng = np.random.default_rng(seed)
    names = list(FAMILIES)
    columns: dict[str, list] = {"messages": [], "source": [], "corrupted": [], "corruption": []}
    for _ in range(size):
        family = names[rng.integers(len(names))]
        question, answer = FAMILIES[family](rng)
        columns["messages"].append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
        columns["source"].append(family)
        columns["corrupted"].append(False)
        columns["corruption"].append("")
    return columns


def wrong_answer(source: str, answer: str, rng: np.random.Generator) -> str:
    """A plausible but wrong answer of family ``source`` to a question whose correct answer is ``answer``
    (always ``!= answer``)."""
    for _ in range(20):
        if source in ("arithmetic", "count_letters"):
            offsets = [-3, -2, -1, 1, 2, 3]
            wrong = str(max(1, int(answer) + int(rng.choice(offsets))))
        elif source == "reverse":
            words = answer.split(" ")
            wrong = " ".join(reversed(words)) if rng.random() < 0.5 else " ".join(rng.permutation(words))
        elif source == "uppercase":
            wrong = answer.lower() if rng.random() < 0.5 else answer.title()
        elif source == "antonym":
            wrong = str(rng.choice(list(ANTONYMS.values())))
        elif source == "capital":
            wrong = str(rng.choice(list(CAPITALS.values())))
        elif source == "plural":
            singular = {v: k for k, v in PLURALS.items()}.get(answer, answer)
            wrong = singular + "s" if rng.random() < 0.6 else str(rng.choice(list(PLURALS.values())))
        elif source == "sort":
            numbers = answer.split(", ")
            wrong = ", ".join(reversed(numbers)) if rng.random() < 0.5 else \
                ", ".join(str(x) for x in rng.permutation(numbers))
        else:
            raise ValueError(f"unknown task family {source!r}")
        if wrong != answer:
            return wrong
    return answer + "0"  # unreachable for the families above; still wrong


def _truncate(response: str) -> str:
    """The first half of ``response`` (characters, trailing separators dropped), strictly shorter."""
    return response[: max(1, len(response) // 2)].rstrip(" ,;:")


def corrupt_responses(dataset: datasets.Dataset, rate: float, seed: int,
                      kinds: Sequence[str] = CORRUPTIONS,
                      wrong: Callable[[str, str, np.random.Generator], str] | None = None) -> datasets.Dataset:
    """Replace the final (assistant) response of ``round(rate * n)`` random rows of a ``messages`` dataset.

    The corrupted rows are split as evenly as possible among ``kinds`` (``truncated`` only goes to responses
    of at least 2 characters; a shortfall goes to the other kinds):

    * ``wrong_answer``: ``wrong(source, response, rng)`` (e.g. :func:`wrong_answer`); without ``wrong``, the
      response of another row of the same ``source`` that differs from this one (for short-answer tasks, a
      well-formed wrong answer);
    * ``swapped``: the response of another row, of another ``source`` when there are several;
    * ``truncated``: the first half of the response;
    * ``off_task``: one of :data:`OFF_TASK_RESPONSES`.

    Rows are marked in ``corrupted`` (bool) and ``corruption`` (the kind, ``""`` for clean rows); a missing
    ``source`` column counts as one source. ``rate == 0`` returns the dataset with all-clean marks added where
    missing (an existing ``corrupted`` column is kept).
    """
    unknown = [k for k in kinds if k not in CORRUPTIONS]
    if unknown or not kinds:
        raise ValueError(f"unknown corruption kinds {unknown}; choose from {CORRUPTIONS}")
    n = len(dataset)
    if rate == 0.0:
        if "corrupted" not in dataset.column_names:
            dataset = dataset.add_column("corrupted", [False] * n)
        if "corruption" not in dataset.column_names:
            dataset = dataset.add_column("corruption", ["" for _ in range(n)])
        return dataset
    rng = np.random.default_rng(seed)
    messages = dataset["messages"]
    responses = [m[-1]["content"] for m in messages]
    sources = dataset["source"] if "source" in dataset.column_names else ["all"] * n
    k = int(round(rate * n))
    order = [int(i) for i in rng.permutation(n)]
    counts = dict(zip(kinds, [k // len(kinds) + (1 if j < k % len(kinds) else 0) for j in range(len(kinds))]))
    assigned: dict[int, str] = {}
    # constrained kinds first, so that the others do not use up the rows they need
    for kind in sorted(kinds, key=lambda kind: kind != "truncated"):
        eligible = [i for i in order if i not in assigned and (kind != "truncated" or len(responses[i]) >= 2)]
        missing = counts[kind] - min(counts[kind], len(eligible))
        for i in eligible[: counts[kind]]:
            assigned[i] = kind
        if missing:  # hand the shortfall to the kinds not yet assigned
            rest = [x for x in kinds if x != kind]
            for j in range(missing):
                counts[rest[j % len(rest)]] += 1
    new_messages, corrupted, corruption = [], [], []
    for i in range(n):
        kind = assigned.get(i, "")
        response = responses[i]
        if kind == "wrong_answer":
            if wrong is not None:
                response = wrong(sources[i], response, rng)
            else:
                pool = [j for j in range(n) if sources[j] == sources[i] and responses[j] != response]
                response = responses[pool[rng.integers(len(pool))]] if pool else _truncate(response) + "?"
        elif kind == "swapped":
            pool = [j for j in range(n) if sources[j] != sources[i]] or \
                   [j for j in range(n) if responses[j] != response]
            response = responses[pool[rng.integers(len(pool))]] if pool else OFF_TASK_RESPONSES[0]
        elif kind == "truncated":
            response = _truncate(response)
        elif kind == "off_task":
            response = OFF_TASK_RESPONSES[rng.integers(len(OFF_TASK_RESPONSES))]
        row = [dict(m) for m in messages[i]]
        row[-1] = {**row[-1], "content": response}
        new_messages.append(row)
        corrupted.append(bool(kind))
        corruption.append(kind)
    dataset = dataset.remove_columns([c for c in ("messages", "corrupted", "corruption") if c in dataset.column_names])
    return dataset.add_column("messages", new_messages).add_column("corrupted", corrupted) \
        .add_column("corruption", corruption)


def make_instruction_splits(num_train: int = 400, num_validation: int = 100, num_test: int = 200,
                            noise_rate: float = 0.3, seed: int = 0) -> datasets.DatasetDict:
    """Train / validation / test splits drawn with independent seeds; ``noise_rate`` of the training responses
    corrupted (:func:`corrupt_responses` with family-specific wrong answers), validation and test clean."""
    splits = {}
    for offset, (role, size) in enumerate((("train", num_train), ("validation", num_validation),
                                           ("test", num_test))):
        splits[role] = datasets.Dataset.from_dict(generate(size, seed * 1000 + offset), features=FEATURES)
    if noise_rate > 0:
        corrupted = corrupt_responses(splits["train"], noise_rate, seed, wrong=wrong_answer)
        splits["train"] = corrupted.select_columns(list(FEATURES)).cast(FEATURES)
    return datasets.DatasetDict(splits)
