"""Helpers of the example-script tests."""

from __future__ import annotations

import csv
import os


def tiny_run_args(model_dir: str, output_dir, *extra: str) -> list[str]:
    """Command-line arguments for a few-second run of an example script on the tiny model."""
    return [
        "--model_name_or_path", model_dir, "--output_dir", str(output_dir),
        "--max_train_samples", "40", "--max_eval_samples", "24", "--max_seq_length", "24",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
        "--max_steps", "6", "--unroll_steps", "2", "--outer_patience_steps", "2", "--warmup_steps", "0",
        "--hypergrad_train_batch_size", "16", "--outer_batch_size", "16", "--nystrom_rank", "2",
        "--disable_tqdm", "True", "--use_cpu", "True", "--logging_steps", "100", *extra,
    ]


def write_csv(path: str | os.PathLike, rows: list[tuple[str, str]], header: tuple[str, str] = ("text", "label")) -> str:
    """Write ``rows`` to a csv file with ``header`` and return its path."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)
