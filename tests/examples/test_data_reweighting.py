"""`examples/data_reweighting.py` end to end on a tiny budget (tiny BERT from a config, generated data, offline),
its outputs, the patched Hub upload, and the early errors on bad input."""

from __future__ import annotations

import json
import os
from unittest import mock

import numpy as np
import pytest
from repo_scripts import load

from hf_integration import DataWeights, LossWeights, hub
from hf_integration.runs import InputError

data_reweighting = load("examples/data_reweighting.py")

from .script_utils import tiny_run_args, write_csv

METRIC_KEYS = {
    "auc_low_weight_vs_corrupted", "precision_at_num_corrupted", "mean_weight_clean", "mean_weight_corrupted",
    "reweighted", "baselines", "baseline_description", "num_train", "num_corrupted", "inner_steps",
    "outer_steps", "wall_time_bilevel_s", "wall_time_baselines_s", "wall_time_total_s", "noise_type",
    "weight_spread", "cached_frozen_layers",
}
SPLIT_METRICS = {"validation_accuracy", "validation_loss", "validation_ece", "test_accuracy", "test_loss", "test_ece"}


def test_end_to_end_outputs(tiny_model_dir, tmp_path, capsys):
    import datasets

    out = tmp_path / "run"
    results = data_reweighting.main(tiny_run_args(tiny_model_dir, out, "--loss_filter_epochs", "0.4"))

    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert metrics["num_train"] == 40 and metrics["num_corrupted"] == 12  # round(0.3 * 40)
    assert metrics["inner_steps"] == 6 and metrics["outer_steps"] == 2  # after steps 2 and 4 (0-based)
    assert 0.0 <= metrics["auc_low_weight_vs_corrupted"] <= 1.0
    assert set(metrics["reweighted"]) == SPLIT_METRICS
    assert set(metrics["baselines"]) == {"uniform", "uniform_train_val", "loss_filter", "reference_filter"}
    for name, baseline in metrics["baselines"].items():
        assert SPLIT_METRICS <= set(baseline) and baseline["wall_time_s"] > 0
        assert metrics["wall_time_baselines_s"][name] == baseline["wall_time_s"]
    loss_filter = metrics["baselines"]["loss_filter"]
    assert 0.0 <= loss_filter["auc_high_loss_vs_corrupted"] <= 1.0 and loss_filter["fraction_dropped"] == 0.3
    assert metrics["cached_frozen_layers"] is True
    assert metrics["train_on_validation"] is True  # the default with --weighting loss
    assert results["num_train"] == metrics["num_train"]

    weights = LossWeights.from_pretrained(str(out))  # the default --weighting loss
    assert weights.metadata["outer_steps"] == "2"
    assert weights.trusted_column == "trusted"  # the validation rows of the inner problem keep weight 1/2
    assert weights.trusted_share == metrics["trusted_share"] == "max_weight"  # this job's default
    # this job's default with --weighting loss: each loss measured against the validation probe's
    assert metrics["loss_reference"] == "holdout_probe" and weights.reference_column == "reference_loss"
    assert set(metrics["outer_parameters"]) == {"loss_scale", "reference_scale"}
    assert (out / "adapter_model.safetensors").is_file()

    table = datasets.load_from_disk(str(out / "train_with_weights"))
    assert len(table) == 40 and {"text", "labels", "corrupted", "example_id", "weight"} <= set(table.column_names)
    assert sum(table["corrupted"]) == 12
    # each example's weight is the learned function at its loss under the trained model: a monotone ranking
    w = np.asarray(table["weight"])
    assert np.all((w > 0) & (w < 1))

    png = (out / "weights.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    printed = capsys.readouterr().out
    assert "| learned data weights (bilevel)" in printed and "| uniform weights |" in printed
    assert "| uniform on train + validation |" in printed and "| loss filter |" in printed
    assert "| reference filter |" in printed
    assert "AUC (low weight vs corrupted)" in printed and "AUC of the loss filter's ranking" in printed
    # the model is saved as its PEFT adapter (not the frozen-trunk wrapper's full state dict)
    assert not (out / "model.safetensors").exists()


def test_per_example_weighting(tiny_model_dir, tmp_path):
    """--weighting per_example learns one free weight per example (DataWeights), written in the table; the loss
    reference, a loss weighting's, is off."""
    import datasets

    results = data_reweighting.main(tiny_run_args(tiny_model_dir, tmp_path, "--run_baseline", "False",
                                                  "--weighting", "per_example"))
    weights = DataWeights.from_pretrained(str(tmp_path), expected={"num_rows": 40, "id_column": "example_id"})
    assert weights.num_examples == 40 and results["outer_steps"] == 2
    assert results["train_on_validation"] is False  # free per-example weights never train on validation
    assert results["loss_reference"] == "none" and "holdout_reference" not in results
    table = datasets.load_from_disk(str(tmp_path / "train_with_weights"))
    expected = weights.weights().detach().numpy()[np.asarray(table["example_id"])]
    np.testing.assert_allclose(table["weight"], expected, rtol=1e-6)


def test_uncached_run(tiny_model_dir, tmp_path):
    """--cache_frozen_layers False trains the full model (its forward passes run every layer)."""
    results = data_reweighting.main(tiny_run_args(tiny_model_dir, tmp_path, "--run_baseline", "False",
                                                  "--cache_frozen_layers", "False"))
    assert results["cached_frozen_layers"] is False and results["outer_steps"] == 2
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_trusted_rows_at_their_uniform_share(tiny_model_dir, tmp_path):
    """--trusted_share uniform reaches LossWeights, its saved config and metrics.json."""
    results = data_reweighting.main(tiny_run_args(tiny_model_dir, tmp_path, "--run_baseline", "False",
                                                  "--trusted_share", "uniform"))
    assert results["trusted_share"] == "uniform" and results["outer_steps"] == 2
    assert LossWeights.from_pretrained(str(tmp_path)).trusted_share == "uniform"


def test_push_to_hub_uploads_weights_with_card(tiny_model_dir, tmp_path, capsys):
    uploaded = {}

    def upload_folder(**kwargs):
        folder = kwargs["folder_path"]
        uploaded["files"] = sorted(os.listdir(folder))
        uploaded["card"] = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
        uploaded["repo_id"] = kwargs["repo_id"]
        return mock.Mock(commit_url="https://huggingface.co/me/weights/commit/1", pr_url=None)

    with mock.patch.object(hub, "HfApi") as api_cls:
        api = api_cls.return_value
        api.create_repo.return_value = mock.Mock(repo_id="me/weights")
        api.upload_folder.side_effect = upload_folder
        results = data_reweighting.main(tiny_run_args(
            tiny_model_dir, tmp_path, "--run_baseline", "False", "--push_to_hub", "True",
            "--hub_model_id", "me/weights", "--hub_token", "hf_test"))
    assert api.create_repo.call_count == 2  # at start (credentials, reachability), and before the upload
    assert all(call.args[0] == "me/weights" for call in api.create_repo.call_args_list)
    assert uploaded["repo_id"] == "me/weights"
    assert {"outer_params.safetensors", "outer_config.json", "README.md"} <= set(uploaded["files"])
    assert "adapter_model.safetensors" not in uploaded["files"]
    assert 'LossWeights.from_pretrained("me/weights")' in uploaded["card"]
    assert "auc_low_weight_vs_corrupted" in uploaded["card"]
    assert results["hub_commit_url"] == "https://huggingface.co/me/weights/commit/1"
    assert results["baselines"] == {}
    assert 'LossWeights.from_pretrained("me/weights")' in capsys.readouterr().out


# ------------------------------------------------------------------------- bad input: clear errors, before training
def test_holdout_probe_reference_and_its_rival(tiny_model_dir, tmp_path):
    """--loss_reference holdout_probe: every row carries its label's loss under a linear probe fitted on the
    validation rows, the outer problem learns reference_scale beside loss_scale, the saved module reads the column
    back; --baselines reference_filter drops the rows that reference ranks highest, so its ranking AUC is the
    reference's own."""
    import datasets

    results = data_reweighting.main(tiny_run_args(
        tiny_model_dir, tmp_path, "--loss_reference", "holdout_probe", "--init_reference_scale", "0.5",
        "--baselines", "reference_filter"))
    assert results["loss_reference"] == "holdout_probe" and results["outer_steps"] == 2
    module = LossWeights.from_pretrained(str(tmp_path))
    assert module.reference_column == data_reweighting.REFERENCE_COLUMN == "reference_loss"
    scale = results["outer_parameters"]["reference_scale"]
    assert scale == pytest.approx(float(module.reference_scale.detach())) and scale != 0.5  # it learned
    reference = results["holdout_reference"]
    assert 0.0 <= reference["auc_high_reference_vs_corrupted"] <= 1.0 and reference["inverse_regularization"] > 0
    assert 0.0 <= reference["probe_validation_accuracy"] <= 1.0 and reference["time_s"] > 0
    rival = results["baselines"]["reference_filter"]
    assert set(results["baselines"]) == {"reference_filter"} and rival["fraction_dropped"] == 0.3
    assert rival["auc_ranking_vs_corrupted"] == pytest.approx(reference["auc_high_reference_vs_corrupted"])
    assert SPLIT_METRICS <= set(rival)
    table = datasets.load_from_disk(str(tmp_path / "train_with_weights"))
    assert len(table) == 40 and data_reweighting.REFERENCE_COLUMN not in table.column_names  # the raw rows


def test_reference_filter_alone_needs_no_reference_weights(tiny_model_dir, tmp_path):
    """The reference_filter rival beside the default weighting: the probe is fitted for the rival only."""
    results = data_reweighting.main(tiny_run_args(tiny_model_dir, tmp_path, "--baselines", "reference_filter",
                                                  "--loss_reference", "none"))
    assert results["loss_reference"] == "none" and "reference_scale" not in results["outer_parameters"]
    assert LossWeights.from_pretrained(str(tmp_path)).reference_column is None
    assert results["baselines"]["reference_filter"]["auc_ranking_vs_corrupted"] == pytest.approx(
        results["holdout_reference"]["auc_high_reference_vs_corrupted"])


@pytest.fixture
def no_training():
    """Fail the test if any model is built: the errors below must come before training starts."""
    with mock.patch.object(data_reweighting, "build_lora_model", side_effect=AssertionError("model was built")):
        yield


def _files(tmp_path, train_rows, validation_rows, header=("text", "label")):
    return ["--train_file", write_csv(tmp_path / "train.csv", train_rows, header),
            "--validation_file", write_csv(tmp_path / "validation.csv", validation_rows, header)]


TRAIN_ROWS = [(f"a great movie number {i}", "pos") for i in range(10)] + \
             [(f"a dull movie number {i}", "neg") for i in range(10)]


@pytest.mark.parametrize("argument", ["--text_column", "--label_column"])
def test_unknown_column_names_the_argument(argument, tmp_path, no_training):
    with pytest.raises(InputError, match=rf"{argument} 'nope' is not a column of .*columns are \['text', 'label'\]"):
        data_reweighting.main(["--output_dir", str(tmp_path / "out"), argument, "nope"])


def test_unknown_column_in_files(tmp_path, no_training):
    args = _files(tmp_path, TRAIN_ROWS, TRAIN_ROWS[:4], header=("sentence", "label"))
    with pytest.raises(InputError, match=r"--text_column 'text' is not a column of --train_file"):
        data_reweighting.main(["--output_dir", str(tmp_path / "out"), *args])


def test_unseen_validation_class_names_label_column(tmp_path, no_training):
    args = _files(tmp_path, TRAIN_ROWS, TRAIN_ROWS[:4] + [("so so", "neutral")])
    with pytest.raises(InputError, match=r"--label_column 'label': --validation_file has classes \['neutral'\] "
                                         r"that never occur in the training split"):
        data_reweighting.main(["--output_dir", str(tmp_path / "out"), *args])


def test_unseen_test_class(tmp_path, no_training):
    args = _files(tmp_path, TRAIN_ROWS, TRAIN_ROWS[:4])
    args += ["--test_file", write_csv(tmp_path / "test.csv", [("meh", "neutral"), ("good", "pos")])]
    with pytest.raises(InputError, match=r"--test_file has classes \['neutral'\]"):
        data_reweighting.main(["--output_dir", str(tmp_path / "out"), *args])


@pytest.mark.parametrize("role", ["train", "validation"])
def test_empty_split_names_the_argument(role, tmp_path, no_training):
    rows = {"train": TRAIN_ROWS, "validation": TRAIN_ROWS[:4]}
    rows[role] = []
    args = _files(tmp_path, rows["train"], rows["validation"])
    with pytest.raises(InputError, match=rf"--{role}_file is empty"):
        data_reweighting.main(["--output_dir", str(tmp_path / "out"), *args])


def test_dataset_smaller_than_batch(tmp_path, no_training):
    with pytest.raises(InputError, match=r"fewer than one training batch \(--per_device_train_batch_size 16 "
                                         r".*--max_train_samples"):
        data_reweighting.main(["--output_dir", str(tmp_path / "out"), "--max_train_samples", "10"])


def test_single_class_training_split(tmp_path, no_training):
    args = _files(tmp_path, TRAIN_ROWS[:10], TRAIN_ROWS[:4])
    with pytest.raises(InputError, match=r"--label_column 'label': the training split has only"):
        data_reweighting.main(["--output_dir", str(tmp_path / "out"), *args])


def test_train_on_validation_needs_loss_weighting(tmp_path, no_training):
    with pytest.raises(InputError, match=r"--train_on_validation needs --weighting loss"):
        data_reweighting.main(["--output_dir", str(tmp_path / "out"), "--weighting", "per_example",
                               "--train_on_validation", "True"])


def test_loss_reference_of_another_job_is_refused(tmp_path, no_training):
    with pytest.raises(InputError, match=r"--loss_reference must be one of \['none', 'holdout_probe'\] here, got "
                                         r"'prompt_free'"):
        data_reweighting.main(["--output_dir", str(tmp_path / "out"), "--loss_reference", "prompt_free"])


def test_loss_reference_needs_loss_weighting(tmp_path, no_training):
    with pytest.raises(InputError, match=r"--loss_reference holdout_probe needs --weighting loss"):
        data_reweighting.main(["--output_dir", str(tmp_path / "out"), "--loss_reference", "holdout_probe",
                               "--weighting", "per_example"])


@pytest.mark.parametrize("option", [["--loss_reference", "holdout_probe"], ["--baselines", "reference_filter"]])
def test_holdout_probe_needs_validation_rows_of_every_class(option, tmp_path, no_training):
    """A class without 2 validation rows cannot be judged by the probe: refused before any model is built."""
    args = _files(tmp_path, TRAIN_ROWS, TRAIN_ROWS[:4] + TRAIN_ROWS[10:11])
    with pytest.raises(InputError, match=r"holdout_probe / --baselines reference_filter: the holdout reference needs "
                                         r"at least 2 validation rows of every class; classes \[0\] have \[1\]"):
        data_reweighting.main(["--output_dir", str(tmp_path / "out"), *args, "--per_device_train_batch_size", "4",
                               "--hypergrad_train_batch_size", "4", "--outer_batch_size", "2", *option])


def test_push_needs_hub_model_id(tmp_path, no_training):
    with pytest.raises(InputError, match=r"--push_to_hub needs --hub_model_id"):
        data_reweighting.main(["--output_dir", str(tmp_path / "out"), "--push_to_hub", "True"])


def test_bad_noise_rate(tmp_path):
    with pytest.raises(InputError, match=r"--noise_rate must be in \[0, 1\)"):
        data_reweighting.main(["--output_dir", str(tmp_path / "out"), "--noise_rate", "1.5"])


def test_bad_baseline_names_the_argument(tmp_path, no_training):
    with pytest.raises(SystemExit):  # argparse's choices
        data_reweighting.main(["--output_dir", str(tmp_path / "out"), "--baselines", "nope"])


def test_loss_filter_after_the_end_of_training_is_refused(tiny_model_dir, tmp_path, no_training):
    with pytest.raises(InputError, match=r"--loss_filter_epochs 2.0 puts the loss filter at inner step 10, but "
                                         r"training has 6 steps"):
        data_reweighting.main(tiny_run_args(tiny_model_dir, tmp_path))


def test_bad_loss_filter_fraction(tmp_path, no_training):
    with pytest.raises(InputError, match=r"--loss_filter_fraction must be in \[0, 1\)"):
        data_reweighting.main(["--output_dir", str(tmp_path / "out"), "--loss_filter_fraction", "1.0"])


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        data_reweighting.main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for option in ("--weighting", "--outer_patience_epochs", "--loss_filter_epochs", "--noise_rate", "--noise_type", "--text_column", "--lora_layers", "--outer_learning_rate",
                   "--run_baseline", "--baselines", "--loss_filter_fraction", "--cache_frozen_layers",
                   "--train_split", "--loss_reference", "--init_reference_scale"):
        assert option in printed
