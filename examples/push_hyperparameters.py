"""Push saved outer parameters (learned data weights, LoRA regularization strengths, ...) to the Hugging Face Hub.

`trainer.save_model(output_dir)` of a `BilevelTrainer` (and the example scripts) write ``outer_params.safetensors``
next to the model; this uploads that file, a human-readable ``outer_config.json`` and a model card (what was
learned, how, summary statistics, how to load it) to a Hub model repository, without the model itself::

    python examples/push_hyperparameters.py --outer_params_dir outputs/data_reweighting \
        --repo_id user/minilm-sentiment-data-weights
    python examples/push_hyperparameters.py --outer_params_dir outputs/peft_regularization \
        --repo_id user/lora-strengths --private

Load them back with the class that was saved, or `OuterModule` to dispatch on the saved kind::

    from hf_integration import DataWeights, LoraRegularization, OuterModule
    weights = DataWeights.from_pretrained("user/minilm-sentiment-data-weights")
    strengths = LoraRegularization.from_pretrained("user/lora-strengths").strengths()

The training metadata recorded at save time (method, steps, base model, dataset fingerprint, ...) goes into the
card; ``--metadata key=value`` adds fields (e.g. a result). Authentication: ``hf auth login`` or
``--token``/``HF_TOKEN``. Every Hub request times out after ``HF_HUB_DOWNLOAD_TIMEOUT`` seconds (10 unless set),
and any failure (no token, no network, no permission, a corrupt folder) ends with a one-line error.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

__all__ = ["PushArguments", "main"]


@dataclass
class PushArguments:
    """What to upload, and where."""

    outer_params_dir: str = field(
        metadata={"help": "Folder holding outer_params.safetensors (a trainer output directory)."}
    )
    repo_id: str = field(metadata={"help": "Hub model repository, 'user/name' (created if missing)."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one, HF_TOKEN)."})
    commit_message: str = field(default="Upload outer parameters", metadata={"help": "Commit message."})
    create_pr: bool = field(default=False, metadata={"help": "Open a pull request instead of committing to main."})
    metadata: list[str] | None = field(
        default=None, metadata={"help": "Extra card fields, as key=value pairs.", "nargs": "+"}
    )


def main(args: list[str] | None = None) -> str:
    """Parse ``args`` (``None``: ``sys.argv``), load the outer parameters (validated), push them; return the URL."""
    from transformers import HfArgumentParser

    from hf_integration import OUTER_PARAMS_NAME, OuterModule
    from hf_integration.serialization import normalize_metadata

    (push_args,) = HfArgumentParser(PushArguments, description=__doc__.split("\n\n")[0]).parse_args_into_dataclasses(
        args=args)
    if not os.path.isfile(os.path.join(push_args.outer_params_dir, OUTER_PARAMS_NAME)):
        raise ValueError(f"outer_params_dir {push_args.outer_params_dir!r} has no {OUTER_PARAMS_NAME}: pass the "
                         "folder given to trainer.save_model (e.g. the example's --output_dir).")
    extra = {}
    for item in push_args.metadata or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--metadata {item!r}: expected key=value.")
        extra[key] = value
    normalize_metadata(extra)  # a reserved key is refused before the Hub is asked for anything
    module = OuterModule.from_pretrained(push_args.outer_params_dir)  # checks kind, shapes, config, NaN/inf
    url = module.push_to_hub(push_args.repo_id, metadata=extra, private=push_args.private or None,
                             token=push_args.token, commit_message=push_args.commit_message,
                             create_pr=push_args.create_pr)
    print(f"Pushed {type(module).__name__} ({module.kind}) to {url}\n"
          f'Load with: from hf_integration import {type(module).__name__}; '
          f'{type(module).__name__}.from_pretrained("{push_args.repo_id}")')
    return url


if __name__ == "__main__":
    from hf_integration.hub import HubError

    try:
        main()
    except (ValueError, OSError, HubError) as err:  # bad input, unreadable folder, Hub failure: one line
        sys.exit(f"error: {err}")
