"""Every command the README documents runs, as written plus tiny settings, so that a documented command cannot rot.

The commands are read from the fenced code blocks of the documentation (:data:`DOCUMENTS`): ``make`` targets,
``python`` / ``.venv/bin/python`` scripts and ``accelerate launch`` lines (whose launcher options are checked by
accelerate's own parser; the script then runs in this process, on the CPU). Each script's documented arguments
are kept and :data:`TINY` appends settings that make it run in seconds on the tests' tiny models (later options
win): a documented option that no longer exists, a value the script refuses, a documented file layout it cannot
read, all fail here. A script the table does not know fails too: a new documented command needs its tiny settings.

Nothing is downloaded: a ``--dataset_name`` is served from local parquet files through ``datasets.load_dataset``,
files a command names (``--train_file train.csv``) are written with the columns it names, and the Hub push is
patched. Commands run in a temporary folder, in documented order (a push finds the run before it).
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
MAKE_TARGETS = {"demo": "examples/data_reweighting.py", "bench": "benchmarks/ihvp_accuracy.py", "test": None}
SUITE_ITSELF = None  # `make test` runs this suite: it is exercised by running it


def _tiny_classification(tiny: dict[str, str]) -> list[str]:
    return ["--model_name_or_path", tiny["bert"], "--max_train_samples", "40", "--max_eval_samples", "24",
            "--max_seq_length", "24", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
            "--max_steps", "6", "--unroll_steps", "2", "--outer_patience_steps", "2", "--warmup_steps", "0",
            "--hypergrad_train_batch_size", "16", "--outer_batch_size", "16", "--nystrom_rank", "2",
            "--disable_tqdm", "True", "--use_cpu", "True", "--logging_steps", "100", "--overwrite_output_dir"]


def _tiny_instruction(tiny: dict[str, str]) -> list[str]:
    return ["--model_name_or_path", tiny["llama"], "--max_train_samples", "24", "--max_eval_samples", "8",
            "--max_length", "192", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
            "--max_steps", "4", "--unroll_steps", "1", "--outer_patience_steps", "2", "--warmup_steps", "0",
            "--hypergrad_train_batch_size", "8", "--outer_batch_size", "8", "--max_new_tokens", "3",
            "--disable_tqdm", "True", "--use_cpu", "True", "--logging_steps", "100", "--overwrite_output_dir"]


# script -> the settings appended to its documented arguments (``--extra_args`` takes the rest of a line: last)
TINY = {
    "examples/data_reweighting.py": lambda tiny: [*_tiny_classification(tiny), "--loss_filter_epochs", "0.2"],
    "examples/peft_regularization.py": _tiny_classification,
    "examples/instruction_data_weights.py": _tiny_instruction,
    "examples/push_hyperparameters.py": lambda tiny: [],
    "examples/logistic_regression.py": lambda tiny: ["--num-iters", "60", "--unroll-steps", "20"],
    "examples/dataset_distillation.py": lambda tiny: ["--num-iters", "100", "--unroll-steps", "50", "--eval-iters",
                                                      "20", "--eval-inits", "1"],
    "benchmarks/real_text_sets.py": lambda tiny: ["--train", "40", "--validation", "20", "--test", "20"],
    "benchmarks/ihvp_accuracy.py": lambda tiny: ["--quick", "--out", "ihvp_accuracy.json"],
    "benchmarks/own_script_vs_example.py": lambda tiny: [
        "--sets", "scipy_docs", "--noise", "symmetric:0.3", "--seeds", "0", "--model", tiny["bert"], "--sizes", "40",
        "20", "20", "--out", "own_script_vs_example", "--extra_args", *_tiny_classification(tiny)],
    "benchmarks/real_instruction_sets.py": lambda tiny: ["--train", "24", "--validation", "8", "--test", "8"],
    "benchmarks/instruction_outcome.py": lambda tiny: [
        "--sets", "scipy_qa", "--seeds", "0", "--out", "instruction_outcome", "--extra_args", *_tiny_instruction(tiny)],
    "benchmarks/core_nystrom_cost.py": lambda tiny: ["--batch-size", "2", "--seq-len", "8", "--repeats", "1", "--out",
                                                     "core_nystrom_cost.json"],
    "benchmarks/instruction_signals.py": lambda tiny: [
        "--sets", "scipy_qa", "--seeds", "0", "--model_name_or_path", tiny["llama"], "--out", "signals.json"],
    "benchmarks/outer_step_profile.py": lambda tiny: ["--", *_tiny_classification(tiny), "--loss_filter_epochs", "0.2"],
    "benchmarks/hypergradient_rows.py": lambda tiny: ["--", *_tiny_classification(tiny)],
    "benchmarks/peft_outcome.py": lambda tiny: [
        "--sets", "scipy_docs", "--seeds", "0", "--output_dir", "peft_outcome", "--extra_args",
        *_tiny_classification(tiny), "--grid", "0", "0.01"],
    "benchmarks/reweighting_outcome.py": lambda tiny: [
        "--sets", "embedded", "scipy_docs", "--noise", "symmetric:0.3", "--seeds", "0", "--output_dir", "outcome",
        "--extra_args", *_tiny_classification(tiny), "--loss_filter_epochs", "0.2"],
}


def _fenced_lines(text: str) -> list[str]:
    lines, inside = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        if inside:
            lines.append(line)
    return lines


def documented_commands(text: str) -> list[tuple[list[str], str, list[str]]]:
    """``(launcher, script, arguments)`` of every command in the fenced blocks of ``text``: continuation lines
    joined, comments and ``[optional]`` placeholders dropped; ``launcher`` holds ``accelerate launch``'s options."""
    commands, pending = [], ""
    for line in _fenced_lines(text):
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        words = shlex.split(re.sub(r"\[[^\]]*\]", "", line), comments=True)
        if not words:
            continue
        if words[0] == "make" and len(words) > 1 and words[1] in MAKE_TARGETS:
            commands.append(([], MAKE_TARGETS[words[1]], []))
        elif os.path.basename(words[0]) in ("python", "python3") and len(words) > 1 and words[1].endswith(".py"):
            commands.append(([], words[1], words[2:]))
        elif words[:2] == ["accelerate", "launch"]:
            script = next(i for i, w in enumerate(words) if w.endswith(".py"))
            commands.append((words[2:script], words[script], words[script + 1:]))
    return commands


def _all_commands() -> list[tuple[str, list[str], str, list[str]]]:
    found = []
    for document in DOCUMENTS:
        if document.is_file():
            for launcher, script, arguments in documented_commands(document.read_text(encoding="utf-8")):
                found.append((document.name, launcher, script, arguments))
    return found


COMMANDS = _all_commands()


def test_the_documentation_documents_commands():
    scripts = {script for _, _, script, _ in COMMANDS}
    assert {"examples/data_reweighting.py", "examples/instruction_data_weights.py"} <= scripts, scripts


def _option(arguments: list[str], name: str, default: str | None = None) -> str | None:
    return arguments[arguments.index(name) + 1] if name in arguments else default


def _write_named_files(script: str, arguments: list[str]) -> None:
    """The data files a command names (relative paths, in the working folder), with the columns it names."""
    import json

    for option in ("--train_file", "--validation_file", "--test_file"):
        path = _option(arguments, option)
        if path is None or os.path.exists(path):
            continue
        if script.endswith("instruction_data_weights.py"):
            rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                  {"role": "assistant", "content": str(2 * i)}]} for i in range(24)]
            Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
            continue
        text, label = _option(arguments, "--text_column", "text"), _option(arguments, "--label_column", "label")
        rows = [(f"a {'great' if i % 2 else 'dull'} movie number {i}", "pos" if i % 2 else "neg") for i in range(40)]
        Path(path).write_text(f"{text},{label}\n" + "".join(f"{t},{y}\n" for t, y in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def hub_datasets(tmp_path_factory):
    """``load_dataset(<a Hub id>, split=...)`` served from local parquet files (split slicing honoured): a text
    classification set, and a conversation set for the instruction job's ``--messages_column messages``."""
    import datasets

    folder = tmp_path_factory.mktemp("hub_datasets")
    rows = {"text": [f"a {'great' if i % 2 else 'dull'} film number {i}" for i in range(60)],
            "label": [i % 2 for i in range(60)],
            "messages": [[{"role": "user", "content": f"Name {i}?"}, {"role": "assistant", "content": f"n{i}"}]
                         for i in range(60)]}
    files = {}
    for split in ("train", "validation", "test"):
        files[split] = str(folder / f"{split}.parquet")
        datasets.Dataset.from_dict(rows).to_parquet(files[split])
    real = datasets.load_dataset

    def load_dataset(path, name=None, *args, split=None, **kwargs):
        if path in ("csv", "json", "parquet") or os.path.exists(str(path)):
            return real(path, name, *args, split=split, **kwargs)
        return real("parquet", data_files=files, split=split)

    return load_dataset


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("documented_commands")


@pytest.fixture(scope="module")
def already_run() -> set:
    """Commands that ran with the same words (``make bench`` and ``benchmarks/ihvp_accuracy.py --quick`` are one
    command once the tiny settings are added): each runs once."""
    return set()


@pytest.mark.parametrize("document, launcher, script, arguments", COMMANDS,
                         ids=[f"{d}:{i}:{s}" for i, (d, _, s, _) in enumerate(COMMANDS)])
def test_a_documented_command_runs(document, launcher, script, arguments, workspace, hub_datasets, already_run,
                                   monkeypatch, tiny_model_dir, tiny_chat_dir):
    if script is SUITE_ITSELF:
        return  # `make test`: this suite
    assert script in TINY, f"{document} documents {script}: give it tiny settings in TINY"
    path = ROOT / script
    assert path.is_file(), f"{document} documents {script}, which does not exist"
    if launcher:  # accelerate's own parser checks the launcher options the document gives
        from accelerate.commands.launch import launch_command_parser

        launch_command_parser().parse_args([*launcher, str(path), *arguments])
    monkeypatch.chdir(workspace)
    for name, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                        "HF_DATASETS_CACHE": str(workspace / "datasets_cache")}.items():
        monkeypatch.setenv(name, value)
    _write_named_files(script, arguments)
    argv = [str(path), *arguments, *TINY[script]({"bert": tiny_model_dir, "llama": tiny_chat_dir})]
    if frozenset(argv) in already_run:
        return
    already_run.add(frozenset(argv))
    monkeypatch.setattr(sys, "argv", argv)
    patches = [mock.patch("datasets.load_dataset", hub_datasets)]
    if script.endswith("push_hyperparameters.py"):
        from hf_integration import DataWeights, hub

        folder = Path(_option(arguments, "--outer_params_dir"))
        if not (folder / "outer_params.safetensors").is_file():  # run alone, without the documented run before it
            DataWeights(3).save_pretrained(str(folder))
        api = mock.MagicMock()
        api.return_value.create_repo.return_value = mock.Mock(repo_id=_option(arguments, "--repo_id"))
        api.return_value.upload_folder.return_value = mock.Mock(commit_url="https://huggingface.co/x/commit/1",
                                                                pr_url=None)
        patches += [mock.patch.object(hub, "HfApi", api), mock.patch.object(hub, "get_token", return_value="hf_x")]
    for patch in patches:
        patch.start()
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exit_:
        assert exit_.code in (None, 0), f"{' '.join(argv)} exited with {exit_.code!r}"
    finally:
        for patch in patches:
            patch.stop()
