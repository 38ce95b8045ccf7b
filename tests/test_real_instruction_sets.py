"""Tests of ``benchmarks/real_instruction_sets.py``: answers cut to one sentence of prose, and splits that share no
question, drawn deterministically; a small build of ``scipy_qa`` from the installed scipy."""

from __future__ import annotations

import pytest
from repo_scripts import load

ris = load("benchmarks/real_instruction_sets.py")


def test_answers_are_one_sentence_of_prose():
    assert ris.first_sentence("compute the mean, e.g. of an array. Then more.") == "Compute the mean, e.g. of an array."
    assert ris.first_sentence("Tile-based solitaire game") == "Tile-based solitaire game."
    assert ris.first_sentence("Too short.") is None  # fewer than 3 words
    assert ris.first_sentence("x = a + b * (c - d) / e ** 2 + 1.") is None  # a formula, not prose


def test_splits_share_no_question_and_depend_only_on_the_seed(monkeypatch):
    pairs = [(f"What is {i}?", f"It is the number {i}.", "even" if i % 2 else "odd") for i in range(30)]
    monkeypatch.setitem(ris.PAIRS, "scipy_qa", lambda: list(pairs))
    sizes = {"train": 12, "validation": 6, "test": 6}
    splits = ris.build_splits("scipy_qa", seed=1, sizes=sizes)
    questions = [row["messages"][0]["content"] for rows in splits.values() for row in rows]
    assert {s: len(r) for s, r in splits.items()} == sizes and len(set(questions)) == 24
    row = splits["train"][0]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"] and row["source"] in {"even", "odd"}
    assert ris.build_splits("scipy_qa", seed=1, sizes=sizes) == splits != ris.build_splits("scipy_qa", 2, sizes)
    with pytest.raises(ValueError, match="has 30 questions on this machine, fewer than the 31"):
        ris.build_splits("scipy_qa", sizes={"train": 20, "validation": 6, "test": 5})


def test_scipy_qa_builds_from_the_installed_scipy():
    splits = ris.build_splits("scipy_qa", sizes={"train": 20, "validation": 5, "test": 5})
    answers = [row["messages"][1]["content"] for row in splits["train"]]
    assert all(a.endswith(".") and ris.MIN_WORDS <= len(a.split()) <= ris.MAX_WORDS for a in answers)
    assert all(row["messages"][0]["content"].startswith("What does `scipy.") for row in splits["train"])
