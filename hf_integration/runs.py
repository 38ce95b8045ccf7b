"""What a training script does around its training: the output folder, resuming, pushing, writing outputs, and one
line per error.

A script built on `BilevelTrainer` (the example jobs, or a user's own) runs inside :func:`start_run`, which checks
and holds ``--output_dir`` before any data is loaded: a folder holding another run is refused unless
``--overwrite_output_dir`` (which moves that run aside and puts it back if the new one fails before writing its
outputs), the folder is locked for the run, ``--resume_from_checkpoint`` is resolved (``True``: the last complete
checkpoint), and with ``--push_to_hub`` the Hub is checked at once. :class:`OutputWriter` writes the outputs in
order, ``metrics.json`` last, and says what was and was not written when a write fails; :func:`run_main` turns the
errors a run anticipates into one ``error:`` line and exit status 1. :func:`check_reachable` asks the Hub, under a
deadline, whether a Hub id answers before anything is loaded from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from hypergrad.distributed import any_process
from hypergrad.outer_step import NonFiniteError
from hypergrad.solver import count_outer_steps

from .atomic_files import atomic_write_text
from .checkpoints import BILEVEL_CHECKPOINT_FILES, CheckpointError, last_checkpoint, resolve_checkpoint
from .hub import HubError, check_hub_reachable, check_hub_repo, error_line
from .recipe import resolve_outer_patience, total_inner_steps

logger = hf_logging.get_logger(__name__)

__all__ = ["InputError", "RunError", "agree", "RunArguments", "RunContext", "LOCK_NAME", "start_run", "OutputWriter",
           "run_main", "parse_arguments", "configuring", "check_reachable", "loading", "total_inner_steps",
           "scheduled_outer_steps", "check_outer_steps", "describe_steps", "resume_point", "push_outputs",
           "format_table", "write_json", "require_finite"]


class InputError(ValueError):
    """Bad command-line input (unknown column, unseen classes, empty split, too little data), raised before
    training; the message names the argument to fix."""

class RunError(RuntimeError):
    """The run could not train (e.g. no outer step could be applied); nothing was written."""

def require_finite(instance: Any, positive: Sequence[str] = ()) -> None:
    """Refuse a NaN/inf float field of the argument dataclass ``instance``, and a non-positive ``positive`` one."""
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise InputError(f"--{f.name} must be finite, got {value}.")
        if f.name in positive and not value > 0:
            raise InputError(f"--{f.name} must be > 0, got {value}.")

def check_reachable(argument: str, name: str, repo_type: str = "model") -> None:
    """Before ``from_pretrained`` / ``load_dataset`` of a Hub id: one metadata request under a deadline
    (:func:`hf_integration.hub.check_hub_reachable`), so that a Hub that hangs or drips bytes ends the run in
    seconds with an :class:`InputError` naming ``argument``, not after minutes of retries. Local folders,
    offline mode and ids already reached are not checked."""
    if os.path.isdir(os.path.expanduser(name)) or (repo_type, name) in _REACHED:
        return
    try:
        check_hub_reachable(name, repo_type=repo_type, what=f"the {repo_type} {name!r} ({argument})")
    except HubError as err:
        raise InputError(str(err)) from err  # it names the argument
    _REACHED.add((repo_type, name))

_REACHED: set[tuple[str, str]] = set()  # Hub ids this process found answering (models load several times)

@contextlib.contextmanager
def loading(argument: str, name: str) -> Iterator[None]:
    """Turn a failure to load ``name`` (missing or incomplete folder, unknown or unreachable Hub repo) into an
    :class:`InputError` naming ``argument``; a Hub id is first checked to answer (:func:`check_reachable`)."""
    check_reachable(argument, name)
    try:
        yield
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: a config.json nested 100k deep
        raise InputError(f"{argument} {name!r} cannot be loaded: {error_line(err)}") from err

@contextlib.contextmanager
def configuring() -> Iterator[None]:
    """Turn the `ValueError`/`TypeError` a `BilevelTrainer` raises while it is built -- arguments that do not fit
    the model or the data (a Nyström rank above the inner parameter count, an HVP mode the outer module cannot
    use), found before any training step -- into an :class:`InputError` naming the option (``--name``)."""
    try:
        yield
    except (ValueError, TypeError) as err:
        raise InputError(re.sub(r"`(\w+)`", r"--\1", str(err))) from err

def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (readable in a terminal and pasteable into the README)."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)

def write_json(path: str, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as indented JSON, atomically (NaN/inf become null: strict JSON has neither)."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not np.isfinite(value):
            return None
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, (np.floating, np.integer)):
            return clean(value.item())
        return value

    atomic_write_text(path, json.dumps(clean(payload), indent=2, allow_nan=False) + "\n")

LOCK_NAME = ".hypergrad_run.lock"  # in --output_dir while a run uses it

@dataclass
class RunArguments:
    """How the run uses its output folder and the machine."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in an --output_dir that holds another run's outputs: they are moved aside "
                  "(into a hidden .overwritten-* folder) and deleted only once the new run writes its own; a new run "
                  "that fails before that puts them back. Without it such a folder is refused (use "
                  "--resume_from_checkpoint to continue that run)."},
    )
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (default: torch's own choice)."})
    fully_shard: bool = field(
        default=False,
        metadata={"help": "Shard every model the run trains across the launched processes with FSDP2's fully_shard "
                  "(each transformer block, then the root: hf_integration.sharding.shard_model) instead of "
                  "replicating it (DDP). For CPUs and other setups where Accelerate's FSDP plugin does not apply; "
                  "hypergradients then take finite-difference products on the shards."},
    )

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads must be >= 1, got {self.threads}.")

@dataclass
class RunContext:
    """What :func:`start_run` decided: whether to push at the end, and the checkpoint to resume from. A run calls
    :meth:`commit` before it writes its final outputs: from then on an ``--overwrite_output_dir`` run has replaced
    the previous one's outputs, which are deleted when the run ends."""

    push: bool
    resume: str | None
    backup: str | None = None  # the previous run's outputs, moved aside by --overwrite_output_dir
    committed: bool = False
    fully_shard: bool = False  # --fully_shard: the scripts shard every model they build (shard_model)

    def commit(self) -> None:
        self.committed = True

def agree(error: Exception | None, training_args: Any) -> None:
    """Raise ``error`` here, and an error on every other process too when any process has one (so that no
    process goes on alone into training and waits forever for the others)."""
    failed = any_process(error is not None, training_args.device)
    if error is not None:
        raise error
    if failed:
        raise InputError("another process refused the run; see its error message.")


def _resume_argument(value: str | None, output_dir: str) -> str | None:
    """``--resume_from_checkpoint`` (:func:`~hf_integration.checkpoints.resolve_checkpoint`), a refusal as an
    :class:`InputError` naming the option."""
    try:
        return resolve_checkpoint(value, output_dir)
    except CheckpointError as err:
        raise InputError(f"--resume_from_checkpoint: {str(err).removeprefix('cannot resume: ')}") from err


OVERWRITTEN_PREFIX = ".overwritten-"  # the folder of a previous run's outputs while --overwrite_output_dir runs

def _prepare_output_dir(output_dir: str, overwrite: bool, resume: str | None) -> str | None:
    """Refuse an --output_dir that is a file, cannot be written, or holds another run (unless ``resume``, or
    ``overwrite``: that run's outputs are then moved into a hidden sibling folder, whose path is returned, so
    that :func:`_restore_outputs` can put them back if the new run fails before writing its own)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise InputError(f"--output_dir {output_dir!r} is an existing file, not a folder; choose another path.")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as err:
        raise InputError(f"--output_dir {output_dir!r} cannot be created: {err.strerror or err}.") from err
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise InputError(f"--output_dir {output_dir!r} is not writable; choose another folder.")
    others = sorted(name for name in os.listdir(output_dir) if name != LOCK_NAME)
    if not others or resume is not None:
        return None
    if not overwrite:
        resume = ("pass --resume_from_checkpoint True to continue that run, "
                  if any(name.startswith("checkpoint-") for name in others) else "")
        raise InputError(f"--output_dir {output_dir!r} is not empty (it holds {others[:4]}"
                         f"{' ...' if len(others) > 4 else ''}): another run's outputs; {resume}pass "
                         "--overwrite_output_dir to start over there, or choose another --output_dir.")
    backup = tempfile.mkdtemp(dir=output_dir, prefix=OVERWRITTEN_PREFIX)
    for name in others:
        if not name.startswith(OVERWRITTEN_PREFIX):  # an earlier killed run's backup stays where it is
            os.rename(os.path.join(output_dir, name), os.path.join(backup, name))
    return backup

def _restore_outputs(output_dir: str, backup: str) -> None:
    """Undo :func:`_prepare_output_dir`'s move: the failed run's files go, the previous run's come back."""
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name == LOCK_NAME or name.startswith(OVERWRITTEN_PREFIX):
            continue
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    for name in os.listdir(backup):
        os.rename(os.path.join(backup, name), os.path.join(output_dir, name))
    os.rmdir(backup)

@contextlib.contextmanager
def start_run(training_args: Any, run_args: RunArguments, repo_example: str) -> Iterator[RunContext]:
    """Everything a run checks and holds around its work, before any data is loaded.

    Logging and ``--threads``; ``--resume_from_checkpoint`` resolved; ``--output_dir`` checked (see
    :func:`_prepare_output_dir`) and locked (``.hypergrad_run.lock``, released when the block ends; a second run
    into the same folder is refused); with ``--push_to_hub``, ``--hub_model_id`` required and the repo created
    at once (credentials, reachability, timeouts: :func:`hf_integration.hub.check_hub_repo`).
    ``training_args.push_to_hub`` is turned off: the scripts upload the learned outer parameters themselves
    (with their own card) after training, where `Trainer` would upload the whole output folder.
    """
    from filelock import FileLock, Timeout

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if run_args.threads is not None:
        torch.set_num_threads(run_args.threads)
    push = bool(training_args.push_to_hub)
    if push and not training_args.hub_model_id:
        raise InputError(f"--push_to_hub needs --hub_model_id (e.g. {repo_example!r}).")
    training_args.push_to_hub = False
    output_dir = training_args.output_dir
    lock, error, resume, backup = None, None, None, None
    try:
        resume = _resume_argument(training_args.resume_from_checkpoint, output_dir)
        if training_args.should_save:  # the process that writes holds the lock
            lock = FileLock(os.path.join(output_dir, LOCK_NAME), timeout=0)
            if os.path.isdir(output_dir):  # an existing folder is inspected under the lock
                lock.acquire()
            if push:  # credentials before anything moves
                check_hub_repo(training_args.hub_model_id, token=training_args.hub_token,
                               private=training_args.hub_private_repo)
            backup = _prepare_output_dir(output_dir, run_args.overwrite_output_dir, resume)
            lock.acquire()  # re-entrant: takes the lock of a folder just created, else a no-op
    except Timeout:
        error = InputError(f"--output_dir {output_dir!r} is in use by another run (it holds the lock "
                           f"{LOCK_NAME}); wait for that run to end or choose another --output_dir.")
    except OSError as err:  # the lock file cannot be created
        error = InputError(f"--output_dir {output_dir!r} is not writable: {err.strerror or err}.")
    except (InputError, HubError) as err:
        error = err
    run = RunContext(push=push, resume=resume, backup=backup, fully_shard=run_args.fully_shard)
    try:
        agree(error, training_args)
        yield run
    except BaseException:
        if backup is not None and not run.committed:
            _restore_outputs(output_dir, backup)
            backup = None
            logger.warning("The run failed before writing its outputs: the previous outputs of --output_dir %r are "
                           "back in place.", output_dir)
        raise
    finally:
        if backup is not None:  # the new run's outputs replaced them
            shutil.rmtree(backup, ignore_errors=True)
        if lock is not None and lock.is_locked:
            lock.release(force=True)

def scheduled_outer_steps(training_args: Any, num_train: int) -> int:
    """How many outer steps the schedule (``unroll_steps``, ``outer_patience_steps``) holds; refuses none. The
    patience is resolved first (:func:`~hf_integration.recipe.resolve_outer_patience`: from ``outer_patience_epochs``
    or ``outer_patience_ratio`` when ``outer_patience_steps`` is 0)."""
    resolve_outer_patience(training_args, num_train)
    total = total_inner_steps(training_args, num_train)
    count = count_outer_steps(total, training_args.unroll_steps, training_args.outer_patience_steps)
    if count == 0:
        raise InputError(f"no outer step would run: {total} inner steps, but the first outer step follows inner step "
                         f"max(--outer_patience_steps {training_args.outer_patience_steps}, --unroll_steps "
                         f"{training_args.unroll_steps}) + 1. Raise --max_steps or lower those two.")
    return count

def check_outer_steps(trainer: Any, learned: str) -> dict[str, Any]:
    """Applied and skipped outer steps of a finished bilevel run; :class:`RunError` when none was applied (the
    ``learned`` parameters are then untrained and nothing should be written)."""
    skipped = int(trainer.skipped_outer_steps)
    applied = int(trainer.outer_step) - skipped
    causes = dict(trainer.outer_history.skip_causes)
    if trainer.outer_step > 0 and applied == 0:
        why = ", ".join(f"{cause}: {n}" for cause, n in causes.items()) or "non-finite hypergradients"
        raise RunError(f"no outer step could be applied: all {skipped} were skipped ({why}); the {learned} are "
                       "untrained, so nothing was written. Try a larger --nystrom_rho or a smaller "
                       "--outer_learning_rate.")
    return {"outer_steps": applied, "outer_steps_skipped": skipped, "outer_skip_causes": causes,
            "inner_steps_skipped": int(trainer.nonfinite_guard.skipped)}

def describe_steps(results: Mapping[str, Any]) -> str:
    """E.g. ``"150 inner steps (0 skipped), 26 outer steps applied (2 skipped: non-finite hypergradient: 2)"``."""
    skipped = results["outer_steps_skipped"]
    causes = ", ".join(f"{cause}: {n}" for cause, n in results["outer_skip_causes"].items())
    return (f"{results['inner_steps']} inner steps ({results['inner_steps_skipped']} skipped), "
            f"{results['outer_steps']} outer steps applied ({skipped} skipped{': ' + causes if causes else ''})")

def resume_point(run: RunContext, folder: str, bilevel: bool) -> str | None:
    """For a resumed run, the last complete checkpoint of a sub-run (baseline, grid point) in ``folder``."""
    if run.resume is None:
        return None
    return last_checkpoint(folder, outer_files=BILEVEL_CHECKPOINT_FILES if bilevel else ())

def parse_arguments(dataclass_types: Sequence[type], defaults: Mapping[str, Any], description: str,
                    args: list[str] | None) -> tuple:
    """Parse ``args`` (``None``: ``sys.argv``) into ``dataclass_types`` with ``defaults``; a value refused by a
    dataclass' own checks (e.g. `BilevelTrainingArguments`' "`max_steps` ...") becomes an
    :class:`InputError` naming the option ("--max_steps ...")."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types, description=description)
    parser.set_defaults(**defaults)
    try:
        return parser.parse_args_into_dataclasses(args=args)
    except InputError:
        raise
    except ValueError as err:
        raise InputError(re.sub(r"`(\w+)`", r"--\1", str(err))) from err

def push_outputs(module: Any, training_args: Any, metadata: Mapping[str, Any]) -> str:
    """Upload the learned outer parameters with their card; on failure the :class:`HubError` also says where
    the saved outputs are and how to push them later."""
    repo_id, out = training_args.hub_model_id, training_args.output_dir
    try:
        return module.push_to_hub(repo_id, metadata=dict(metadata), token=training_args.hub_token,
                                  private=training_args.hub_private_repo)
    except HubError as err:
        raise HubError(f"{err}. The run's outputs are saved in {out!r}; push them later with: python "
                       f"examples/push_hyperparameters.py --outer_params_dir {out} --repo_id {repo_id}") from err

class OutputWriter:
    """Writes a run's outputs one by one in a planned order, ``metrics.json`` (the completion marker) last.

    A write that fails (a full disk, a folder that went read-only) ends the run with a :class:`RunError` saying
    which outputs were written and which were not; each output is written atomically (no half-written file or
    ``.tmp`` folder stays), so what was written is complete and what was not is absent or the previous version.
    """

    def __init__(self, output_dir: str, planned: Sequence[str]) -> None:
        self.output_dir, self.planned, self.written = output_dir, list(planned), []

    def __call__(self, name: str, write: Callable[[], Any]) -> Any:
        try:
            result = write()
        except OSError as err:
            missing = [n for n in self.planned if n not in self.written]
            raise RunError(f"writing {name} to {self.output_dir!r} failed ({err.strerror or err}); written: "
                           f"{', '.join(self.written) or 'nothing'}; not written: {', '.join(missing)}. Without "
                           "metrics.json the run counts as incomplete: free the space and run again (or resume "
                           "with --resume_from_checkpoint True if it saved checkpoints).") from err
        self.written.append(name)
        return result

def run_main(main: Callable[[list[str] | None], Any]) -> None:
    """``main()`` as a command: the errors the scripts anticipate (bad input, a run that could not train, a
    refused checkpoint, an unreachable Hub, a failed write) become one line on stderr and exit status 1."""
    try:
        main(None)
    except (InputError, RunError, NonFiniteError, CheckpointError, HubError) as err:
        sys.exit(f"error: {err}")
    except OSError as err:  # e.g. a checkpoint save on a full disk, mid-training
        sys.exit(f"error: {err.strerror or type(err).__name__}: {err.filename or err}; the run stopped, and its "
                 "outputs are incomplete (metrics.json, written last, marks a complete run).")
