"""`BilevelTrainer`'s checkpoints and saved outputs (:class:`OuterPersistenceMixin`): the outer parameters, their
optimizer, counters and HVP mode saved beside `Trainer`'s own files, validated before a resume, restored with the
best model, and described in the model card."""

from __future__ import annotations

import os
from typing import Any

import datasets
from transformers.modelcard import TrainingSummary
from transformers.utils import logging

from hypergrad.methods import options_metadata
from hypergrad.outer_step import refuse_non_finite
from hypergrad.products import EXACT_MODES
from hypergrad.solver import count_outer_steps

from .atomic_files import atomic_write_text
from .checkpoints import CheckpointError, checkpoint_problem, resolve_checkpoint
from .data import dataset_fingerprint_metadata
from .hub import error_line
from .model_card import model_folder_card, model_tensors_card_section, outer_params_card_section
from .optimizer_state import load_optimizer_state, save_optimizer_state
from .public_names import hub_model_id, is_hub_id
from .serialization import DATA_METADATA_KEYS, MODEL_CARD_NAME, OUTER_OPTIMIZER_NAME, OUTER_PARAMS_NAME

__all__ = ["OuterPersistenceMixin"]

logger = logging.get_logger(__name__)

_COUNTERS_KEY = "bilevel_counters"  # extra entry of outer_optimizer.safetensors: applied/skipped step counts


class OuterPersistenceMixin:
    """`BilevelTrainer`'s persistence (a mixin of it, placed before `Trainer` so that its overrides of `_save`,
    `_load_best_model`, ... run first and call `Trainer`'s)."""

    @staticmethod
    def _checkpoint_hvp_mode(checkpoint: str) -> str | None:
        """The HVP mode the run that wrote ``checkpoint`` used (``None`` for a checkpoint that did not record it)."""
        path = os.path.join(checkpoint, OUTER_OPTIMIZER_NAME)
        try:
            mode = load_optimizer_state(path).get(_COUNTERS_KEY, {}).get("hvp_mode")
        except (OSError, ValueError, KeyError, RecursionError) as err:
            raise CheckpointError(f"cannot resume from {checkpoint!r}: {error_line(err)}") from err
        if mode is not None and mode not in EXACT_MODES + ("finite_diff",):
            raise CheckpointError(f"cannot resume from {checkpoint!r}: {OUTER_OPTIMIZER_NAME} records an unknown "
                                  f"hvp_mode {mode!r:.60}; the file is corrupt")
        return mode

    def _checkpoint_files(self) -> tuple[str, ...]:
        """The outer files a checkpoint of this trainer must hold."""
        return (OUTER_OPTIMIZER_NAME,) + ((OUTER_PARAMS_NAME,) if self.outer_module is not None else ())

    def _checkpoint_to_resume(self, checkpoint: str | bool | None) -> str | None:
        return resolve_checkpoint(checkpoint, self.args.output_dir, outer_files=self._checkpoint_files())

    def outer_metadata(self) -> dict[str, str]:
        """Metadata saved with the outer parameters (all values are strings)."""
        args = self.args
        base = self._unwrapped
        config = getattr(base, "config", None)
        meta = {
            **options_metadata(args.ihvp_method, self.ihvp_options),
            "hvp_mode": str(self.hvp_mode or args.hvp_mode),
            "steps": str(self.state.global_step),
            "outer_steps": str(self.outer_step),
            "unroll_steps": str(args.unroll_steps),
            "outer_learning_rate": str(args.outer_learning_rate),
            "base_model": hub_model_id(getattr(config, "_name_or_path", None)) or "",  # never a local path
        }
        if getattr(self, "_best_step", None) is not None:  # load_best_model_at_end: these are that step's
            meta["best_step"] = str(self._best_step)
        if isinstance(self.train_dataset, datasets.Dataset):  # what the outer parameters were learned on
            meta.update(dataset_fingerprint_metadata(self.train_dataset, dataset_name=self.dataset_name,
                                                     split=self.dataset_split, id_column=self.id_column))
        return {k: v for k, v in meta.items() if v != ""}

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        inner = self._wrapped()
        if inner is not None:  # a cached trunk saves as the model it wraps (its card, too: a PEFT adapter)
            wrapper, self.model = self.model, inner
            try:
                return self._save(output_dir, None)
            finally:
                self.model = wrapper
        # a sharded model's tensors are checked once gathered (ShardedModelTrainerMixin._save)
        named = state_dict if state_dict is not None else {} if self._user_sharded else dict(
            self._unwrapped.named_parameters())
        refuse_non_finite(f"save to {output_dir or self.args.output_dir!r}", named, self._outer_param_tree())
        super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        metadata = self.outer_metadata()
        if self.outer_module is not None:
            self.outer_module.save_pretrained(output_dir, metadata=metadata, model_card=False)
        self._write_card(output_dir, metadata)

    def _write_card(self, output_dir: str, metadata: dict[str, str], **card_kwargs: Any) -> None:
        """Write the folder's one card (:func:`~hf_integration.model_card.model_folder_card`): `Trainer`'s model
        card (training hyperparameters and results; ``card_kwargs`` are `create_model_card`'s) with the library and
        tags of the card the model's ``save_pretrained`` left (PEFT's for an adapter: ``library_name: peft``),
        plus a section on the outer parameters and how to load the folder. ``save_model`` and ``push_to_hub``
        write the same card."""
        path = os.path.join(output_dir, MODEL_CARD_NAME)
        folder_card = None
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                folder_card = handle.read()
        if is_hub_id(metadata.get("dataset_name", "")):
            card_kwargs.setdefault("dataset", metadata["dataset_name"])
            card_kwargs.setdefault("dataset_tags", metadata["dataset_name"])
        summary = TrainingSummary.from_trainer(self, **card_kwargs)
        summary.finetuned_from = hub_model_id(summary.finetuned_from)  # a Hub id or nothing, never a machine path
        card = summary.to_model_card()
        adapter = hasattr(self._unwrapped, "peft_config")
        note = ("The fine-tuned model is saved in the same folder"
                + (" as a PEFT adapter: `peft.AutoPeftModel.from_pretrained(folder)`" if adapter else
                   ": `transformers.AutoModel.from_pretrained(folder)`")
                + " loads it (with the base model named above).")
        if self.outer_module is not None:
            section = outer_params_card_section(self.outer_module, metadata, self.args.hub_model_id)
            tags = ["hypergrad", "bilevel-optimization", self.outer_module.kind.replace("_", "-")]
        else:  # outer parameters are model tensors, saved with the model
            section = model_tensors_card_section(metadata, self.outer_model_param_names)
            tags = ["hypergrad", "bilevel-optimization"]
        atomic_write_text(path, model_folder_card(card, folder_card, f"{section.rstrip()}\n\n{note}\n", tags))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            counters = {"outer_history": self.outer_history.state_dict(),
                        "skipped_inner_steps": self.nonfinite_guard.skipped,
                        "hvp_mode": self.hvp_mode}
            if hasattr(self.ihvp_solver, "state_dict") and not self.is_sharded:
                # a reused Nyström factor and its refresh count (the same on every data-parallel process;
                # under FSDP each process holds its own shards, so a resumed run sketches anew)
                counters["ihvp_solver"] = self.ihvp_solver.state_dict()
            window = self.outer_window_state()
            if window is not None:  # an outer step taken on inner batches, half done
                counters["outer_window"] = window
            save_optimizer_state({**self.outer_optimizer.state_dict(), _COUNTERS_KEY: counters},
                                 os.path.join(output_dir, OUTER_OPTIMIZER_NAME))

    def _load_best_model(self) -> None:
        """`Trainer`'s (the best checkpoint's model weights), then that checkpoint's outer parameters, so that a
        save after ``load_best_model_at_end`` holds a model and the outer parameters it was trained with."""
        super()._load_best_model()
        best = self.state.best_model_checkpoint
        if self.outer_module is None or best is None:
            return
        try:
            saved = type(self.outer_module).from_pretrained(best)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"load_best_model_at_end: cannot read the outer parameters of {best!r}: "
                                  f"{error_line(err)}") from err
        self.outer_module.load_state_dict(saved.state_dict())
        self._best_step = int(saved.metadata.get("steps", -1))
        logger.info("Loaded the outer parameters of the best checkpoint %s.", best)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """`Trainer`'s, except that a checkpoint without this process's random-number states is refused (`Trainer`
        logs and goes on with fresh states: a run that no longer continues the interrupted one)."""
        if checkpoint is not None:
            name = f"rng_state_{self.args.process_index}.pth" if self.args.world_size > 1 else "rng_state.pth"
            if not os.path.isfile(os.path.join(checkpoint, name)):
                present = sorted(f for f in os.listdir(checkpoint) if f.startswith("rng_state"))
                raise CheckpointError(
                    f"cannot resume from {checkpoint!r}: it has no {name} for {self.args.world_size} process(es) "
                    f"(it holds {present}); resume with as many processes as the run that saved it")
        super()._load_rng_state(checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """`Trainer`'s states, then the outer ones. Refused with a :class:`CheckpointError` naming the file:
        an incomplete checkpoint (no ``outer_optimizer.safetensors``, ...), unreadable files, NaN/inf values,
        and outer parameters learned on other data (fingerprint, sizes) or for another layout."""
        if checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        problem = checkpoint_problem(checkpoint, outer_files=self._checkpoint_files())
        if problem is not None:
            raise CheckpointError(f"cannot resume: {problem}")
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except Exception as err:
            raise CheckpointError(f"cannot resume from {checkpoint!r}: loading Trainer's optimizer/scheduler state "
                                  f"(optimizer.pt, scheduler.pt) failed: {error_line(err)}") from err
        try:
            if self.outer_module is not None:
                meta = self.outer_metadata()
                expected = {k: meta[k] for k in DATA_METADATA_KEYS if k in meta}
                expected.update({k: v for k, v in self.outer_module.config_dict().items() if not k.startswith("init")})
                saved = type(self.outer_module).from_pretrained(checkpoint, expected=expected)
                self.outer_module.load_state_dict(saved.state_dict())
            state = load_optimizer_state(os.path.join(checkpoint, OUTER_OPTIMIZER_NAME))
            counters = state.pop(_COUNTERS_KEY, {})
            self.outer_optimizer.load_state_dict(state)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"cannot resume from {checkpoint!r}: {err}") from err
        self.outer_history.load_state_dict(counters.get("outer_history", {}))
        if "ihvp_solver" in counters and hasattr(self.ihvp_solver, "load_state_dict"):
            self.ihvp_solver.load_state_dict(counters["ihvp_solver"], like=self._theta())
        elif hasattr(self.ihvp_solver, "calls"):  # no saved factor (FSDP): sketch at the next outer step
            self.ihvp_solver.factor, self.ihvp_solver.calls = None, 0
        self.nonfinite_guard.skipped = int(counters.get("skipped_inner_steps", 0))
        self.load_outer_window_state(counters.get("outer_window"))
        self.outer_step = count_outer_steps(self.state.global_step, self.args.unroll_steps,
                                            self.args.outer_patience_steps) - self._outer_step_pending()

    def create_model_card(self, **kwargs: Any) -> None:
        """The card `push_to_hub` uploads: the same one ``save_model`` writes (:meth:`_write_card`), with
        `Trainer.create_model_card`'s arguments (``language``, ``license``, ``tags``, ``dataset``, ...)."""
        if self.args.should_save:
            self._write_card(self.args.output_dir, self.outer_metadata(), **kwargs)
