"""The README's "use it in your own script" section is `examples/bilevel_in_your_script.py`, verbatim, and it runs: a
`Trainer` script becomes a data-weighting one with the recipe switched on and the weights exported."""

from __future__ import annotations

import json
import re
import runpy
import sys

import datasets
import numpy as np
from repo_scripts import ROOT

from hf_integration import LossWeights

SCRIPT = ROOT / "examples" / "bilevel_in_your_script.py"


def _section(text: str) -> str:
    match = re.search(r"# --- the README section starts here\n(.*?)# --- the README section ends here\n", text, re.S)
    assert match, "the section markers are missing"
    return match.group(1)


def test_the_readme_shows_the_script_verbatim():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = _section(SCRIPT.read_text(encoding="utf-8"))
    assert section.strip() in readme  # a change to either shows here
    assert len(section.strip().splitlines()) <= 30


def test_the_script_runs_and_exports_the_weights(tiny_model_dir, tmp_path, monkeypatch):
    rows = [{"text": f"a {'great' if i % 2 else 'dull'} movie number {i}", "label": "pos" if i % 2 else "neg",
             "corrupted": i < 8} for i in range(48)]
    for i in range(8):  # the corrupted rows' labels are wrong
        rows[i]["label"] = "neg" if rows[i]["label"] == "pos" else "pos"
    train, validation = tmp_path / "train.jsonl", tmp_path / "validation.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    validation.write_text("".join(json.dumps({"text": f"a {'great' if i % 2 else 'dull'} film {i}",
                                              "label": "pos" if i % 2 else "neg"}) + "\n" for i in range(16)))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), str(train), str(validation), str(out), tiny_model_dir])
    scope = runpy.run_path(str(SCRIPT))
    trainer = scope["trainer"]
    assert isinstance(trainer.outer_module, LossWeights) and trainer.outer_module.trusted_column == "trusted"
    assert trainer.outer_step > 0 and scope["weights"].shape == (48,)
    assert LossWeights.from_pretrained(str(out)).metadata["outer_steps"] == str(trainer.outer_step)
    table = datasets.load_from_disk(str(out / "weights"))
    assert len(table) == 48 and {"text", "label", "corrupted", "weight"} <= set(table.column_names)
    np.testing.assert_allclose(table["weight"], scope["weights"], rtol=1e-6)


SFT_SCRIPT = ROOT / "examples" / "bilevel_sft_in_your_script.py"


def test_the_readme_shows_the_trl_script_verbatim():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = _section(SFT_SCRIPT.read_text(encoding="utf-8"))
    assert section.strip() in readme
    assert len(section.strip().splitlines()) <= 30


def test_the_trl_script_runs_on_a_messages_column(tiny_chat_dir, tmp_path, monkeypatch):
    """The TRL script on a few short conversations (the tiny model's tokenizer is one token per character): the
    recipe's LossWeights trains on the validation rows as trusted rows, weights every training row, and the weights
    do not collapse to uniform."""
    from hf_integration.demo import instructions

    make = instructions.make_instruction_splits

    def small(num_train, num_validation, num_test, noise_rate, seed):
        splits = make(num_train, num_validation, num_test, noise_rate=noise_rate, seed=seed)
        short = {split: splits[split].filter(lambda row: len(row["messages"][0]["content"]) < 70)
                 for split in ("train", "validation")}
        return {"train": short["train"].select(range(32)), "validation": short["validation"].select(range(16))}

    monkeypatch.setattr(instructions, "make_instruction_splits", small)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [str(SFT_SCRIPT), str(out), "0", tiny_chat_dir])
    scope = runpy.run_path(str(SFT_SCRIPT))
    trainer = scope["trainer"]
    assert isinstance(trainer.outer_module, LossWeights) and trainer.outer_module.trusted_share == "uniform"
    assert len(trainer.train_dataset) == 32 + 16 and trainer.num_training_rows == 32
    assert trainer.outer_step > 0 and scope["weights"].shape == (32,)
    assert np.ptp(scope["weights"]) > 0  # the loss tilt moved them
    table = datasets.load_from_disk(str(out / "weights"))
    assert len(table) == 32 and {"messages", "corrupted", "weight"} <= set(table.column_names)
    assert (out / "adapter_model.safetensors").is_file()
    assert LossWeights.from_pretrained(str(out)).metadata["outer_steps"] == str(trainer.outer_step)
