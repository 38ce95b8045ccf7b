"""`examples/instruction_data_weights.py` end to end on a tiny budget (a 3-layer Llama from a config, a character
tokenizer with a ChatML template built in code, the generated instruction set, offline), its pieces -- the
generated data, prompt masking, the response-window collator and the cached decoder trunk (exact against the
full model) -- the weighted-dataset push with the Hub patched, and the early one-line errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from repo_scripts import load
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from hf_integration import LossWeights, hub, weights_dataset
from hf_integration.collators import ResponseCollator, response_window
from hf_integration.demo.instructions import CORRUPTIONS, make_instruction_splits
from hf_integration.frozen_trunk import CachedTrunkCausalLM, add_feature_rows
from hf_integration.instruction import to_prompt_completion
from hf_integration.losses import per_example_loss
from hf_integration.runs import InputError

script = load("examples/instruction_data_weights.py")

def tiny_args(model_dir: str, output_dir, *extra: str) -> list[str]:
    """A few-second run: 24 training examples, 4 inner steps, outer steps after the 3rd and the 4th."""
    return ["--model_name_or_path", model_dir, "--output_dir", str(output_dir), "--max_train_samples", "24",
            "--max_eval_samples", "8", "--max_length", "192", "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "16", "--max_steps", "4", "--unroll_steps", "1",
            "--outer_patience_steps", "2", "--warmup_steps", "0", "--hypergrad_train_batch_size", "8",
            "--outer_batch_size", "8", "--max_new_tokens", "3", "--disable_tqdm", "True", "--use_cpu", "True",
            "--logging_steps", "100", *extra]


METRIC_KEYS = {
    "auc_low_weight_vs_corrupted", "auc_low_weight_by_corruption", "precision_at_num_corrupted",
    "mean_weight_clean", "mean_weight_corrupted", "mean_weight_by_source", "weight_spread", "reweighted",
    "baselines", "baseline_description", "num_train", "num_corrupted", "corruption_counts", "inner_steps",
    "outer_steps", "wall_time_bilevel_s", "wall_time_baselines_s", "wall_time_total_s", "cached_frozen_layers",
    "export_top_fraction", "num_exported", "weighting", "model", "data",
}
SPLIT_METRICS = {"validation_loss", "test_loss", "test_loss_by_source", "test_exact_match",
                 "test_exact_match_by_source"}


def test_end_to_end_outputs(tiny_chat_dir, tmp_path, capsys):
    import datasets

    out = tmp_path / "run"
    results = script.main(tiny_args(tiny_chat_dir, out))

    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics) and results["num_train"] == metrics["num_train"] == 24
    assert metrics["num_corrupted"] == 7 and sum(metrics["corruption_counts"].values()) == 7  # round(0.3 * 24)
    assert set(metrics["auc_low_weight_by_corruption"]) <= set(CORRUPTIONS)
    assert metrics["inner_steps"] == 4 and metrics["outer_steps"] == 2
    assert 0.0 <= metrics["auc_low_weight_vs_corrupted"] <= 1.0
    assert SPLIT_METRICS <= set(metrics["reweighted"])
    by_source = metrics["reweighted"]["test_loss_by_source"]
    assert set(by_source) == set(metrics["reweighted"]["test_exact_match_by_source"])
    assert min(by_source.values()) <= metrics["reweighted"]["test_loss"] <= max(by_source.values())
    assert set(metrics["baselines"]) == {"uniform", "loss_filter", "uniform_train_val", "length_filter", "ifd_filter"}
    for name, baseline in metrics["baselines"].items():
        assert SPLIT_METRICS <= set(baseline) and baseline["wall_time_s"] > 0
        assert metrics["wall_time_baselines_s"][name] == baseline["wall_time_s"]
        assert np.isfinite(baseline["test_loss"]) and 0.0 <= baseline["test_exact_match"] <= 1.0
    loss_filter = metrics["baselines"]["loss_filter"]
    assert 0.0 <= loss_filter["auc_high_loss_vs_corrupted"] <= 1.0 and loss_filter["fraction_dropped"] == 0.3
    for name in ("length_filter", "ifd_filter"):  # ranked before training, reported like the loss filter
        ranking = metrics["baselines"][name]
        assert 0.0 <= ranking["auc_ranking_vs_corrupted"] <= 1.0 and ranking["fraction_dropped"] == 0.3
        assert set(ranking["auc_ranking_by_corruption"]) == set(metrics["auc_low_weight_by_corruption"])
    assert metrics["cached_frozen_layers"] is True
    assert metrics["train_on_validation"] is True  # the default with --weighting loss

    weights = LossWeights.from_pretrained(str(out))
    assert weights.metadata["outer_steps"] == "2"
    assert weights.trusted_column == "trusted"  # the validation rows of the inner problem, not loss-weighted
    assert weights.trusted_share == "uniform"  # ... and at their uniform share of each batch (--trusted_share)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()

    table = datasets.load_from_disk(str(out / "train_with_weights"))
    assert len(table) == 24 and {"messages", "source", "corrupted", "corruption", "example_id", "weight"} <= set(
        table.column_names)
    w = np.asarray(table["weight"])
    assert np.all((w > 0) & (w < 1)) and sum(table["corrupted"]) == 7
    card = (out / "train_with_weights" / "README.md").read_text()
    assert "weight_mean" in card and "auc_low_weight_vs_corrupted" in card and "LossWeights" in card

    top = datasets.load_from_disk(str(out / "top_weighted"))
    lines = (out / "top_weighted.jsonl").read_text().splitlines()
    assert len(top) == len(lines) == metrics["num_exported"] == round(0.7 * 24)
    assert min(table["weight"][i] for i in top["example_id"]) >= np.sort(w)[::-1][len(top) - 1] - 1e-12
    assert json.loads(lines[0])["messages"][-1]["role"] == "assistant"

    printed = capsys.readouterr().out
    assert "| learned data weights (loss, bilevel)" in printed and "| uniform weights (plain SFT) |" in printed
    assert "| loss filter (initial model) |" in printed and "AUC of the loss filter's ranking" in printed
    assert "test exact match" in printed and "AUC by corruption kind" in printed
    assert "AUC of the ifd filter's ranking" in printed and "| length filter |" in printed  # per kind too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("weighting", ["loss", "source+per_example"])
def test_end_to_end_on_cuda(tiny_chat_dir, tmp_path, weighting):
    """The one-GPU line: the frozen trunk is cached on the GPU, and the loss rankings, the learned weights and
    the greedy answers take their tensors to the model's device (the ranking of the trained model once failed
    there with a device mismatch)."""
    out = tmp_path / "run"
    script.main(tiny_args(tiny_chat_dir, out, "--use_cpu", "False", "--weighting", weighting))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cached_frozen_layers"] is True and metrics["outer_steps"] == 2
    for result in (metrics["reweighted"], *metrics["baselines"].values()):
        assert np.isfinite(result["test_loss"]) and 0.0 <= result["test_exact_match"] <= 1.0
    assert 0.0 <= metrics["auc_low_weight_vs_corrupted"] <= 1.0


def test_source_times_per_example_weights(tiny_chat_dir, tmp_path):
    """--weighting source+per_example: each example's weight is its source's weight times its own."""
    import datasets

    from hf_integration import OuterModule

    script.main(tiny_args(tiny_chat_dir, tmp_path, "--weighting", "source+per_example", "--run_baseline", "False",
                          "--exact_match_splits", "none"))
    combined = OuterModule.from_pretrained(str(tmp_path))
    sources, examples = combined.parts
    table = datasets.load_from_disk(str(tmp_path / "train_with_weights"))
    names = sorted(set(table["source"]))
    assert sources.source_names == names
    expected = (sources.weights().detach().numpy()[[names.index(s) for s in table["source"]]]
                * examples.weights().detach().numpy()[np.asarray(table["example_id"])])
    np.testing.assert_allclose(table["weight"], expected, rtol=1e-5)


def test_prompt_free_reference_weights(tiny_chat_dir, tmp_path):
    """--loss_reference prompt_free: every training row carries its response's prompt-free loss under the initial
    model, the outer problem learns reference_scale beside loss_scale, the saved module reads the column back, and
    the exported table is the user's rows with finite, non-uniform weights (the column stays internal)."""
    import datasets

    from hf_integration import OuterModule

    results = script.main(tiny_args(tiny_chat_dir, tmp_path, "--loss_reference", "prompt_free",
                                    "--init_reference_scale", "0.5", "--run_baseline", "False",
                                    "--exact_match_splits", "none"))
    module = OuterModule.from_pretrained(str(tmp_path))
    assert isinstance(module, LossWeights) and module.reference_column == script.REFERENCE_COLUMN
    assert results["loss_reference"] == "prompt_free" and results["outer_steps"] == 2
    scale = results["outer_parameters"]["reference_scale"]
    assert scale == pytest.approx(float(module.reference_scale)) and scale != 0.5  # it learned
    table = datasets.load_from_disk(str(tmp_path / "train_with_weights"))
    assert script.REFERENCE_COLUMN not in table.column_names and len(table) == 24  # the user's rows, weighted
    assert np.all(np.isfinite(table["weight"])) and np.ptp(table["weight"]) > 0


def test_prompt_free_reference_matches_the_ifd_denominator(tiny_chat_dir, chat_tokenizer):
    """The reference is L(response) of the IFD filter; a response of one token, which has none, gets the others'
    mean."""
    import datasets
    from transformers import AutoModelForCausalLM

    from hf_integration.filters import prompt_free_reference, response_losses_with_and_without_prompt

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir)
    data = datasets.Dataset.from_list([{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
                                       {"input_ids": [5, 6, 11], "labels": [-100, -100, 11]},
                                       {"input_ids": [4, 12, 13, 14], "labels": [-100, 12, 13, 14]}])
    _, alone = response_losses_with_and_without_prompt(model, data, chat_tokenizer.pad_token_id, batch_size=2)
    reference = prompt_free_reference(model, data, chat_tokenizer.pad_token_id, batch_size=2)
    assert np.isnan(alone[1]) and not np.isnan(alone[[0, 2]]).any()
    np.testing.assert_allclose(reference, [alone[0], (alone[0] + alone[2]) / 2, alone[2]], rtol=1e-12)


# ------------------------------------------------------------------------- pieces
def test_generated_data_is_deterministic_and_corrupted_as_described():
    a = make_instruction_splits(40, 10, 10, noise_rate=0.3, seed=3)
    b = make_instruction_splits(40, 10, 10, noise_rate=0.3, seed=3)
    assert a["train"]["messages"] == b["train"]["messages"]
    clean = make_instruction_splits(40, 10, 10, noise_rate=0.0, seed=3)["train"]
    kinds = a["train"]["corruption"]
    assert sum(a["train"]["corrupted"]) == 12 and sorted(k for k in kinds if k) == sorted(CORRUPTIONS * 3)
    for row, original, kind in zip(a["train"]["messages"], clean["messages"], kinds):
        response, reference = row[-1]["content"], original[-1]["content"]
        assert row[0] == original[0]  # the prompt is never touched
        assert (response == reference) == (kind == "")
        if kind == "truncated":
            assert reference.startswith(response) and len(response) < len(reference)
    assert not any(a["validation"]["corrupted"]) and not any(a["test"]["corrupted"])
    assert len(set(a["train"]["source"])) >= 5


def _sft_trainer(model_dir, tokenizer, rows, tmp_path, **config):
    """A BilevelSFTTrainer on ``rows`` (prompt/completion) as the job builds it: TRL prepares the rows."""
    from transformers import AutoModelForCausalLM

    from hf_integration.sft import BilevelSFTConfig, BilevelSFTTrainer

    args = BilevelSFTConfig(output_dir=str(tmp_path / "sft"), recipe="sft_data_weighting", use_cpu=True, bf16=False,
                            report_to="none", per_device_train_batch_size=2,
                            **{"max_length": 512, script.CHECKPOINTING: False, **config})
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return BilevelSFTTrainer(model=model, args=args, train_dataset=rows, outer_dataset=rows, processing_class=tokenizer)


def test_trl_masks_the_prompt_of_the_rows(tiny_chat_dir, chat_tokenizer, tmp_path):
    """The job's rows (prompt/completion from ``messages``) are rendered with the chat template by TRL, the loss on
    the response only; truncation that leaves an example without a response token is refused, not dropped."""
    import datasets

    tokenizer = chat_tokenizer
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    rows = to_prompt_completion(datasets.Dataset.from_dict({"messages": [messages] * 2, "source": ["add"] * 2}))
    assert rows.column_names == ["source", "prompt", "completion"] and rows[0]["completion"] == messages[1:]
    prepared = _sft_trainer(tiny_chat_dir, tokenizer, rows, tmp_path).train_dataset[0]
    prompt = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    prompt_length = 1 + len("user\nWhat is 2 + 3?") + 1 + 1 + 1 + len("assistant\n")  # specials count as one
    assert tokenizer.decode(prepared["input_ids"][:prompt_length]) == prompt
    assert prepared["labels"][:prompt_length] == [-100] * prompt_length
    response = prepared["labels"][prompt_length:]
    assert response == prepared["input_ids"][prompt_length:]
    assert tokenizer.convert_ids_to_tokens(response) == ["5", "<|im_end|>", "\n"]
    with pytest.raises(ValueError, match=r"`max_length` 10 leaves 4 of 4 training example\(s\) without a completion"):
        _sft_trainer(tiny_chat_dir, tokenizer, rows, tmp_path, max_length=10)


def test_response_window_compacts_the_labels():
    labels = torch.tensor([[-100, -100, -100, 8, 9], [-100, 6, 7, -100, -100], [4, -100, -100, -100, -100]])
    window, positions = response_window(labels)
    assert window.tolist() == [[8, 9], [6, 7], [-100, -100]]  # the first token is never predicted
    assert positions.tolist() == [[2, 3], [0, 1], [0, 0]]  # the position before each target


def test_response_collator_on_trls_collator():
    features = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, -100, 8, 9], "example_id": 3, "text": "a"},
                {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "example_id": 0, "text": "b"}]
    batch = ResponseCollator(DataCollatorForLanguageModeling(pad_token_id=2))(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[8, 9], [6, 7]]
    assert batch["response_positions"].tolist() == [[2, 3], [0, 1]]
    assert batch["example_id"].tolist() == [3, 0] and "text" not in batch
    left = DataCollatorForLanguageModeling(pad_token_id=2)
    with pytest.raises(ValueError, match="right-padded"):
        ResponseCollator(lambda f: {**left(f), "attention_mask": torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])})(
            features)


def _encode(tokenizer, messages):
    """``input_ids`` of the conversation and ``labels`` -100 on the prompt (what TRL's preparation gives)."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)["input_ids"]
    full = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    return {"input_ids": full, "labels": [-100] * len(prompt) + full[len(prompt):]}


@pytest.mark.parametrize("cache", [True, False])
def test_cached_decoder_matches_the_full_model(tiny_chat_dir, chat_tokenizer, cache):
    """Per-example response losses and LoRA gradients of the wrapper (from the cached trunk, or recomputing it)
    equal those of the full PEFT model with its usual shifted loss, on a right-padded batch."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tokenizer = chat_tokenizer
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_dir)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 2]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    model.eval()
    raw = make_instruction_splits(6, 3, 0, noise_rate=0.0, seed=1)
    tokenized = add_feature_rows({role: raw[role].map(lambda row: _encode(tokenizer, row["messages"]),
                                                      remove_columns=raw[role].column_names)
                                  for role in ("train", "validation")})
    collator = ResponseCollator(DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id))
    wrapper = CachedTrunkCausalLM(model, cache=cache)
    assert wrapper.first_layer == 1 and wrapper.cache is cache
    wrapper.cache_features(tokenized, collator, batch_size=4)
    rows = [tokenized["validation"][i] for i in range(3)]
    batch = collator(rows)
    fast = per_example_loss(wrapper(**batch).logits, batch["labels"], causal_lm=False)

    width = batch["input_ids"].shape[1]
    labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
    full = per_example_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                            labels, causal_lm=True)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(fast.mean(), trainable), torch.autograd.grad(full.mean(), trainable)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert "features" not in wrapper.state_dict()


def test_prompt_completion_and_messages_files(tmp_path):
    """Both formats load into the same conversations; string prompts become user turns."""
    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    pairs = [(f"What is {i} + 10?", str(i + 10)) for i in range(6)]
    pc = write("pc.jsonl", [{"question": q, "answer": a, "task": "add"} for q, a in pairs])
    conversational = write("m.jsonl", [{"messages": [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]} for q, a in pairs])
    args = script.InstructionDataArguments(train_file=pc, validation_file=pc, prompt_column="question",
                                           completion_column="answer", source_column="task")
    splits = script.load_instruction_splits(args)
    assert splits.train[0]["messages"] == [{"role": "user", "content": "What is 0 + 10?"},
                                           {"role": "assistant", "content": "10"}]
    assert set(splits.train["source"]) == {"add"} and not any(splits.train["corrupted"])
    splits = script.load_instruction_splits(script.InstructionDataArguments(
        train_file=conversational, validation_file=conversational, noise_rate=0.5,
        corruption_kinds=["truncated", "off_task"]))
    assert splits.train[0]["messages"][0]["role"] == "system" and set(splits.train["source"]) == {"all"}
    assert sorted(k for k in splits.train["corruption"] if k) == ["off_task", "truncated", "truncated"]
    assert not any(splits.validation["corrupted"])


# ------------------------------------------------------------------------- the weighted-dataset push
def test_push_weights_dataset_with_card(tiny_chat_dir, tmp_path, capsys):
    uploaded: dict = {}

    def upload_file(**kwargs):
        uploaded["card"] = kwargs["path_or_fileobj"].decode()
        uploaded["card_repo"] = (kwargs["repo_id"], kwargs["repo_type"])

    def push_to_hub(self, repo_id, **kwargs):
        uploaded["rows"], uploaded["columns"], uploaded["repo_id"] = len(self), self.column_names, repo_id
        return mock.Mock(commit_url="https://huggingface.co/datasets/me/w/commit/1")

    with mock.patch.object(hub, "HfApi") as api_cls, mock.patch.object(weights_dataset, "HfApi") as upload_cls, \
            mock.patch("datasets.Dataset.push_to_hub", push_to_hub):
        api_cls.return_value.create_repo.return_value = mock.Mock(repo_id="me/w")
        upload_cls.return_value.upload_file.side_effect = upload_file
        results = script.main(tiny_args(tiny_chat_dir, tmp_path, "--run_baseline", "False", "--exact_match_splits",
                                        "none", "--push_weights_to_hub", "True", "--weights_repo_id", "me/w",
                                        "--hub_token", "hf_test"))
    creates = api_cls.return_value.create_repo.call_args_list
    assert len(creates) == 2 and all(c.kwargs.get("repo_type") == "dataset" for c in creates)  # start + push
    assert uploaded["repo_id"] == "me/w" and uploaded["card_repo"] == ("me/w", "dataset")
    assert uploaded["rows"] == 24 and "weight" in uploaded["columns"]
    card = uploaded["card"]
    for figure in ("auc_low_weight_vs_corrupted", "weight_mean", "weight_frac_below_half", "mean_weight_corrupted",
                   "Mean weight by `source`", 'load_dataset("me/w", split="train")', "WeightedRandomSampler"):
        assert figure in card
    assert f"| auc_low_weight_vs_corrupted | {results['auc_low_weight_vs_corrupted']:.4g} |" in card
    assert results["weights_dataset_url"] == "https://huggingface.co/datasets/me/w/commit/1"
    assert 'datasets.load_dataset("me/w", split="train")' in capsys.readouterr().out


# ------------------------------------------------------------------------- bad input: one error, before any model
@pytest.fixture
def no_model():
    """Fail the test if the model is loaded: the errors below must come before it."""
    with mock.patch.object(script, "load_base_model", side_effect=AssertionError("model was loaded")):
        yield


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_unknown_column_names_the_argument(tmp_path, no_model):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}] * 4)
    with pytest.raises(InputError, match=r"--messages_column 'messages' is not a column of --train_file; its columns "
                                         r"are \['prompt', 'completion'\]"):
        script.main(["--output_dir", str(tmp_path / "o"), "--train_file", data, "--validation_file", data])
    with pytest.raises(InputError, match=r"--completion_column 'answer' is not a column"):
        script.main(["--output_dir", str(tmp_path / "o2"), "--train_file", data, "--validation_file", data,
                     "--prompt_column", "prompt", "--completion_column", "answer"])


def test_empty_file_names_the_argument(tmp_path, no_model):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}] * 4)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match=r"--validation_file is empty"):
        script.main(["--output_dir", str(tmp_path / "o"), "--train_file", data, "--validation_file", str(empty)])


def test_conversation_without_a_response_is_refused(tmp_path, no_model):
    data = _jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 4)
    with pytest.raises(InputError, match=r"row 0: the conversation must end with an assistant message"):
        script.main(["--output_dir", str(tmp_path / "o"), "--train_file", data, "--validation_file", data])


def test_negative_loss_warmup_is_refused(tmp_path, no_model):
    with pytest.raises(InputError, match=r"--loss_warmup_epochs must be >= 0, got -1.0"):
        script.main(["--output_dir", str(tmp_path / "o"), "--loss_warmup_epochs", "-1"])


def test_loss_reference_needs_loss_weights(tmp_path, no_model):
    with pytest.raises(InputError, match=r"--loss_reference prompt_free needs --weighting loss, got --weighting "
                                         r"per_example"):
        script.main(["--output_dir", str(tmp_path / "o"), "--loss_reference", "prompt_free", "--weighting",
                     "per_example"])


def test_push_without_repo_id(tmp_path, no_model):
    with pytest.raises(InputError, match=r"--push_weights_to_hub needs --weights_repo_id"):
        script.main(["--output_dir", str(tmp_path / "o"), "--push_weights_to_hub", "True"])


def test_push_is_checked_before_any_work(tmp_path, no_model):
    with mock.patch.object(hub, "HfApi") as api_cls:
        api_cls.return_value.create_repo.side_effect = OSError("no route to host")
        with pytest.raises(hub.HubError, match=r"cannot create or reach the Hub dataset repo 'me/w'"):
            script.main(["--output_dir", str(tmp_path / "o"), "--push_weights_to_hub", "True",
                         "--weights_repo_id", "me/w", "--hub_token", "hf_test"])


def test_command_line_exit_status_and_one_line(tmp_path):
    path = os.path.join(os.path.dirname(script.__file__), "instruction_data_weights.py")
    proc = subprocess.run([sys.executable, path, "--output_dir", str(tmp_path / "o"), "--messages_column", "nope",
                           "--prompt_column", "q"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == ("error: --prompt_column and --completion_column go together "
                                                    "(prompt/completion format); pass both, or neither for "
                                                    "--messages_column.")


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for option in ("--weighting", "--messages_column", "--prompt_column", "--completion_column", "--noise_rate",
                   "--corruption_kinds", "--baselines", "--loss_filter_fraction", "--export_top_fraction",
                   "--push_weights_to_hub", "--weights_repo_id", "--exact_match_splits", "--cache_frozen_layers",
                   "--lora_layers", "--outer_learning_rate", "--loss_reference", "--init_reference_scale"):
        assert option in printed


def _user_files(tmp_path, corrupted_value):
    """24 training and 8 validation conversations of the user's own, with a `corrupted` column as text."""
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i + 1}?"},
                          {"role": "assistant", "content": str(2 * i + 1)}], "corrupted": corrupted_value}
            for i in range(24)]
    train, val = tmp_path / "t.jsonl", tmp_path / "v.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    val.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows[:8]))
    return rows, ["--train_file", str(train), "--validation_file", str(val)]


def test_the_users_data_is_never_corrupted_without_noise_rate(tiny_chat_dir, tmp_path):
    """The demo's noise rate used to apply to the user's own file: 7 of 24 responses were replaced and the exported
    "best" subset held 6 of them; and a `corrupted` column of "no" was read as true."""
    import datasets

    rows, files = _user_files(tmp_path, "no")
    out = tmp_path / "run"
    results = script.main(tiny_args(tiny_chat_dir, out, *files, "--max_train_samples", "100", "--max_eval_samples",
                                    "100", "--baselines", "uniform"))
    assert results["noise_rate"] == 0.0 and results["num_corrupted"] == 0 and results["corruption_counts"] == {}
    table = datasets.load_from_disk(str(out / "train_with_weights"))
    originals = [json.dumps(r["messages"], sort_keys=True) for r in rows]
    assert sorted(json.dumps(m, sort_keys=True) for m in table["messages"]) == sorted(originals)
    assert not any(table["corrupted"])
    exported = [json.loads(line) for line in (out / "top_weighted.jsonl").read_text().splitlines()]
    assert exported and all(json.dumps(r["messages"], sort_keys=True) in originals for r in exported)


@pytest.mark.parametrize("value, flag", [("no", False), ("No", False), ("false", False), ("0", False), (0, False),
                                         (False, False), ("yes", True), ("TRUE", True), (1, True), (True, True)])
def test_corrupted_flags_are_read_as_words_not_truthiness(tmp_path, value, flag):
    _, files = _user_files(tmp_path, value)
    splits = script.load_instruction_splits(script.InstructionDataArguments(train_file=files[1],
                                                                            validation_file=files[3]))
    assert splits.train["corrupted"] == [flag] * 24
    assert splits.train["corruption"] == (["corrupted"] if flag else [""]) * 24


@pytest.mark.parametrize("value, message", [("maybe", r"row 0: 'maybe' is not a yes/no value"),
                                            (None, r"row 0: missing value"), (2, r"row 0: 2 is not a yes/no value")])
def test_an_unreadable_corrupted_flag_is_one_clean_error(tmp_path, value, message):
    _, files = _user_files(tmp_path, value)
    with pytest.raises(InputError, match=rf"column 'corrupted' of --train_file, {message}; use true/false"):
        script.load_instruction_splits(script.InstructionDataArguments(train_file=files[1], validation_file=files[3]))


def test_checkpoints_of_a_tied_embedding_model_hold_its_adapter_and_resume(tiny_chat_dir, tmp_path):
    """The tiny Llama ties its input and output embeddings, as SmolLM2 does: the first checkpoint used to die on
    safetensors' "Some tensors share memory" (Trainer saved the cached-trunk wrapper's whole state dict)."""
    out = tmp_path / "run"
    args = ("--save_strategy", "steps", "--save_steps", "2", "--baselines", "uniform", "loss_filter")
    full = script.main(tiny_args(tiny_chat_dir, out, *args))
    for folder in ("checkpoint-2", "baseline-uniform/checkpoint-2", "baseline-loss_filter/checkpoint-4"):
        files = set(os.listdir(out / folder))
        assert "adapter_model.safetensors" in files and "model.safetensors" not in files, folder
    assert "example_weights.safetensors" in os.listdir(out / "baseline-loss_filter" / "checkpoint-2")
    for folder in ("checkpoint-4", "baseline-uniform/checkpoint-4", "baseline-loss_filter/checkpoint-4"):
        __import__("shutil").rmtree(out / folder)  # killed before the last checkpoints
    os.remove(out / "metrics.json")
    resumed = script.main(tiny_args(tiny_chat_dir, out, *args, "--resume_from_checkpoint", "True"))
    assert resumed["resumed_from"] == str(out / "checkpoint-2")


    def close(a, b, where):  # the same metrics, floats within float32 round-off, wall times aside
        if isinstance(a, dict):
            keys = {k for k in a if not k.endswith("time_s")}
            assert keys == {k for k in b if not k.endswith("time_s")}, where
            for k in keys:
                close(a[k], b[k], f"{where}.{k}")
        elif isinstance(a, float):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6), where
        else:
            assert a == b, where

    for name in ("reweighted", "baselines", "auc_low_weight_vs_corrupted", "mean_weight_clean"):
        close(resumed[name], full[name], name)
