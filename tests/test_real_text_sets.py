"""Tests of ``benchmarks/real_text_sets.py``: the docstring and apt-list parsers on inline strings, and
small builds of ``scipy_docs`` (always) and ``debian_packages`` (where apt has package lists)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections import Counter

import pytest
from repo_scripts import ROOT, load

rts = load("benchmarks/real_text_sets.py")
BENCHMARKS = str(ROOT / "benchmarks")

SMALL = {"train": 60, "validation": 30, "test": 60}

NUMPYDOC = '''spam(x, y, /, out=None)

    Compute the ``spam`` transform of `x`.

    The transform is defined as:

    .. math::

        S(x) = \\sum_k x_k

    It was introduced by Smith [1]_ and is used in
    :ref:`signal processing <tutorial>`, e.g. for filters.

    .. versionadded:: 1.2.0

    Parameters
    ----------
    x : array_like
        Input data.
    y : int
        Another input.

    Returns
    -------
    out : ndarray
        The transformed data.

    Notes
    -----
    The cost is linear in the size of the input. See *Smith* for details.

    In general

    .. math::

        S(0) = 0

    where the sum is empty.

    - a list item
    - another item

    Examples
    --------
    This computes the transform.

    >>> spam([1, 2])
    3

    References
    ----------
    .. [1] J. Smith, "Spam", 1999.
    '''


# --------------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------------

def test_docstring_prose_keeps_only_prose():
    summary, notes = rts.docstring_prose(NUMPYDOC)
    assert summary == [
        "Compute the spam transform of x.",
        "It was introduced by Smith and is used in signal processing, e.g. for filters.",
    ]
    assert notes == ["The cost is linear in the size of the input. See Smith for details."]
    assert rts.docstring_prose(NUMPYDOC, sections=()) == [summary]


def test_split_sections_names_numpydoc_sections():
    names = [name for name, _ in rts.split_sections(NUMPYDOC)]
    assert names == ["", "parameters", "returns", "notes", "examples", "references"]


def test_summary_without_full_stop_gets_one():
    doc = "Odd Mathieu function and its derivative\n\nReturns the odd Mathieu function of order m."
    assert rts.docstring_prose(doc) == [["Odd Mathieu function and its derivative.",
                                         "Returns the odd Mathieu function of order m."]]


def test_join_and_truncate():
    assert rts.join_short_paragraphs(["A beta variable", "The beta distribution is flexible.", "Another one."],
                                     short=40) == ["A beta variable. The beta distribution is flexible.",
                                                   "Another one."]
    text = "First sentence is here. Second one, e.g. with an abbreviation, goes on. Third sentence."
    assert rts.truncate_at_sentence(text, 75) == "First sentence is here. Second one, e.g. with an abbreviation, goes on."
    assert rts.truncate_at_sentence(text, 30) == "First sentence is here."
    assert rts.truncate_at_sentence("no sentence end in this long text", 20) == "no sentence end in"


PACKAGES = """Package: foo-game
Source: foo (1.0-1)
Version: 1.0-1
Description: Fast arcade game
 Foo is a fast arcade game
 with lasers.
 .
 It has many levels.
Tag: game::arcade,
 use::gameplaying
Section: contrib/games

Package: foo-game-dev
Source: foo
Description: Fast arcade game (development files)
Section: libdevel

Package: bar
Description: transitional package for baz
Section: games

Package: synth
Description-md5: 0123abcd
Description: Modular software synthesizer
Section: non-free/sound
"""


def test_parse_stanzas_and_description():
    records = list(rts.parse_stanzas(PACKAGES))
    assert [r["Package"] for r in records] == ["foo-game", "foo-game-dev", "bar", "synth"]
    assert records[0]["Tag"] == "game::arcade,\n use::gameplaying"
    assert rts.parse_description(records[0]["Description"]) == (
        "Fast arcade game", ["Foo is a fast arcade game with lasers.", "It has many levels."])
    assert rts.section_of(records[0]) == "games" and rts.section_of(records[3]) == "sound"
    assert rts.source_of(records[0]) == "foo" and rts.source_of(records[2]) == "bar"


def test_debian_examples_from_records():
    records = list(rts.parse_stanzas(PACKAGES))
    translations = {"0123abcd": "Modular software synthesizer\n Synth makes sounds.\n .\n More."}
    examples = rts.debian_examples_from_records(records, ("games", "sound"), translations)
    assert [(e.label, e.group, e.text) for e in examples] == [
        ("games", "foo", "Fast arcade game. Foo is a fast arcade game with lasers."),
        ("sound", "synth", "Modular software synthesizer. Synth makes sounds."),
    ]
    same_text = PACKAGES + "\nPackage: qux\nDescription: Fast arcade game\n Foo is a fast arcade game\n with lasers.\n" \
                           "Section: sound\n"
    examples = rts.debian_examples_from_records(rts.parse_stanzas(same_text), ("games", "sound"))
    assert [e.group for e in examples] == ["synth"]  # a text under two labels is dropped


def test_empty_apt_lists_say_to_run_apt_get_update(monkeypatch):
    monkeypatch.setattr(rts.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "", ""))
    with pytest.raises(RuntimeError, match="apt-get update"):
        rts.apt_dumpavail()


def test_long_descriptions_from_translation_file(tmp_path):
    path = tmp_path / "deb.debian.org_debian_dists_bookworm_main_i18n_Translation-en"
    path.write_text("Package: synth\nDescription-md5: 0123abcd\nDescription-en: Synth\n Long text.\n")
    assert rts.translation_files(str(tmp_path)) == [str(path)]
    assert rts.long_descriptions([str(path)]) == {"0123abcd": "Synth\n Long text."}


# --------------------------------------------------------------------------------------------------
# scipy_docs
# --------------------------------------------------------------------------------------------------

def _check_splits(splits, classes, sizes, min_chars):
    assert set(splits) == set(rts.SPLITS)
    texts = {split: [row["text"] for row in rows] for split, rows in splits.items()}
    for split, rows in splits.items():
        assert len(rows) == sizes[split]
        assert all(set(row) == {"text", "label"} for row in rows)
        counts = Counter(row["label"] for row in rows)
        assert set(counts) == set(classes)
        assert max(counts.values()) - min(counts.values()) <= 1
        assert len(set(texts[split])) == len(texts[split])
        assert all(min_chars <= len(text) <= rts.MAX_CHARS for text in texts[split])
        assert not any(">>>" in text for text in texts[split])
    assert not set(texts["train"]) & set(texts["validation"])
    assert not set(texts["train"]) & set(texts["test"])
    assert not set(texts["validation"]) & set(texts["test"])


def test_scipy_docs_splits():
    splits = rts.build_splits("scipy_docs", seed=0, sizes=SMALL)
    _check_splits(splits, rts.SCIPY_CLASSES, SMALL, rts.SCIPY_MIN_CHARS)
    assert splits == rts.build_splits("scipy_docs", seed=0, sizes=SMALL)
    assert splits != rts.build_splits("scipy_docs", seed=1, sizes=SMALL)
    assert not any(row["text"].startswith(".. ") for rows in splits.values() for row in rows)


def test_scipy_docs_shrinks_when_a_class_is_short(caplog):
    available = Counter(e.label for e in rts.load_examples("scipy_docs"))
    big = {"train": 6 * max(available.values()), "validation": 60, "test": 60}
    with caplog.at_level(logging.WARNING, logger="real_text_sets"):
        splits = rts.build_splits("scipy_docs", sizes=big)
    assert "shrinking" in caplog.text
    total = sum(len(rows) for rows in splits.values())
    assert total <= 6 * min(available.values())
    assert len(splits["train"]) / len(splits["test"]) == pytest.approx(big["train"] / big["test"], rel=0.05)
    for rows in splits.values():
        counts = Counter(row["label"] for row in rows)
        assert max(counts.values()) - min(counts.values()) <= 1


@pytest.mark.parametrize("name,sizes", [("nope", None), ("scipy_docs", {"train": 0}), ("scipy_docs", {"dev": 5}),
                                        ("scipy_docs", {"test": 2})])
def test_build_splits_rejects_bad_requests(name, sizes):
    with pytest.raises(ValueError):
        rts.build_splits(name, sizes=sizes)


def test_write_splits(tmp_path):
    out = tmp_path / "scipy_docs"
    paths = rts.write_splits("scipy_docs", str(out), seed=3, sizes=SMALL)
    assert set(paths) == {*rts.SPLITS, "info", "readme"}
    assert sorted(os.listdir(out)) == ["README.md", "info.json", "test.jsonl", "train.jsonl", "validation.jsonl"]
    with open(paths["train"], encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    assert rows == rts.build_splits("scipy_docs", seed=3, sizes=SMALL)["train"]
    with open(paths["info"], encoding="utf-8") as handle:
        info = json.load(handle)
    assert info["split_sizes"] == SMALL and info["seed"] == 3 and info["scipy_version"]
    assert set(info["available_per_class"]) == set(rts.SCIPY_CLASSES)


# --------------------------------------------------------------------------------------------------
# debian_packages
# --------------------------------------------------------------------------------------------------

def _apt_lists_available() -> bool:
    try:
        result = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return False
    return result.returncode == 0 and "Package:" in result.stdout


@pytest.mark.skipif(not _apt_lists_available(),
                    reason="`apt-cache dumpavail` is unavailable or empty (no apt, or no `apt-get update` yet)")
def test_debian_packages_splits():
    splits = rts.build_splits("debian_packages", seed=0, sizes=SMALL)
    _check_splits(splits, rts.DEBIAN_CLASSES, SMALL, rts.DEBIAN_MIN_CHARS)
    assert splits == rts.build_splits("debian_packages", seed=0, sizes=SMALL)
    assert not any("transitional" in row["text"].lower() for rows in splits.values() for row in rows)
