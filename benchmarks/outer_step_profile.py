"""Where the time of a bilevel run goes: the main job (`examples/data_reweighting.py`, or the instruction job with
``--job instruction``) run once with its defaults, its trainer's methods timed, beside the uniform rival trained in
the same process with the same steps.

Each part of an outer step is a method of `BilevelTrainer`, wrapped with a timer (inclusive times: a part's time
holds what it calls). An outer step runs either after its inner step on sampled batches (``outer_update``) or, with
``hypergrad_on_inner_batch=True``, inside the next inner steps on their batches
(``_inner_objective_with_outer_step``, :mod:`hf_integration.inner_batch_outer`); the parts are the same methods in
both:

* ``outer step``: the whole outer step: ``outer_update``, plus the parts below taken inside inner steps (not the inner
  step's own forward pass, which that step takes anyway);
* ``batches``: ``_batches``, sampling and collating the hypergradient's batches;
* ``outer gradient``: ``_outer_gradient``, the validation batch's forward and backward pass (the weighted-gradient
  path of loss-based weights; the general path computes it within ``products + solve``' caller);
* ``products + solve``: ``hypergrad_from_products`` on sampled batches: the training batch's forward pass and the
  mixed product;
* ``mixed product``: ``_loss_weight_mixed_product``, the mixed product's backward passes (loss-based weights; within
  ``products + solve`` on sampled batches, on each inner batch of the window inside inner steps);
* ``optimizer step + check``: ``_apply_hypergradient``, the outer optimizer's step and the post-step check (the inner
  objective after the step, finite or rolled back);
* ``inner step``: ``training_step``, one forward and backward pass of a training batch (not the optimizer step; an
  inner step that takes an outer step counts without it).

Reported: seconds in all, per outer step, as inner steps, and as a share of the bilevel run; the bilevel run's wall
time over the uniform run's. Extra arguments go to the job::

    python benchmarks/outer_step_profile.py
    python benchmarks/outer_step_profile.py --job classification --out outer_step_profile.json -- \\
        --train_file train.jsonl --validation_file validation.jsonl --test_file test.jsonl
"""

from __future__ import annotations

import argparse
import os
import runpy
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
JOBS = {"classification": "data_reweighting.py", "instruction": "instruction_data_weights.py"}
PARTS = {  # label -> (object whose attribute is timed, attribute)
    "outer step": ("trainer", "outer_update"),
    "batches": ("trainer", "_batches"),
    "outer gradient": ("trainer", "_outer_gradient"),
    "products + solve": ("outer_update", "hypergrad_from_products"),
    "mixed product": ("trainer", "_loss_weight_mixed_product"),
    "optimizer step + check": ("trainer", "_apply_hypergradient"),
    "inner step": ("trainer", "training_step"),
}
IN_STEP = ("trainer", "_inner_objective_with_outer_step")
"""The inner step's objective that takes part in an outer step on its batch: while it runs, the parts' times are the
outer step's (and are taken out of the inner step's)."""
OPENED = ("trainer", "_open_outer_window")
"""Opens an outer step inside an inner step: one call per outer step (its batches may span several inner steps)."""
IN_STEP_PARTS = ("batches", "outer gradient", "mixed product", "optimizer step + check")
"""The parts an outer step taken inside inner steps is made of (its training batches' forward passes are the inner
steps' own)."""


def timed(function: Callable, label: str, totals: dict[str, list[float]], inside: list[bool] | None = None) -> Callable:
    """``function`` recording its time under ``label``; while ``inside[0]`` (an outer step inside an inner step) also
    under ``"in-step " + label``."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds = time.perf_counter() - start
            totals[label].append(seconds)
            if inside is not None and inside[0]:
                totals["in-step " + label].append(seconds)

    wrapper.__wrapped__ = function
    return wrapper


def flagging(function: Callable, inside: list[bool]) -> Callable:
    """``function`` with ``inside[0]`` set while it runs."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        inside[0] = True
        try:
            return function(*args, **kwargs)
        finally:
            inside[0] = False

    wrapper.__wrapped__ = function
    return wrapper


def profile(job: str, job_args: list[str]) -> dict[str, Any]:
    """Run ``job`` with ``job_args`` (plus ``--baselines uniform``) with the parts timed; its metrics and timings."""
    import hf_integration.outer_update as outer_update
    from hf_integration import BilevelTrainer

    totals: dict[str, list[float]] = defaultdict(list)
    inside = [False]
    owners = {"trainer": BilevelTrainer, "outer_update": outer_update}
    targets = {**PARTS, "in-step": IN_STEP, "opened": OPENED}
    originals = {label: getattr(owners[owner], name) for label, (owner, name) in targets.items()}
    for label, (owner, name) in PARTS.items():
        setattr(owners[owner], name, timed(originals[label], label, totals, inside))
    setattr(owners[IN_STEP[0]], IN_STEP[1], flagging(originals["in-step"], inside))
    setattr(owners[OPENED[0]], OPENED[1], timed(originals["opened"], "opened", totals))
    try:
        main = runpy.run_path(os.path.join(ROOT, "examples", JOBS[job]))["main"]
        metrics = main([*job_args, "--baselines", "uniform"])
    finally:
        for label, (owner, name) in targets.items():
            setattr(owners[owner], name, originals[label])
    return {"metrics": metrics, "totals": outer_totals({k: sum(v) for k, v in totals.items()}),
            "counts": outer_counts({k: len(v) for k, v in totals.items()})}


def outer_totals(totals: dict[str, float]) -> dict[str, float]:
    """The raw timer totals with the outer steps taken inside inner steps moved: their parts join ``outer step`` and
    leave ``inner step``."""
    moved = sum(totals.get("in-step " + part, 0.0) for part in IN_STEP_PARTS)
    out = {k: v for k, v in totals.items() if not k.startswith("in-step") and k != "opened"}
    out["outer step"] = out.get("outer step", 0.0) + moved
    if "inner step" in out:
        out["inner step"] -= moved
    return out


def outer_counts(counts: dict[str, int]) -> dict[str, int]:
    """Call counts, the outer steps taken inside inner steps among the outer steps."""
    out = {k: v for k, v in counts.items() if not k.startswith("in-step") and k != "opened"}
    out["outer step"] = out.get("outer step", 0) + counts.get("opened", 0)
    return out


def table(result: dict[str, Any]) -> str:
    totals, counts, metrics = result["totals"], result["counts"], result["metrics"]
    steps = max(counts.get("outer step", 0), 1)
    inner = totals.get("inner step", 0.0) / max(counts.get("inner step", 0), 1)
    bilevel = metrics["wall_time_bilevel_s"]
    uniform = metrics["baselines"]["uniform"]["wall_time_s"]
    outer = totals.get("outer step", 0.0)
    lines = [(f"{counts.get('outer step', 0)} outer steps, {counts.get('inner step', 0)} inner steps "
              f"({inner * 1000:.0f} ms each); bilevel run {bilevel:.1f} s, uniform run {uniform:.1f} s: "
              f"{bilevel / uniform:.2f}x"), "",
             # within the bilevel run: immune to the machine's load changing between the two runs
             (f"The outer steps add {100 * outer / (bilevel - outer):.0f}% to the bilevel run's other time "
              f"({bilevel / (bilevel - outer):.2f}x)."), "",
             "| part | seconds | per outer step (ms) | inner steps | share of the bilevel run |", "|---|---|---|---|---|"]
    for label in PARTS:
        if label == "inner step":
            continue
        seconds = totals.get(label, 0.0)
        lines.append(f"| {label} | {seconds:.2f} | {1000 * seconds / steps:.0f} | {seconds / steps / max(inner, 1e-9):.2f} "
                     f"| {100 * seconds / bilevel:.1f}% |")
    rest = bilevel - totals.get("outer step", 0.0)
    lines.append(f"| inner training (the rest) | {rest:.2f} | | | {100 * rest / bilevel:.1f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", choices=sorted(JOBS), default="classification")
    parser.add_argument("--out", default=None, help="JSON results (and a .md table beside them).")
    parser.add_argument("job_args", nargs=argparse.REMAINDER, help="Arguments of the job, after `--`.")
    args = parser.parse_args(argv)
    job_args = args.job_args[1:] if args.job_args[:1] == ["--"] else args.job_args
    result = profile(args.job, job_args)
    text = table(result)
    print(text)
    if args.out:
        from hf_integration.atomic_files import atomic_write_text
        from hf_integration.runs import write_json

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_json(args.out, {"job": args.job, "job_args": job_args, "totals": result["totals"],
                              "counts": result["counts"],
                              "wall_time_bilevel_s": result["metrics"]["wall_time_bilevel_s"],
                              "wall_time_uniform_s": result["metrics"]["baselines"]["uniform"]["wall_time_s"]})
        atomic_write_text(os.path.splitext(args.out)[0] + ".md", text + "\n")
    return result


if __name__ == "__main__":
    main()
