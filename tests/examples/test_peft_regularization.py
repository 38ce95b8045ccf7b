"""`examples/peft_regularization.py` end to end on a tiny budget (tiny BERT from a config, generated data,
offline): the bilevel run, the grid runs with their fixed strengths, the outputs, the patched push, bad input."""

from __future__ import annotations

import json
from unittest import mock

import pytest
from repo_scripts import load

from hf_integration import RECIPES, LoraRegularization, hub
from hf_integration.runs import InputError

peft_regularization = load("examples/peft_regularization.py")

from .script_utils import tiny_run_args


def test_end_to_end_outputs(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    results = peft_regularization.main(tiny_run_args(tiny_model_dir, out, "--grid", "0", "0.01"))

    metrics = json.loads((out / "metrics.json").read_text())
    # 2 layers x (query, value) + the classifier head, all LoRA-adapted and regularized.
    assert len(metrics["lora_modules"]) == 5 and metrics["lora_modules"][-1].endswith("classifier")
    learned = metrics["learned"]
    assert learned["training_runs"] == 1 and learned["outer_steps"] == 2
    assert set(learned["strengths"]) == set(metrics["lora_modules"])
    assert {"validation_loss", "validation_accuracy", "test_loss", "test_accuracy", "wall_time_s"} <= set(learned)
    assert [row["strength"] for row in metrics["grid"]] == [0.0, 0.01]
    best = metrics["best_grid"]
    assert best["training_runs"] == 2
    assert best["validation_loss"] == min(row["validation_loss"] for row in metrics["grid"])
    assert metrics["learned_no_worse_than_best_grid"] == (learned["validation_loss"] <= best["validation_loss"])
    assert results["inner_steps"] == 6

    # The learned strengths moved away from their initial value; the file holds them with the module names.
    saved = LoraRegularization.from_pretrained(str(out), expected={"granularity": "module"})
    assert saved.module_names == metrics["lora_modules"]
    initial = RECIPES["lora_regularization"]["outer_module_options"]["init_strength"]  # the script's default
    assert not all(abs(s - initial) < 1e-5 * initial for s in saved.strengths().tolist())
    printed = capsys.readouterr().out
    assert "| best of grid:" in printed and "| learned per module" in printed


def test_grid_runs_keep_their_strength_fixed(tiny_model_dir, tmp_path):
    from hf_integration import BilevelTrainer

    strengths = []
    original = BilevelTrainer.train

    def train(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        strengths.append((self.outer_step, self.outer_module.strengths().tolist()))
        return result

    with mock.patch.object(BilevelTrainer, "train", train):
        peft_regularization.main(tiny_run_args(tiny_model_dir, tmp_path, "--grid", "0.5"))
    (bilevel_steps, _), (grid_steps, grid_strengths) = strengths
    assert bilevel_steps == 2 and grid_steps == 0
    assert grid_strengths == pytest.approx([0.5])


def test_push_to_hub(tiny_model_dir, tmp_path):
    cards = []

    def upload_folder(**kwargs):
        cards.append(open(f"{kwargs['folder_path']}/README.md", encoding="utf-8").read())
        return mock.Mock(commit_url="https://huggingface.co/me/reg/commit/1", pr_url=None)

    with mock.patch.object(hub, "HfApi") as api_cls:
        api_cls.return_value.create_repo.return_value = mock.Mock(repo_id="me/reg")
        api_cls.return_value.upload_folder.side_effect = upload_folder
        results = peft_regularization.main(tiny_run_args(
            tiny_model_dir, tmp_path, "--run_grid", "False", "--push_to_hub", "--hub_model_id", "me/reg", "--hub_token", "hf_test"))
    assert results["hub_commit_url"] == "https://huggingface.co/me/reg/commit/1"
    assert results["grid"] == [] and results["best_grid"] is None
    assert 'LoraRegularization.from_pretrained("me/reg")' in cards[0]
    assert "learned_validation_loss" in cards[0]


@pytest.fixture
def no_training():
    with mock.patch.object(peft_regularization, "build_lora_model", side_effect=AssertionError("model was built")):
        yield


def test_bad_label_column(tmp_path, no_training):
    with pytest.raises(InputError, match=r"--label_column 'stars' is not a column"):
        peft_regularization.main(["--output_dir", str(tmp_path / "out"), "--label_column", "stars"])


def test_too_few_examples_for_batch(tmp_path, no_training):
    with pytest.raises(InputError, match=r"--per_device_train_batch_size 16"):
        peft_regularization.main(["--output_dir", str(tmp_path / "out"), "--max_train_samples", "8"])


def test_negative_grid_value(tmp_path):
    with pytest.raises(InputError, match=r"--grid values must be finite and >= 0"):
        peft_regularization.main(["--output_dir", str(tmp_path / "out"), "--grid", "0.1", "-1"])


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        peft_regularization.main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for option in ("--grid", "--granularity", "--init_strength", "--lora_target_modules", "--unroll_steps"):
        assert option in printed


def test_the_defaults_are_the_librarys_recipe(tmp_path):
    """The script's settings are `recipe="lora_regularization"`'s: 150 steps wait 50 for the first outer step (a
    third of the run), then 50 outer steps; --granularity and --init_strength become the module's options."""
    from hf_integration.runs import scheduled_outer_steps

    *_, training = peft_regularization.parse_args(["--output_dir", str(tmp_path)])
    assert training.recipe == "lora_regularization" and training.outer_module == "lora_regularization"
    assert training.outer_module_options == RECIPES["lora_regularization"]["outer_module_options"]
    assert scheduled_outer_steps(training, 128) == 50 and training.outer_patience_steps == 50
    *_, training = peft_regularization.parse_args(["--output_dir", str(tmp_path), "--granularity", "layer",
                                                  "--init_strength", "0.5"])
    assert training.outer_module_options == {"granularity": "layer", "init_strength": 0.5}


def test_another_outer_module_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"--outer_module loss_weights cannot be learned here"):
        peft_regularization.main(["--output_dir", str(tmp_path / "out"), "--outer_module", "loss_weights"])
