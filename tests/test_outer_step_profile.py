"""`benchmarks/outer_step_profile.py`: its timers leave the timed methods as they were, and its table's arithmetic."""

from __future__ import annotations

from collections import defaultdict

from repo_scripts import load

outer_step_profile = load("benchmarks/outer_step_profile.py")


def test_timer_records_each_call_and_passes_results_and_errors_through():
    totals = defaultdict(list)
    wrapped = outer_step_profile.timed(lambda x: 2 * x, "part", totals)
    assert wrapped(3) == 6 and wrapped(4) == 8 and len(totals["part"]) == 2

    def broken():
        raise KeyError("x")

    try:
        outer_step_profile.timed(broken, "broken", totals)()
    except KeyError:
        pass
    assert len(totals["broken"]) == 1


def test_table_expresses_parts_per_outer_step_and_in_inner_steps():
    result = {"totals": {"outer step": 4.0, "batches": 0.2, "outer gradient": 1.5, "products + solve": 1.0,
                         "optimizer step + check": 0.1, "inner step": 10.0},
              "counts": {"outer step": 10, "inner step": 100},
              "metrics": {"wall_time_bilevel_s": 20.0, "baselines": {"uniform": {"wall_time_s": 16.0}}}}
    lines = outer_step_profile.table(result).splitlines()
    assert lines[0] == "10 outer steps, 100 inner steps (100 ms each); bilevel run 20.0 s, uniform run 16.0 s: 1.25x"
    assert lines[2] == "The outer steps add 25% to the bilevel run's other time (1.25x)."
    assert "| outer gradient | 1.50 | 150 | 1.50 | 7.5% |" in lines
    assert lines[-1] == "| inner training (the rest) | 16.00 | | | 80.0% |"


def test_outer_steps_inside_inner_steps_move_from_the_inner_steps_to_the_outer_steps():
    raw = {"outer step": 0.5, "batches": 0.3, "outer gradient": 2.0, "products + solve": 0.4, "mixed product": 1.0,
           "optimizer step + check": 0.2, "inner step": 12.0, "opened": 1.9, "in-step batches": 0.2,
           "in-step outer gradient": 1.8, "in-step mixed product": 0.8, "in-step optimizer step + check": 0.2}
    totals = outer_step_profile.outer_totals(raw)
    assert totals["outer step"] == 0.5 + 0.2 + 1.8 + 0.8 + 0.2
    assert totals["inner step"] == 12.0 - 3.0
    assert not any(key.startswith("in-step") or key == "opened" for key in totals)
    counts = outer_step_profile.outer_counts({"outer step": 1, "opened": 36, "inner step": 384, "mixed product": 73})
    assert counts == {"outer step": 37, "inner step": 384, "mixed product": 73}
