"""The example scripts as a hostile user drives them, through their `main(argv)`: every bad input ends with
one clean error before any work; faults during a run end with an error, nothing poisoned written and the
previous outputs intact; resume, output-folder ownership and the Hub push behave as `--help` says."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from filelock import FileLock
from repo_scripts import load

from hf_integration import BilevelTrainer, DataWeights, hub, runs
from hf_integration import classification as text_classification
from hf_integration.checkpoints import CheckpointError
from hf_integration.hub import HubError
from hf_integration.runs import LOCK_NAME, InputError, RunError
from hypergrad.outer_step import NonFiniteError

data_reweighting = load("examples/data_reweighting.py")
peft_regularization = load("examples/peft_regularization.py")
push_hyperparameters = load("examples/push_hyperparameters.py")

from .script_utils import tiny_run_args, write_csv


def _per_example_args(model_dir, output_dir, *extra: str) -> list[str]:
    """A tiny data-reweighting run with free per-example weights and Nyström hypergradients (the machinery the
    hardening tests exercise: DataWeights files, exploding IHVPs, the solver state in checkpoints)."""
    return tiny_run_args(model_dir, output_dir, "--weighting", "per_example", "--ihvp_method", "nystrom",
                         "--baselines", "uniform", *extra)

ROWS = [(f"a great movie number {i}", "pos") for i in range(12)] + [(f"a dull movie number {i}", "neg")
                                                                    for i in range(12)]


@pytest.fixture
def no_training():
    """Fail the test if a model is built: the errors below must come before any work."""
    with mock.patch.object(data_reweighting, "build_lora_model", side_effect=AssertionError("model was built")), \
            mock.patch.object(peft_regularization, "build_lora_model", side_effect=AssertionError("model was built")):
        yield


def _files(tmp_path, train_name: str, train_text: str | bytes) -> list[str]:
    train = tmp_path / train_name
    train.write_bytes(train_text if isinstance(train_text, bytes) else train_text.encode())
    return ["--train_file", str(train), "--validation_file", write_csv(tmp_path / "val.csv", ROWS)]


def _csv(rows) -> str:
    return "text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows)


# ------------------------------------------------------------------ bad input: one clean error, before any work

BAD_ARGUMENTS = [
    (["--max_steps", "0"], r"no training step would run \(max_steps=0"),
    (["--max_steps", "-1", "--num_train_epochs", "0"], r"no training step would run"),
    (["--per_device_train_batch_size", "0"], r"--per_device_train_batch_size must be a positive integer, got 0"),
    (["--gradient_accumulation_steps", "0"], r"--gradient_accumulation_steps must be a positive integer"),
    (["--outer_learning_rate", "inf"], r"--outer_learning_rate must be a finite number, got inf"),
    (["--nystrom_rho", "inf"], r"--nystrom_rho must be a finite number, got inf"),
    (["--learning_rate", "nan"], r"--learning_rate must be a finite number, got nan"),
    (["--lora_alpha", "nan"], r"--lora_alpha must be finite"),
    (["--lora_dropout", "1.5"], r"--lora_dropout must be in \[0, 1\)"),
    (["--threads", "0"], r"--threads must be >= 1"),
    (["--max_steps", "4", "--unroll_steps", "5"], r"no outer step would run: 4 inner steps"),
    (["--model_name_or_path", "/nonexistent/model"], r"--model_name_or_path '/nonexistent/model': no such local"),
    (["--tokenizer_name", "./no/such/tokenizer"], r"--tokenizer_name './no/such/tokenizer': no such local folder"),
    (["--resume_from_checkpoint", "/nonexistent/checkpoint-4"], r"--resume_from_checkpoint: '/nonexistent/check"),
    (["--resume_from_checkpoint", "True"], r"holds no complete checkpoint-<step> folder to resume from"),
    (["--seed", "-1"], r"--seed must be an integer in \[0, 2\*\*32 - 1\]"),
    (["--dataset_seed", "-1"], r"--dataset_seed must be in \[0, 2\*\*32 - 1\]"),
    (["--gradient_checkpointing", "True"], r"--gradient_checkpointing does not apply with --cache_frozen_layers"),
]


@pytest.mark.parametrize("extra, match", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_one_clean_error_before_any_work(tmp_path, no_training, extra, match):
    with pytest.raises(InputError, match=match):
        data_reweighting.main(["--output_dir", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") in ([], [LOCK_NAME])


@pytest.mark.parametrize("extra, match", [
    (["--init_strength", "inf"], r"--init_strength must be finite and > 0"),
    (["--grid", "nan"], r"--grid values must be finite"),
    (["--outer_learning_rate", "nan"], r"--outer_learning_rate must be a finite number"),
    (["--max_steps", "0"], r"no training step would run"),
    (["--resume_from_checkpoint", "True"], r"holds no complete checkpoint-<step> folder"),
])
def test_bad_peft_arguments(tmp_path, no_training, extra, match):
    with pytest.raises(InputError, match=match):
        peft_regularization.main(["--output_dir", str(tmp_path / "out"), *extra])


DATA_CASES = {
    "zero_bytes": ("train.csv", b"", r"--train_file is empty \('.*train.csv' has 0 bytes\)"),
    "malformed": ("train.csv", "text,label\na,pos\nb,neg,extra,fields\n",
                  r"--train_file '.*train.csv' cannot be loaded: \w+: .*(Expected 2 fields|tokenizing)"),
    "bad_utf8": ("train.csv", b"text,label\n\xff\xfe broken,pos\nfine,neg\n",
                 r"--train_file '.*train.csv' is not UTF-8 text \(byte 11 is b'\\xff'\); re-save it as UTF-8"),
    "latin1_jsonl": ("train.jsonl", "".join(json.dumps({"text": f"un café {i}", "label": lab}, ensure_ascii=False) + "\n"
                                            for i, (_, lab) in enumerate(ROWS)).encode("latin-1"),
                     r"--train_file '.*train.jsonl' is not UTF-8 text \(byte 16 is b'\\xe9'\)"),
    "list_labels": ("train.jsonl", "".join(json.dumps({"text": t, "label": [lab, "x"]}) + "\n" for t, lab in ROWS),
                    r"--label_column 'label' holds a list at row 0 \(\['pos', 'x'\]\): one class per example"),
    "corrupted_words": ("train.csv", "text,label,corrupted\n" + "".join(f"{t},{lab},maybe\n" for t, lab in ROWS),
                        r"column 'corrupted' of --train_file, row 0: 'maybe' is not a yes/no value"),
    "empty_cell": ("train.csv", _csv(ROWS[:3] + [("", "pos")] + ROWS[3:]),
                   r"--text_column 'text' of --train_file has 1 empty or non-text cell\(s\) \(first at row 3\)"),
    "all_empty": ("train.csv", _csv([("", lab) for _, lab in ROWS]),
                  r"--text_column 'text' of --train_file holds no text"),
    "nan_label": ("train.jsonl", "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in ROWS)
                  + '{"text": "odd", "label": NaN}\n', r"--label_column 'label' has 1 missing \(null/NaN\) label"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_files_are_one_clean_error(tmp_path, no_training, case):
    name, content, match = DATA_CASES[case]
    with pytest.raises(InputError, match=match) as info:
        data_reweighting.main(["--output_dir", str(tmp_path / "out"), *_files(tmp_path, name, content)])
    assert "\n" not in str(info.value)


def test_output_dir_that_is_a_file_or_cannot_be_created(tmp_path, no_training):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(InputError, match=r"--output_dir '.*a_file' is an existing file, not a folder"):
        data_reweighting.main(["--output_dir", str(tmp_path / "a_file")])
    with pytest.raises(InputError, match=r"--output_dir '.*a_file/sub' cannot be created: Not a directory"):
        data_reweighting.main(["--output_dir", str(tmp_path / "a_file" / "sub")])
    with mock.patch("os.access", return_value=False), \
            pytest.raises(InputError, match=r"--output_dir '.*out' is not writable"):
        data_reweighting.main(["--output_dir", str(tmp_path / "out")])


def test_output_dir_holding_another_run_is_refused(tmp_path, no_training):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    with pytest.raises(InputError, match=r"is not empty \(it holds \['metrics.json'\]\): another run's outputs; pass "
                                         r"--overwrite_output_dir"):
        data_reweighting.main(["--output_dir", str(out)])
    (out / "checkpoint-3").mkdir()
    with pytest.raises(InputError, match=r"pass --resume_from_checkpoint True to continue that run"):
        peft_regularization.main(["--output_dir", str(out)])
    assert (out / "metrics.json").read_text() == "{}"


def test_a_second_run_into_a_locked_output_dir_is_refused(tmp_path, no_training):
    out = tmp_path / "out"
    out.mkdir()
    with FileLock(str(out / LOCK_NAME), timeout=0):  # another run holds it
        with pytest.raises(InputError, match=r"is in use by another run \(it holds the lock"):
            data_reweighting.main(["--output_dir", str(out)])
    with pytest.raises(InputError, match=r"--train_file '.*x.csv' does not exist"):  # past the released lock
        data_reweighting.main(["--output_dir", str(out), "--train_file", str(tmp_path / "x.csv"),
                               "--validation_file", str(tmp_path / "y.csv")])


def test_push_fails_in_seconds_before_any_work(tmp_path, no_training):
    with mock.patch.object(hub, "get_token", return_value=None), \
            pytest.raises(HubError, match=r"cannot push to 'me/x': no Hugging Face token"):
        data_reweighting.main(["--output_dir", str(tmp_path / "a"), "--push_to_hub", "--hub_model_id", "me/x"])
    with mock.patch.object(hub, "HfApi") as api_cls:
        api_cls.return_value.create_repo.side_effect = OSError("[Errno 101] Network is unreachable")
        with pytest.raises(HubError, match=r"^cannot create or reach the Hub repo 'me/x' at .*Network is unreachable$"):
            peft_regularization.main(["--output_dir", str(tmp_path / "b"), "--push_to_hub", "--hub_model_id", "me/x",
                                      "--hub_token", "hf_x"])


def test_run_main_exits_1_with_one_line(capsys):
    for error in (InputError("bad --x"), RunError("could not train"), NonFiniteError("nan at step 3"),
                  CheckpointError("cannot resume"), HubError("unreachable")):
        with pytest.raises(SystemExit) as info:
            runs.run_main(mock.Mock(side_effect=error))
        assert info.value.code == f"error: {error}"  # sys.exit(str): message on stderr, status 1
    with pytest.raises(KeyError):  # a bug is not disguised as a user error
        runs.run_main(mock.Mock(side_effect=KeyError("bug")))


def test_command_line_exit_status_and_message(tmp_path):
    script = data_reweighting.__file__
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, script, "--output_dir", str(tmp_path / "o"), "--max_steps", "0"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --max_steps") or \
        "error: no training step would run" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------ faults during a run


def _nan_loss_at(steps):
    original = BilevelTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if model.training and (steps == "all" or self.state.global_step in steps) else loss

    return mock.patch.object(BilevelTrainer, "compute_loss", compute_loss)


def test_one_nan_batch_is_skipped_and_reported(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    with _nan_loss_at({3}):
        results = data_reweighting.main(_per_example_args(tiny_model_dir, out, "--run_baseline", "False"))
    assert results["inner_steps_skipped"] == 1 and results["outer_steps"] == 2
    weights = DataWeights.from_pretrained(str(out))  # refuses NaN/inf
    assert bool(torch.isfinite(weights.logits).all())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["inner_steps_skipped"] == 1 and metrics["outer_steps_skipped"] == 0
    assert "6 inner steps (1 skipped), 2 outer steps applied (0 skipped)" in capsys.readouterr().out


def test_persistent_nan_fails_and_leaves_the_previous_outputs_intact(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"previous": true}')
    (out / "outer_params.safetensors").write_bytes(b"previous")
    with _nan_loss_at("all"), pytest.raises(NonFiniteError, match=r"training stopped at inner step 5"):
        data_reweighting.main(_per_example_args(tiny_model_dir, out, "--max_steps", "8", "--resume_from_checkpoint",
                                            "False", "--overwrite_output_dir"))
    # the failed run wrote nothing that stays, and the run it was to overwrite is back, its record included
    assert (out / "metrics.json").read_text() == '{"previous": true}'
    assert (out / "outer_params.safetensors").read_bytes() == b"previous"
    assert sorted(os.listdir(out)) == [LOCK_NAME, "metrics.json", "outer_params.safetensors"]


def test_a_failed_overwrite_keeps_the_previous_run_and_a_finished_one_replaces_it(tiny_model_dir, tmp_path):
    """--overwrite_output_dir used to delete the previous run's metrics.json and checkpoints at the start; a run
    that then failed (--nystrom_rho 1e-30: every outer step skipped) said "nothing was written" over the loss."""
    out = tmp_path / "run"
    data_reweighting.main(_per_example_args(tiny_model_dir, out, "--run_baseline", "False", "--save_strategy",
                                            "steps", "--save_steps", "2"))
    before = {name: (out / name).read_bytes() for name in ("metrics.json", "outer_params.safetensors")}
    checkpoints = sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    with pytest.raises(RunError, match="nothing was written"):
        data_reweighting.main(_per_example_args(tiny_model_dir, out, "--run_baseline", "False", "--nystrom_rho",
                                                "1e-30", "--overwrite_output_dir"))
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == checkpoints
    assert not [n for n in os.listdir(out) if n.startswith(".overwritten")]
    data_reweighting.main(_per_example_args(tiny_model_dir, out, "--run_baseline", "False", "--overwrite_output_dir",
                                            "--max_steps", "4"))
    assert json.loads((out / "metrics.json").read_text())["inner_steps"] == 4  # the new run's record
    assert not [n for n in os.listdir(out) if n.startswith(("checkpoint-", ".overwritten"))]


def test_exploding_hypergradient_is_a_failed_run_not_a_silent_one(tiny_model_dir, tmp_path):
    """--nystrom_rho 1e-30: hypergradient norms ~1e27 overflow Adam's float32 state. Every outer step is rolled
    back, so the weights would be untrained: the run fails and writes nothing."""
    out = tmp_path / "run"
    with pytest.raises(RunError, match=r"no outer step could be applied: all 2 were skipped \(non-finite outer "
                                       r"optimizer state after the step: 2\)"):
        data_reweighting.main(_per_example_args(tiny_model_dir, out, "--run_baseline", "False", "--nystrom_rho", "1e-30"))
    assert os.listdir(out) == [LOCK_NAME]


def test_outer_learning_rate_1000_is_a_failed_run_not_a_poisoned_one(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RunError, match=r"all 2 were skipped \(non-finite inner objective: 2\)"):
        peft_regularization.main(tiny_run_args(tiny_model_dir, out, "--run_grid", "False",
                                               "--outer_learning_rate", "1000"))
    assert os.listdir(out) == [LOCK_NAME]


def test_a_failed_push_says_where_the_outputs_are(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    with mock.patch.object(hub, "HfApi") as api_cls:
        api_cls.return_value.create_repo.return_value = mock.Mock(repo_id="me/w")
        api_cls.return_value.upload_folder.side_effect = TimeoutError("timed out")
        with pytest.raises(HubError, match=r"uploading to the Hub repo 'me/w' failed: TimeoutError: timed out. The "
                                           r"run's outputs are saved in .*push_hyperparameters.py --outer_params_dir"):
            data_reweighting.main(_per_example_args(tiny_model_dir, out, "--run_baseline", "False", "--push_to_hub",
                                                "--hub_model_id", "me/w", "--hub_token", "hf_x"))
    assert (out / "metrics.json").is_file() and DataWeights.from_pretrained(str(out)).num_examples == 40


# ------------------------------------------------------------------ resume and overwrite


def test_resume_continues_exactly_and_refuses_foreign_or_incomplete_checkpoints(tiny_model_dir, tmp_path):
    full = tmp_path / "full"
    checkpoints = ("--save_strategy", "steps", "--save_steps", "2", "--run_baseline", "False")
    data_reweighting.main(_per_example_args(tiny_model_dir, full, *checkpoints))
    interrupted = tmp_path / "interrupted"
    shutil.copytree(full, interrupted)
    shutil.rmtree(interrupted / "checkpoint-6")
    os.remove(interrupted / "checkpoint-4" / "trainer_state.json")  # killed while saving checkpoint-4
    os.remove(interrupted / "metrics.json")
    results = data_reweighting.main(_per_example_args(tiny_model_dir, interrupted, *checkpoints,
                                                  "--resume_from_checkpoint", "True"))
    assert results["resumed_from"] == str(interrupted / "checkpoint-2")
    for name in ("outer_params.safetensors", "adapter_model.safetensors"):
        from safetensors.torch import load_file
        a, b = load_file(str(full / name)), load_file(str(interrupted / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name  # bitwise identical to the uninterrupted run
    ours = np.asarray(json.loads((interrupted / "metrics.json").read_text())["mean_weight_clean"])
    assert ours == json.loads((full / "metrics.json").read_text())["mean_weight_clean"]

    with pytest.raises(CheckpointError, match=r"fingerprint was saved as"):  # other data of the same size
        data_reweighting.main(_per_example_args(tiny_model_dir, interrupted, *checkpoints, "--dataset_seed", "7",
                                            "--resume_from_checkpoint", str(interrupted / "checkpoint-2")))
    os.remove(interrupted / "checkpoint-2" / "outer_optimizer.safetensors")
    with pytest.raises(InputError, match=r"checkpoint-2' has no outer_optimizer.safetensors"):
        data_reweighting.main(_per_example_args(tiny_model_dir, interrupted, *checkpoints,
                                            "--resume_from_checkpoint", str(interrupted / "checkpoint-2")))


def test_a_resumed_loss_filter_rival_trains_and_reports_the_filter_it_applied(tiny_model_dir, tmp_path):
    """Killed after its filter step, the loss-filter rival used to resume without the filter (it was not
    checkpointed): it trained uniformly and metrics.json still called it the loss filter, AUC null."""
    args = ("--baselines", "loss_filter", "--loss_filter_epochs", "0.4", "--save_strategy", "steps",
            "--save_steps", "2")  # 5 steps an epoch: the filter runs after step 2
    full = tmp_path / "full"
    expected = data_reweighting.main(_per_example_args(tiny_model_dir, full, *args))["baselines"]["loss_filter"]
    assert expected["auc_high_loss_vs_corrupted"] is not None
    interrupted = tmp_path / "interrupted"
    shutil.copytree(full, interrupted)
    shutil.rmtree(interrupted / "baseline-loss_filter" / "checkpoint-6")  # killed between steps 4 and 6
    os.remove(interrupted / "metrics.json")
    resumed = data_reweighting.main(_per_example_args(tiny_model_dir, interrupted, *args,
                                                      "--resume_from_checkpoint", "True"))["baselines"]["loss_filter"]
    for key in ("auc_high_loss_vs_corrupted", "fraction_dropped", "test_accuracy", "test_loss", "validation_loss"):
        assert resumed[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), key

    checkpoint = interrupted / "baseline-loss_filter" / "checkpoint-4"
    from safetensors.torch import load_file, save_file

    saved = load_file(str(checkpoint / "example_weights.safetensors"))
    assert int((saved["weights"] == 0).sum()) == round(0.3 * 40)  # the dropped set travels with the checkpoint
    save_file({"weights": saved["weights"]}, str(checkpoint / "example_weights.safetensors"))  # ranking lost
    shutil.rmtree(interrupted / "baseline-loss_filter" / "checkpoint-6")
    os.remove(interrupted / "metrics.json")
    with pytest.raises(CheckpointError, match=r"checkpoint of step 4 but lacks the loss filter's ranking"):
        data_reweighting.main(_per_example_args(tiny_model_dir, interrupted, *args, "--resume_from_checkpoint", "True"))


def test_overwrite_output_dir_starts_over(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-9").mkdir(parents=True)
    (out / "baseline" / "checkpoint-9").mkdir(parents=True)
    (out / "metrics.json").write_text('{"old": 1}')
    results = peft_regularization.main(tiny_run_args(tiny_model_dir, out, "--run_grid", "False",
                                                     "--overwrite_output_dir"))
    assert not (out / "checkpoint-9").exists() and not (out / "baseline" / "checkpoint-9").exists()
    assert json.loads((out / "metrics.json").read_text())["learned"]["outer_steps"] == results["learned"]["outer_steps"]


def test_push_script_errors(tmp_path):
    with pytest.raises(ValueError, match="has no outer_params.safetensors"):
        push_hyperparameters.main(["--outer_params_dir", str(tmp_path), "--repo_id", "me/x"])
    DataWeights(3).save_pretrained(str(tmp_path))
    with mock.patch.object(hub, "get_token", return_value=None), pytest.raises(HubError, match="no Hugging Face token"):
        push_hyperparameters.main(["--outer_params_dir", str(tmp_path), "--repo_id", "me/x"])


# ------------------------------------------------------------------ arguments that do not fit the model: before training

MODEL_MISFITS = [
    (["--weighting", "per_example", "--ihvp_method", "nystrom", "--nystrom_rank", "100000"],
     r"--nystrom_rank \(100000\) must not exceed the number of inner parameters \(\d+\); use --nystrom_rank <= \d+"),
    (["--lora_target_modules", "nosuch"], r"--lora_target_modules \['nosuch'\]: \w+: "),
    (["--hvp_mode", "finite_diff", "--ihvp_method", "nystrom"],
     r"hvp_mode='finite_diff' cannot differentiate the objective of LossWeights: it holds a stop-gradient"),
    (["--max_seq_length", "1000"], r"--max_seq_length 1000 exceeds the model's 64 positions"),
]


@pytest.mark.parametrize("extra, match", MODEL_MISFITS, ids=[a[-1] for a, _ in MODEL_MISFITS])
def test_arguments_that_do_not_fit_the_model_are_one_line_before_training(tiny_model_dir, tmp_path, extra, match):
    out = tmp_path / "out"
    with mock.patch.object(BilevelTrainer, "train", side_effect=AssertionError("trained")), \
            pytest.raises(InputError, match=match) as info:
        data_reweighting.main(tiny_run_args(tiny_model_dir, out, "--loss_filter_epochs", "0.2", *extra))
    assert "\n" not in str(info.value)


def test_a_file_with_more_classes_than_the_models_head_gets_a_new_head(tiny_model_dir, tmp_path):
    """A 3-class file on a 2-label classifier used to end in transformers' size-mismatch traceback; the scripts say
    the head is new, and now it is, whatever the checkpoint's number of labels."""
    rows = [(f"movie number {i}", "abc"[i % 3]) for i in range(30)]
    files = ["--train_file", write_csv(tmp_path / "t.csv", rows), "--validation_file",
             write_csv(tmp_path / "v.csv", rows[:12])]
    results = data_reweighting.main(tiny_run_args(tiny_model_dir, tmp_path / "out", *files, "--max_steps", "4",
                                                  "--run_baseline", "False", "--max_train_samples", "30"))
    assert results["num_train"] == 30 and results["outer_steps"] >= 1


def test_a_full_disk_while_writing_outputs_says_what_was_and_was_not_written(tiny_model_dir, tmp_path):
    out = tmp_path / "out"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with mock.patch("datasets.Dataset.save_to_disk", side_effect=full_disk), \
            pytest.raises(RunError, match=r"writing train_with_weights/ to '.*' failed \(No space left on device\); "
                                          r"written: the model and outer parameters; not written: train_with_weights/, "
                                          r"weights.png, metrics.json\. Without metrics.json the run counts as "
                                          r"incomplete"):
        data_reweighting.main(_per_example_args(tiny_model_dir, out, "--run_baseline", "False"))
    assert not [name for name in os.listdir(out) if name.endswith(".tmp") or ".tmp" in name]
    assert (out / "outer_params.safetensors").is_file() and not (out / "metrics.json").exists()


def test_the_command_line_turns_a_failed_write_into_one_line(tmp_path):
    def fail(_):
        raise OSError(28, "No space left on device", str(tmp_path / "checkpoint-4"))

    with pytest.raises(SystemExit) as info:
        runs.run_main(fail)
    assert str(info.value.code).startswith("error: No space left on device: ") and "\n" not in str(info.value.code)


# ------------------------------------------------------------------ a Hub that hangs: one line in seconds

HANG_CASES = [
    (data_reweighting, ["--model_name_or_path", "someuser/somemodel"], r"the model 'someuser/somemodel' "
                                                                         r"\(--model_name_or_path\)"),
    (data_reweighting, ["--tokenizer_name", "someuser/sometokenizer"], r"the model 'someuser/sometokenizer' "
                                                                        r"\(--tokenizer_name\)"),
    (data_reweighting, ["--dataset_name", "someuser/somedata"], r"the dataset 'someuser/somedata' \(--dataset_name\)"),
    (peft_regularization, ["--model_name_or_path", "someuser/somemodel"], r"the model 'someuser/somemodel' "
                                                                            r"\(--model_name_or_path\)"),
]


@pytest.mark.parametrize("script, extra, what", HANG_CASES, ids=[f"{s.__name__}:{e[0]}" for s, e, _ in HANG_CASES])
def test_a_hanging_hub_is_one_line_in_seconds(fake_hub, monkeypatch, tmp_path, script, extra, what):
    """--model_name_or_path someuser/somemodel against a hanging Hub used to be killed at 240 s with no output,
    HF_HUB_DOWNLOAD_TIMEOUT=3 and HF_HUB_ETAG_TIMEOUT=3 set."""
    import time

    from huggingface_hub import constants

    fake_hub("hang")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)  # a 2 s deadline
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    runs._REACHED.clear()
    start = time.monotonic()
    with mock.patch.object(data_reweighting, "build_lora_model", side_effect=AssertionError("model was built")), \
            pytest.raises(InputError, match=rf"reaching {what} at http://127.0.0.1:\d+ did not finish within 2 s") as info:
        script.main(["--output_dir", str(tmp_path / "out"), *extra])
    assert time.monotonic() - start < 30 and "\n" not in str(info.value)


def test_a_model_config_nested_100k_deep_is_one_clean_error(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(InputError, match=r"--(model_name_or_path|tokenizer_name) '.*' cannot be loaded: ") as info:
        text_classification.build_lora_model(text_classification.ModelArguments(model_name_or_path=str(folder)),
                                             ["neg", "pos"], seed=0)
    assert "\n" not in str(info.value)


def test_resume_with_loss_weights_refuses_a_checkpoint_of_other_data(tiny_model_dir, tmp_path):
    """LossWeights stored no data fingerprint: a resume on another data set was accepted."""
    out = tmp_path / "run"
    args = ("--run_baseline", "False", "--save_strategy", "steps", "--save_steps", "2")
    data_reweighting.main(tiny_run_args(tiny_model_dir, out, *args))
    with pytest.raises(CheckpointError, match=r"fingerprint was saved as '\w+' but '\w+' is expected\. They were "
                                              r"learned on other data"):
        data_reweighting.main(tiny_run_args(tiny_model_dir, out, *args, "--dataset_seed", "7",
                                            "--resume_from_checkpoint", str(out / "checkpoint-2")))


def test_scheduling_a_huge_run_takes_no_time(tmp_path):
    """--max_steps 100000000000 used to hang counting its outer steps, holding the output folder's lock."""
    import time

    from hf_integration import BilevelTrainingArguments

    args = BilevelTrainingArguments(output_dir=str(tmp_path), max_steps=10**11, unroll_steps=10, use_cpu=True)
    start = time.monotonic()
    assert runs.scheduled_outer_steps(args, 1000) == (10**11 - 1) // 10
    assert time.monotonic() - start < 1


def test_a_pushed_card_and_header_never_hold_the_training_files_path(tiny_model_dir, tmp_path):
    """--train_file /abs/path.csv then --push_to_hub used to put the absolute path in the pushed README,
    outer_config.json and the safetensors header."""
    secret = tmp_path / "home" / "alice" / "private"
    secret.mkdir(parents=True)
    files = _files(secret, "train.csv", _csv(ROWS * 2))
    uploaded: dict[str, bytes] = {}

    def upload_folder(**kwargs):
        for name in os.listdir(kwargs["folder_path"]):
            uploaded[name] = (Path(kwargs["folder_path"]) / name).read_bytes()
        return mock.Mock(commit_url="https://huggingface.co/me/w/commit/1", pr_url=None)

    with mock.patch.object(hub, "HfApi") as api_cls:
        api_cls.return_value.create_repo.return_value = mock.Mock(repo_id="me/w")
        api_cls.return_value.upload_folder.side_effect = upload_folder
        data_reweighting.main(tiny_run_args(tiny_model_dir, tmp_path / "out", *files, "--run_baseline", "False",
                                            "--push_to_hub", "True", "--hub_model_id", "me/w", "--hub_token", "hf_x"))
    assert {"README.md", "outer_config.json", "outer_params.safetensors"} <= set(uploaded)
    for name, data in uploaded.items():
        assert b"alice" not in data and str(tmp_path).encode() not in data, name
    assert b"train.csv" in uploaded["outer_config.json"]  # the file is still named, by its own name


def test_every_model_is_scored_by_the_plain_loss_under_label_smoothing(tiny_model_dir, tmp_path):
    """--label_smoothing_factor used to change the rivals (Trainer smooths its evaluation loss too) and not the
    bilevel run: the comparison of test losses was unfair. Every model now trains with it and is scored without."""
    import datasets
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.classifier.weight.mul_(300.0)  # confident predictions, where smoothing changes the loss
    data = datasets.Dataset.from_dict({"input_ids": [[101, 2000 + i, 102] for i in range(8)],
                                       "attention_mask": [[1, 1, 1]] * 8, "labels": [i % 2 for i in range(8)]})
    args = TrainingArguments(str(tmp_path), label_smoothing_factor=0.5, use_cpu=True, report_to=[], disable_tqdm=True,
                             per_device_eval_batch_size=8)
    trainer = Trainer(model=model, args=args, compute_metrics=text_classification.accuracy_metrics)
    smoothed = trainer.evaluate(eval_dataset=data)["eval_loss"]
    plain = text_classification.evaluate_splits(trainer, {"test": data})["test_loss"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(data["input_ids"]), attention_mask=torch.tensor(data["attention_mask"])).logits
    expected = float(torch.nn.functional.cross_entropy(logits, torch.tensor(data["labels"])))
    assert plain == pytest.approx(expected, rel=1e-5) and smoothed != pytest.approx(expected, rel=1e-3)
    assert trainer.label_smoother is not None  # put back
