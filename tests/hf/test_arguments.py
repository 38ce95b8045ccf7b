"""`BilevelTrainingArguments` through `HfArgumentParser`, as example scripts use it."""

from __future__ import annotations

import pytest
from transformers import HfArgumentParser

from hf_integration import BilevelTrainingArguments


def test_parses_outer_options_from_the_command_line(tmp_path):
    (args,) = HfArgumentParser(BilevelTrainingArguments).parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--ihvp_method", "cg", "--ihvp_iters", "7", "--hvp_mode", "finite_diff",
        "--unroll_steps", "3", "--outer_patience_steps", "12", "--outer_learning_rate", "0.05",
        "--outer_optim", "sgd", "--nystrom_sketch", "column", "--hvp_chunk_size", "2", "--use_cpu",
        "--ihvp_warm_start",
    ])
    assert args.ihvp_warm_start is True
    assert (args.ihvp_method, args.ihvp_iters, args.hvp_mode) == ("cg", 7, "finite_diff")
    assert (args.unroll_steps, args.outer_patience_steps, args.outer_learning_rate) == (3, 12, 0.05)
    assert (args.outer_optim, args.nystrom_sketch, args.hvp_chunk_size) == ("sgd", "column", 2)


def test_help_documents_every_outer_option(capsys):
    with pytest.raises(SystemExit):
        HfArgumentParser(BilevelTrainingArguments).parse_args_into_dataclasses(["--help"])
    text = capsys.readouterr().out
    for option in ("--unroll_steps", "--nystrom_rank", "--nystrom_rho", "--hvp_mode", "--outer_learning_rate",
                   "--hvp_chunk_size", "--ihvp_method"):
        assert option in text
    assert "Rank (number of HVPs) of the Nyström approximation" in text


@pytest.mark.parametrize("bad, match", [
    ({"ihvp_method": "lanczos"}, "ihvp_method"), ({"nystrom_rank": 0}, "nystrom_rank"),
    ({"nystrom_rho": 0.0}, "nystrom_rho"), ({"outer_patience_steps": -1}, "outer_patience_steps"),
    ({"outer_optim": "lbfgs"}, "outer_optim"), ({"hvp_chunk_size": 0}, "hvp_chunk_size"),
    ({"ihvp_warm_start": True}, "ihvp_warm_start.*'nystrom_pcg', 'cg'"),  # the default method is nystrom
    ({"ihvp_method": "cg", "ihvp_warm_start": "yes"}, "ihvp_warm_start"),
])
def test_bad_values_name_the_argument(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        BilevelTrainingArguments(output_dir=str(tmp_path), use_cpu=True, **bad)
