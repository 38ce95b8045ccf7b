"""`BilevelSFTTrainer` / `BilevelSFTConfig`: TRL's SFT with learned data weights, on a tiny Llama and a word-level
tokenizer with a chat template, both built in code (offline, CPU)."""

from __future__ import annotations

import dataclasses
import logging
import random

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # noqa: E402

from hf_integration import BilevelTrainingArguments, DataWeights, add_example_ids  # noqa: E402
from hf_integration.sft import BilevelSFTConfig, BilevelSFTTrainer, KeepColumnsCollator  # noqa: E402

WORDS = "what is plus minus the sum of one two three four five six seven eight nine ten yes no".split()
ROLES = ["<|user|>", "<|assistant|>"]
# assistant turns inside {% generation %}: TRL's assistant_only_loss reads the assistant-token mask from it
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|> {% generation %}{{ m['content'] }}<eos>"
    "{% endgeneration %} {% else %}<|{{ m['role'] }}|> {{ m['content'] }}<eos> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}")


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)  # TRL pings on init


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<eos>", *ROLES, *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                  additional_special_tokens=ROLES)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _model(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(config)


def _sums(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` different questions "what is a plus b" and their answers."""
    numbers = WORDS[6:16]
    pairs = random.Random(seed).sample([(a, b) for a in range(5) for b in range(5)], n)
    return [(f"what is {numbers[a]} plus {numbers[b]}", f"the sum is {numbers[a + b]}") for a, b in pairs]


def _conversations(n: int, seed: int) -> Dataset:
    return Dataset.from_list([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                              for q, a in _sums(n, seed)])


def _prompt_completions(n: int, seed: int) -> Dataset:
    return Dataset.from_list([{"prompt": q, "completion": " " + a} for q, a in _sums(n, seed)])


# transformers 5 renamed gradient_checkpointing (a deprecated alias now)
_CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in BilevelSFTConfig.__dataclass_fields__
                  else "gradient_checkpointing")


def _args(tmp_path, **overrides) -> BilevelSFTConfig:
    defaults = dict(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=2, per_device_eval_batch_size=4,
                    learning_rate=1e-2, unroll_steps=2, outer_learning_rate=0.1, nystrom_rank=2,
                    hypergrad_train_batch_size=2, outer_batch_size=4, hvp_mode="rev_rev", use_cpu=True, bf16=False,
                    report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    defaults[_CHECKPOINTING] = False  # TRL's default is on
    defaults.update(overrides)
    return BilevelSFTConfig(**defaults)


def _spy_hypergradient_batches(trainer) -> list[int]:
    """Record the example ids of every hypergradient's training batch."""
    seen: list[int] = []
    original = trainer.compute_hypergradient

    def compute_hypergradient(train_batch, eval_batch, generator=None):
        seen.extend(train_batch["example_id"].tolist())
        return original(train_batch, eval_batch, generator)

    trainer.compute_hypergradient = compute_hypergradient
    return seen


def _assert_only_batch_weights_moved(weights: DataWeights, seen: list[int]) -> None:
    moved = {i for i, v in enumerate(weights.logits.detach().tolist()) if v != 0.0}
    assert seen and moved == set(seen), (moved, seen)
    assert len(moved) < weights.num_examples  # some examples were never in a hypergradient batch: untouched


# ---------------------------------------------------------------------- config


def test_config_is_sft_config_plus_bilevel_fields_with_their_help_and_defaults(tmp_path):
    fields = {f.name: f for f in dataclasses.fields(BilevelSFTConfig)}
    sft = {f.name: f for f in dataclasses.fields(SFTConfig)}
    bilevel = {f.name: f for f in dataclasses.fields(BilevelTrainingArguments)}
    assert set(fields) == set(sft) | set(bilevel)
    for name, f in fields.items():
        source = sft.get(name) or bilevel[name]  # TRL's copy where it overrides TrainingArguments
        assert f.metadata.get("help") and f.metadata.get("help") == source.metadata.get("help"), name
        assert f.default == source.default, name
    config = BilevelSFTConfig(output_dir=str(tmp_path), use_cpu=True)
    assert isinstance(config, SFTConfig) and isinstance(config, BilevelTrainingArguments)
    assert (config.learning_rate, config.logging_steps, config.unroll_steps) == (2e-5, 10, 10)  # TRL's, ours
    with pytest.raises(ValueError, match="unroll_steps"):
        BilevelSFTConfig(output_dir=str(tmp_path), use_cpu=True, unroll_steps=0)
    (parsed,) = HfArgumentParser(BilevelSFTConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--unroll_steps", "3", "--completion_only_loss", "false",
         "--hvp_mode", "fwd_rev"])
    assert (parsed.unroll_steps, parsed.completion_only_loss, parsed.hvp_mode) == (3, False, "fwd_rev")


# ---------------------------------------------------------------------- training


def test_conversational_data_trains_and_only_the_weights_of_batch_examples_move(tmp_path, tokenizer):
    train = add_example_ids(_conversations(8, seed=0))
    weights = DataWeights(len(train))
    trainer = BilevelSFTTrainer(model=_model(tokenizer), args=_args(tmp_path, assistant_only_loss=True),
                                train_dataset=train, eval_dataset=_conversations(4, seed=1),
                                processing_class=tokenizer, outer_module=weights)
    assert isinstance(trainer.data_collator, KeepColumnsCollator)
    batch = trainer._sample_batch(trainer.train_dataset, 2, torch.Generator().manual_seed(0), "training")
    assert batch["example_id"].dtype == torch.long and batch["example_id"].shape == (2,)
    # assistant-only loss: exactly the assistant's answer and its <eos> are labelled
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        tokens = tokenizer.convert_ids_to_tokens(ids)
        start = tokens.index("<|assistant|>") + 1
        end = start + tokens[start:].index("<eos>") + 1
        assert [t for t, label in zip(ids, labels) if label != -100] == ids[start:end]

    seen = _spy_hypergradient_batches(trainer)
    trainer.train()
    assert trainer.outer_step == 2 and trainer.hvp_mode == "rev_rev"
    assert torch.isfinite(weights.logits).all()
    _assert_only_batch_weights_moved(weights, seen)


class _RecordingWeights(DataWeights):
    """DataWeights that keep the per-example losses and ids of their last plain call."""

    def forward(self, per_example_loss, batch, inner_params):
        self.last = (per_example_loss.detach().clone(), batch[self.id_column].clone())
        return super().forward(per_example_loss, batch, inner_params)


def test_prompt_completion_loss_masks_the_prompt_and_training_moves_batch_weights(tmp_path, tokenizer):
    raw = _prompt_completions(8, seed=2)
    train = add_example_ids(raw).shuffle(seed=0)  # ids, not positions, name the examples
    weights = _RecordingWeights(len(train))
    model = _model(tokenizer, seed=1)
    trainer = BilevelSFTTrainer(model=model, args=_args(tmp_path, max_steps=3, unroll_steps=1, hvp_mode="auto"),
                                train_dataset=train, eval_dataset=_prompt_completions(4, seed=3),
                                processing_class=tokenizer, outer_module=weights,
                                data_collator=DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id))
    assert isinstance(trainer.data_collator, KeepColumnsCollator)  # TRL's collator, passed in: ids put back
    batch = trainer._sample_batch(trainer.train_dataset, 3, torch.Generator().manual_seed(1), "training")
    trainer.compute_loss(model.train(), batch)
    losses, ids = weights.last

    # by hand: mean cross-entropy of the completion tokens (and <eos>) given everything before them
    model.eval()
    counts = []
    for loss, example_id in zip(losses, ids.tolist()):
        prompt, completion = raw[example_id]["prompt"], raw[example_id]["completion"]
        prompt_ids = tokenizer(prompt)["input_ids"]
        full_ids = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
        assert full_ids[:len(prompt_ids)] == prompt_ids
        with torch.no_grad():
            logits = model(torch.tensor([full_ids])).logits[0]
        targets = torch.tensor(full_ids[len(prompt_ids):])
        expected = F.cross_entropy(logits[len(prompt_ids) - 1:-1], targets)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        counts.append(len(targets))
    # and TRL's own loss (a token mean over the batch, fused LM head) is the token-weighted mean of ours
    counts = torch.tensor(counts, dtype=losses.dtype)
    with torch.no_grad():
        trl_loss = SFTTrainer.compute_loss(trainer, model, {k: v for k, v in batch.items() if k != "example_id"})
    torch.testing.assert_close(trl_loss, (losses * counts).sum() / counts.sum(), rtol=1e-5, atol=1e-6)

    seen = _spy_hypergradient_batches(trainer)
    trainer.train()
    assert trainer.outer_step == 2 and trainer.hvp_mode in ("rev_rev", "fwd_rev", "finite_diff")
    _assert_only_batch_weights_moved(weights, seen)


def test_peft_config_trains_the_adapter_and_saves_it_with_the_weights(tmp_path, tokenizer):
    from peft import LoraConfig

    train = add_example_ids(_conversations(6, seed=0))
    weights = DataWeights(len(train))
    trainer = BilevelSFTTrainer(model=_model(tokenizer), args=_args(tmp_path, max_steps=3, unroll_steps=2),
                                train_dataset=train, eval_dataset=_conversations(4, seed=1),
                                processing_class=tokenizer, outer_module=weights,
                                peft_config=LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert trainer.inner_param_names and all("lora_" in n for n in trainer.inner_param_names)
    trainer.train()
    assert trainer.outer_step == 1 and weights.logits.abs().sum() > 0
    trainer.save_model(str(tmp_path / "final"))
    saved = DataWeights.from_pretrained(str(tmp_path / "final"))
    torch.testing.assert_close(saved.logits, weights.logits.detach())
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()


def test_every_column_of_a_combined_module_reaches_the_batch(tmp_path, tokenizer):
    from hf_integration import CombinedWeights, SourceWeights

    train = add_example_ids(_prompt_completions(6, seed=0))
    train = train.add_column("source_id", [i % 2 for i in range(len(train))])
    module = CombinedWeights([SourceWeights(["even", "odd"]), DataWeights(len(train))])
    trainer = BilevelSFTTrainer(model=_model(tokenizer), args=_args(tmp_path), train_dataset=train,
                                eval_dataset=_prompt_completions(2, seed=1), processing_class=tokenizer,
                                outer_module=module)
    batch = trainer._sample_batch(trainer.train_dataset, 4, torch.Generator().manual_seed(0), "training")
    assert torch.equal(batch["source_id"], batch["example_id"] % 2)
    assert torch.isfinite(trainer.compute_loss(trainer.model.train(), batch))


# ---------------------------------------------------------------------- refusals


@pytest.mark.parametrize("option, match", [
    ({"packing": True}, r"`packing=True` cannot be used with per-example weights: one packed row mixes examples; "
                        r"set packing=False"),
    ({"padding_free": True}, r"`padding_free=True` cannot be used with per-example weights"),
], ids=["packing", "padding_free"])
def test_packing_with_per_example_weights_is_refused(tmp_path, tokenizer, option, match):
    train = add_example_ids(_prompt_completions(4, seed=0))
    with pytest.raises(ValueError, match=match):
        BilevelSFTTrainer(model=_model(tokenizer), args=_args(tmp_path, **option), train_dataset=train,
                          eval_dataset=_prompt_completions(2, seed=1), processing_class=tokenizer,
                          outer_module=DataWeights(len(train)))


def test_plain_sft_config_and_patterns_with_peft_config_are_refused(tmp_path, tokenizer):
    from peft import LoraConfig

    train = add_example_ids(_prompt_completions(4, seed=0))
    with pytest.raises(TypeError, match="BilevelSFTConfig"):
        BilevelSFTTrainer(model=_model(tokenizer), args=SFTConfig(output_dir=str(tmp_path), use_cpu=True),
                          train_dataset=train, eval_dataset=train, processing_class=tokenizer,
                          outer_module=DataWeights(len(train)))
    with pytest.raises(ValueError, match="get_peft_model"):
        BilevelSFTTrainer(model=_model(tokenizer), args=_args(tmp_path), train_dataset=train, eval_dataset=train,
                          processing_class=tokenizer, outer_param_patterns=[r"lm_head"],
                          peft_config=LoraConfig(r=2, target_modules=["q_proj"]))


@pytest.mark.parametrize("hvp_mode", ["rev_rev", "auto"])
def test_a_collator_that_drops_the_ids_is_named_before_training(tmp_path, tokenizer, hvp_mode):
    train = add_example_ids(_prompt_completions(4, seed=0))
    weights = DataWeights(len(train))
    trl_collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    trainer = BilevelSFTTrainer(model=_model(tokenizer), args=_args(tmp_path, hvp_mode=hvp_mode), train_dataset=train,
                                eval_dataset=_prompt_completions(2, seed=1), processing_class=tokenizer,
                                outer_module=weights, data_collator=lambda features: trl_collator(features))
    with pytest.raises(ValueError, match=r"no 'example_id' column.*data collator dropped it") as error:
        trainer.train()
    assert "hvp_mode" not in str(error.value)
    assert trainer.state.global_step == 0 and torch.equal(weights.logits, torch.zeros(len(train)))


# ---------------------------------------------------------------------- the recipe under TRL


def test_the_sft_recipe_trains_on_trusted_outer_conversations(tmp_path, tokenizer):
    """TRL prepares the outer rows with the training rows (chat template, assistant-only loss): one argument, no
    hand concatenation. The run records the outer module's settings in its arguments."""
    from hf_integration import TRUSTED_COLUMN, LossWeights

    args = _args(tmp_path, recipe="sft_data_weighting", assistant_only_loss=True, unroll_steps=2, outer_batch_size=4)
    trainer = BilevelSFTTrainer(model=_model(tokenizer), args=args, train_dataset=_conversations(8, seed=0),
                                eval_dataset=_conversations(4, seed=1), processing_class=tokenizer)
    module = trainer.outer_module
    assert isinstance(module, LossWeights) and module.trusted_share == "uniform" and module.init_loss_scale == 1.0
    assert trainer.train_dataset[TRUSTED_COLUMN] == [0] * 8 + [1] * 4 and trainer.num_training_rows == 8
    assert "input_ids" in trainer.train_dataset.column_names and len(trainer.train_dataset["labels"]) == 12  # TRL prepared every row
    trainer.train()
    assert trainer.outer_step >= 1
    assert trainer.args.to_dict()["outer_module_options"] == {"init_loss_scale": 1.0, "trusted_share": "uniform"}
    table = trainer.weighted_dataset()
    assert table.column_names == ["messages", "weight"] and len(table) == 8  # the user's rows, not token ids


def test_lora_strengths_are_built_after_trls_peft_wrapping(tmp_path, tokenizer):
    """With `peft_config=`, LoraRegularization could not be built: it needs the wrapped model first."""
    from peft import LoraConfig

    from hf_integration import LoraRegularization

    args = _args(tmp_path, outer_module="lora_regularization", outer_module_options='{"granularity": "layer"}',
                 max_steps=2, unroll_steps=1)
    trainer = BilevelSFTTrainer(model=_model(tokenizer), args=args, train_dataset=_conversations(8, seed=0),
                                eval_dataset=_conversations(4, seed=1), processing_class=tokenizer,
                                peft_config=LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert isinstance(trainer.outer_module, LoraRegularization)
    assert trainer.outer_module.group_names == ["layer.0", "layer.1"]
    trainer.train()
    assert trainer.outer_step == 1


def test_a_separate_outer_set_is_prepared_by_trl_beside_the_evaluation_sets(tmp_path, tokenizer):
    args = _args(tmp_path, outer_module="data_weights", max_steps=2, unroll_steps=1)
    trainer = BilevelSFTTrainer(model=_model(tokenizer), args=args, train_dataset=_conversations(8, seed=0),
                                eval_dataset={"dev": _conversations(4, seed=1), "test": _conversations(4, seed=2)},
                                outer_dataset=_conversations(4, seed=3), processing_class=tokenizer)
    assert "input_ids" in trainer.outer_dataset.column_names and set(trainer.eval_dataset) == {"dev", "test"}
    assert trainer.train_dataset["example_id"] == list(range(8))  # ids added before TRL's preparation
    trainer.train()
    assert {"eval_dev_loss", "eval_test_loss"} <= set(trainer.evaluate())


@pytest.mark.parametrize("assistant_only_loss", [False, True])
def test_weighting_conversations_whose_loss_covers_the_prompt_warns(tmp_path, tokenizer, caplog, assistant_only_loss):
    """A `messages` column without assistant_only_loss: every example's loss (what data weights judge) covers its
    prompt; the trainer says so, and how to make it the response's."""
    args = _args(tmp_path, recipe="sft_data_weighting", assistant_only_loss=assistant_only_loss)
    with caplog.at_level(logging.WARNING, logger="hf_integration.sft"):
        BilevelSFTTrainer(model=_model(tokenizer), args=args, train_dataset=_conversations(8, seed=0),
                          eval_dataset=_conversations(4, seed=1), processing_class=tokenizer)
    warned = [r.getMessage() for r in caplog.records if "covers the prompt's tokens" in r.getMessage()]
    assert len(warned) == (0 if assistant_only_loss else 1)
    assert not warned or "prompt/completion rows" in warned[0]
