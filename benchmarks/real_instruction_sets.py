#!/usr/bin/env python
"""Real instruction sets built offline, for the instruction job's benchmark: questions about real objects, each
answered by one free-form sentence that the object's own authors wrote.

``scipy_qa``
    "What does `scipy.<module>.<name>` do?", answered by the first sentence of the summary of that public function's
    or class's docstring (written by SciPy's developers; e.g. "Compute the arithmetic mean along the specified
    axis."). The source of a row is the subpackage (the labels of ``real_text_sets.py``'s ``scipy_docs``).
``debian_qa``
    "What is the Debian package `<name>` for?", answered by the package's synopsis as a sentence (written by its
    maintainer; e.g. "Arcade game with falling blocks."). The source is the archive section (``debian_packages``'
    labels). Built from this machine's apt lists, as ``debian_packages`` is.

Answers differ in length and style between the two (SciPy's imperative summaries of 5-20 words, Debian's noun
phrases of 3-8), and none is generated from a template. Objects and packages are drawn without replacement, so the
splits share no question. Rows are TRL's conversational format (``messages``: the user's question, the assistant's
answer) with a ``source`` column; the instruction job corrupts training responses only on request
(``--noise_rate 0.3``: a wrong answer, i.e. another answer of the same source; another row's answer; a truncated one;
an off-task reply).

Usage::

    python benchmarks/real_instruction_sets.py scipy_qa --out_dir data/scipy_qa [--seed 0] [--train 400]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import random
import runpy
import warnings
from collections.abc import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
SETS = ("scipy_qa", "debian_qa")
SPLITS = ("train", "validation", "test")
DEFAULT_SIZES = {"train": 400, "validation": 100, "test": 200}  # the embedded instruction set's
MIN_WORDS, MAX_WORDS = 3, 40


@functools.lru_cache(maxsize=1)
def _text_sets() -> dict:
    """The globals of ``real_text_sets.py`` (its docstring readers, sentence ends and apt-list readers)."""
    return runpy.run_path(os.path.join(HERE, "real_text_sets.py"))


def first_sentence(text: str) -> str | None:
    """The first sentence of ``text``, capitalized and ending in a period; ``None`` when it is not prose of
    :data:`MIN_WORDS` to :data:`MAX_WORDS` words (a formula, a fragment, a paragraph without a sentence end)."""
    text_sets = _text_sets()
    text = " ".join(text.split())
    ends = [m.end() for m in text_sets["_SENTENCE_END"].finditer(text) if text_sets["_is_sentence_end"](text, m.end())]
    sentence = (text[: ends[0]] if ends else text).strip()
    if not sentence.endswith((".", "!", "?")):
        sentence += "."
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS or sum(c.isalpha() for c in sentence) < 0.6 * len(sentence):
        return None
    return sentence[0].upper() + sentence[1:]


def scipy_pairs() -> list[tuple[str, str, str]]:
    """``(question, answer, source)`` for every public SciPy object (no methods) whose summary is a sentence."""
    text_sets = _text_sets()
    pairs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        docs = text_sets["_scipy_docs"](text_sets["SCIPY_CLASSES"], methods=False)
    seen = set()
    for doc in docs:
        summary = doc.sections[0][0] if doc.sections and doc.sections[0] else ""
        answer = first_sentence(summary)
        if answer is None or doc.group in seen:
            continue
        seen.add(doc.group)
        pairs.append((f"What does `{doc.group}` do?", answer, doc.label))
    return pairs


def debian_pairs() -> list[tuple[str, str, str]]:
    """``(question, answer, source)`` for every usable Debian source package of this machine's apt lists."""
    text_sets = _text_sets()
    pairs = []
    for example in text_sets["debian_examples"]():
        answer = first_sentence(example.text)
        if answer is not None:
            pairs.append((f"What is the Debian package `{example.group}` for?", answer, example.label))
    return pairs


PAIRS = {"scipy_qa": scipy_pairs, "debian_qa": debian_pairs}


def build_splits(name: str, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """Disjoint train/validation/test lists of ``{"messages", "source"}`` rows for set ``name``, drawn with ``seed``
    (one question per object or package; deterministic for the installed scipy / the apt lists)."""
    if name not in PAIRS:
        raise ValueError(f"unknown set {name!r}; choose from {SETS}")
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    pairs = sorted(set(PAIRS[name]()))
    if sum(sizes.values()) > len(pairs):
        raise ValueError(f"{name} has {len(pairs)} questions on this machine, fewer than the {sum(sizes.values())} "
                         f"the splits {sizes} need")
    random.Random(f"{name}:{seed}").shuffle(pairs)
    splits, start = {}, 0
    for split in SPLITS:
        chosen = pairs[start:start + sizes[split]]
        start += sizes[split]
        splits[split] = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                          "source": s} for q, a, s in chosen]
    return splits


def write_splits(name: str, out_dir: str, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, str]:
    """Build set ``name`` and write ``{train,validation,test}.jsonl`` and ``info.json`` (atomically)."""
    from hf_integration.atomic_files import atomic_write_text

    splits = build_splits(name, seed, sizes)
    os.makedirs(out_dir, exist_ok=True)
    paths, digests = {}, {}
    for split, rows in splits.items():
        content = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        paths[split] = os.path.join(out_dir, f"{split}.jsonl")
        atomic_write_text(paths[split], content)
        digests[split] = hashlib.sha256(content.encode()).hexdigest()
    words = [len(row["messages"][1]["content"].split()) for rows in splits.values() for row in rows]
    info = {"name": name, "seed": seed, "sizes": {s: len(r) for s, r in splits.items()}, "sha256": digests,
            "answer_words_median": sorted(words)[len(words) // 2],
            "sources": sorted({row["source"] for rows in splits.values() for row in rows})}
    paths["info"] = os.path.join(out_dir, "info.json")
    atomic_write_text(paths["info"], json.dumps(info, indent=2) + "\n")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=SETS)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    for split in SPLITS:
        parser.add_argument(f"--{split}", type=int, default=None,
                            help=f"size of {split} (default {DEFAULT_SIZES[split]})")
    args = parser.parse_args(argv)
    sizes = {split: getattr(args, split) for split in SPLITS if getattr(args, split) is not None}
    try:
        paths = write_splits(args.name, args.out_dir, args.seed, sizes)
    except (ValueError, RuntimeError) as error:
        parser.exit(2, f"error: {error}\n")
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
