"""`benchmarks/scale.py` on its smallest model: every phase measured, ratios consistent, files written."""

from __future__ import annotations

import json

import pytest
from repo_scripts import load

scale = load("benchmarks/scale.py")


def test_smallest_model_reports_every_phase_and_both_memory_baselines(tmp_path):
    out = tmp_path / "scale.json"
    (row,) = scale.main(["--model", "llama-0.2M", "--batch-size", "2", "--seq-len", "16", "--repeats", "1",
                         "--out", str(out)])
    assert row["hvp_mode_requested"] == "auto" and row["hvp_mode"] in ("rev_rev", "fwd_rev", "finite_diff")
    for key in ("inner_step_s", "hypergrad_s", "reuse_s"):
        assert row[key] > 0
    assert row["time_ratio"] == pytest.approx(row["hypergrad_s"] / row["inner_step_s"])
    amortized = (row["hypergrad_s"] + (row["refresh_steps"] - 1) * row["reuse_s"]) / row["refresh_steps"]
    assert row["amortized_time_ratio"] == pytest.approx(amortized / row["inner_step_s"])
    peak = max(row["hypergrad_peak_mb"], row["reuse_peak_mb"])
    assert row["finetune_steps"] == scale.FINETUNE_STEPS
    if row["finetune_peak_mb"] > 0:
        assert row["memory_ratio_finetune"] == pytest.approx(peak / row["finetune_peak_mb"])
    saved = json.loads(out.read_text())
    assert saved["results"] == [row] and saved["meta"]["return_freed_memory"] is False
    table = out.with_suffix(".md").read_text()
    assert "memory ratio to fine-tuning" in table and "| llama-0.2M |" in table


def test_unknown_extra_argument_is_refused_before_any_work(tmp_path):
    with pytest.raises(SystemExit):
        scale.main(["--model", "llama-0.2M", "--extra-args", "no_such_field=1", "--out", str(tmp_path / "x.json")])
