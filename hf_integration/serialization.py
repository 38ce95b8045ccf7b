"""Safetensors persistence of outer parameters: header checks, save/load/check of outer files.

The on-disk layout mirrors PEFT adapters and ``PyTorchModelHubMixin``::

    save_directory/
        outer_params.safetensors   # the learned tensors; header metadata holds kind, config and user metadata
        outer_config.json          # the same config and metadata, human readable
        README.md                  # a model card (:mod:`hf_integration.model_card`)
        outer_optimizer.safetensors  # optional (checkpoints only): :mod:`hf_integration.optimizer_state`

Design rules, and why:

* **safetensors only, never pickle.** Loading a file downloaded from the Hub must not run code.
* **The safetensors header is authoritative.** ``outer_config.json`` is written for humans (and the Hub's
  file viewer); loading reads kind, config and metadata from ``outer_params.safetensors`` alone, so a
  single download suffices and the two can never disagree about what is loaded.
* **Every write is atomic** (:func:`hf_integration.atomic_files.atomic_write`): an interrupted save (pre-emption, full disk, a crash in
  the middle of serialization) leaves the previous file intact rather than a truncated one that would
  poison a later resume.
* **Nothing non-finite is written or loaded**: tensors holding NaN/inf are refused on save and on load.
* **Headers are checked before anything is allocated** (:func:`read_safetensors_metadata`, safetensors' own
  check): the header's declared sizes must fit the file, and the shapes a config implies are compared with the file's before a
  module of that size is built.
* **The format version is checked on load** (:data:`FORMAT_VERSION`): a file written by a newer version is
  refused with a message saying so, rather than misread.
* **Loading validates** the file's presence, the kind, the tensor shapes against the config, and any
  ``expected`` fields against the saved metadata, and refuses a mismatch with a message naming the field,
  the saved value and the expected value: data weights are indexed by example id, so loading weights that
  were learned on another dataset (or another ordering of it) would silently weight the wrong examples.

The functions here are module-agnostic (they handle tensors, config dicts and string metadata);
:class:`hf_integration.outer_modules.OuterModule` builds its ``save_pretrained`` / ``from_pretrained`` /
``push_to_hub`` on top of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hypergrad.outer_step import first_non_finite

from .atomic_files import atomic_write, atomic_write_text
from .hub import HubError, error_line, hub_call, hub_deadline
from .public_names import hub_model_id, looks_like_local_path, public_name

__all__ = [
    "OUTER_PARAMS_NAME",
    "OUTER_CONFIG_NAME",
    "OUTER_OPTIMIZER_NAME",
    "MODEL_CARD_NAME",
    "FORMAT_VERSION",
    "RESERVED_METADATA_KEYS",
    "DATA_METADATA_KEYS",
    "LoadedOuterFiles",
    "read_safetensors_metadata",
    "check_finite",
    "check_format_version",
    "load_tensors",
    "normalize_metadata",
    "save_outer_files",
    "load_outer_files",
    "check_expected",
]

OUTER_PARAMS_NAME = "outer_params.safetensors"
OUTER_CONFIG_NAME = "outer_config.json"
OUTER_OPTIMIZER_NAME = "outer_optimizer.safetensors"
MODEL_CARD_NAME = "README.md"

FORMAT_VERSION = "1"  # written to every header; a file with a larger version is refused on load

# Keys of the safetensors header that this module writes itself; user metadata may not use them.
_KEY_FORMAT = "format"  # "pt", as transformers/PEFT write it
_KEY_KIND = "kind"
_KEY_CONFIG = "outer_config"
_KEY_VERSION = "outer_format_version"
RESERVED_METADATA_KEYS = frozenset({_KEY_FORMAT, _KEY_KIND, _KEY_CONFIG, _KEY_VERSION})

# Metadata fields that identify the training data (see ``hf_integration.data.dataset_fingerprint_metadata``).
DATA_METADATA_KEYS = ("fingerprint", "num_rows", "id_column", "dataset_name", "split")


# --------------------------------------------------------------------------------------------------
# Safetensors headers, checked before anything is allocated
# --------------------------------------------------------------------------------------------------

def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file, without loading any tensor.

    ``safetensors.safe_open`` checks the header first (its declared length within the file and below
    safetensors' limit, valid JSON nested at most 128 deep, known dtypes, every tensor's byte range inside the
    file and equal to its shape times its dtype's size), so a header cannot make a loader allocate more than the
    file holds.

    Raises:
        ValueError: naming the file and safetensors' reason (a truncated or corrupt file).
    """
    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except SafetensorError as err:
        raise ValueError(f"{path!r} is not a valid safetensors file ({err}); the file is truncated or corrupt"
                         ) from None


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    bad = first_non_finite(tensors)
    if bad is not None:
        count = int((~torch.isfinite(tensors[bad])).sum())
        raise ValueError(f"{what}: tensor {bad!r} holds {count} NaN/inf value(s); refusing poisoned values")


# --------------------------------------------------------------------------------------------------
# Outer parameter files
# --------------------------------------------------------------------------------------------------


def normalize_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """Return ``metadata`` as ``dict[str, str]`` (safetensors headers only hold strings).

    ``str`` values are kept, local paths reduced to their last component (:func:`public_name`; a ``base_model``
    becomes its Hub id, :func:`hub_model_id`, or is dropped); ``int``,
    ``float`` and ``bool`` are converted with ``str``; ``None`` values are dropped (a field that is unknown is
    simply not recorded). Anything else, and the reserved keys (:data:`RESERVED_METADATA_KEYS`), raise, so that
    what is saved is exactly what :func:`check_expected` compares against.
    """
    out: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be str, got {key!r} ({type(key).__name__})")
        if key in RESERVED_METADATA_KEYS:
            raise ValueError(
                f"metadata key {key!r} is reserved (reserved: {sorted(RESERVED_METADATA_KEYS)}); rename it"
            )
        if value is None:
            continue
        if isinstance(value, str):
            if key == "base_model":  # a Hub id, or nothing: a model folder on this machine names no model
                value = hub_model_id(value) or ""
                if not value:
                    continue
            out[key] = public_name(value)
        elif isinstance(value, (bool, int, float)):
            out[key] = str(value)
        else:
            raise TypeError(
                f"metadata[{key!r}] must be a str (or int/float/bool, converted with str), "
                f"got {type(value).__name__}; serialize it yourself, e.g. with json.dumps"
            )
    return out


def save_outer_files(
    save_directory: str | os.PathLike,
    *,
    kind: str,
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
    card: str | None = None,
) -> None:
    """Write ``outer_params.safetensors``, ``outer_config.json`` and (if ``card`` is given) ``README.md``.

    Each file is written atomically, the authoritative parameters file first: if the process dies between
    files, the folder still loads (loading reads only the parameters file), and at worst the human-readable
    ``outer_config.json`` / ``README.md`` describe the previous save until the next one.

    Args:
        save_directory: Folder to write into (created if missing).
        kind: The outer module's kind (e.g. ``"data_weights"``); checked on load.
        config: JSON-serializable constructor config (see ``OuterModule.config_dict``).
        tensors: The module's state dict (moved to CPU and made contiguous here).
        metadata: User metadata (see :func:`normalize_metadata`), e.g. method, rank, rho, steps, base_model,
            dataset_name, split, fingerprint, num_rows, id_column.
        card: The rendered model card (:func:`hf_integration.model_card.render_model_card`); ``None`` leaves
            any ``README.md`` of the folder alone.
    """
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise NotADirectoryError(f"save_directory {save_directory!r} is a file, expected a folder")
    os.makedirs(save_directory, exist_ok=True)
    user_metadata = normalize_metadata(metadata)
    config = dict(config)

    cpu_tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    check_finite(cpu_tensors, f"not saving outer parameters of kind {kind!r} to {save_directory!r}")
    header = {
        **user_metadata,
        _KEY_FORMAT: "pt",
        _KEY_KIND: kind,
        _KEY_CONFIG: json.dumps(config, sort_keys=True),
        _KEY_VERSION: FORMAT_VERSION,
    }
    readable = {
        "kind": kind,
        "config": config,
        "metadata": user_metadata,
        "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                    for name, t in cpu_tensors.items()},
        "format_version": FORMAT_VERSION,
        "note": f"{OUTER_PARAMS_NAME} is authoritative; this file is a human-readable copy of its header.",
    }
    atomic_write(
        os.path.join(save_directory, OUTER_PARAMS_NAME),
        lambda tmp: save_file(cpu_tensors, tmp, metadata=header),
    )
    atomic_write_text(
        os.path.join(save_directory, OUTER_CONFIG_NAME), json.dumps(readable, indent=2, sort_keys=True) + "\n"
    )
    if card is not None:
        atomic_write_text(os.path.join(save_directory, MODEL_CARD_NAME), card)


def check_format_version(version: str, source: str, what: str, supported: int) -> None:
    """Refuse a file whose format ``version`` (an integer string) is newer than ``supported``, naming ``source``."""
    try:
        number = int(version)
    except ValueError:
        raise ValueError(f"{source!r}: unreadable {what} format version {version!r:.50} "
                         f"(this hypergrad reads versions up to {supported})") from None
    if number > supported:
        raise ValueError(f"{source!r} was written in {what} format version {number}, newer than this hypergrad "
                         f"supports (up to version {supported}); upgrade hypergrad to load it")


@dataclass
class LoadedOuterFiles:
    """What :func:`load_outer_files` read from an ``outer_params.safetensors`` file."""

    kind: str
    config: dict[str, Any]
    metadata: dict[str, str]
    tensors: dict[str, torch.Tensor]


def _resolve_params_file(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None,
    token: str | bool | None,
    hub_timeout: float | None = None,
    **hub_kwargs: Any,
) -> str:
    """Return a local path to ``outer_params.safetensors``: local folder/file first, else the Hub.

    The download runs under :func:`hf_integration.hub.hub_call`'s deadline of ``hub_timeout`` seconds (``None``:
    ``HF_HUB_ETAG_TIMEOUT + HF_HUB_DOWNLOAD_TIMEOUT``); a failure or a timeout raises ``FileNotFoundError`` with
    one line, as a missing local folder does.
    """

    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        file = os.path.join(path, OUTER_PARAMS_NAME)
        if not os.path.isfile(file):
            present = sorted(os.listdir(path))
            raise FileNotFoundError(
                f"{OUTER_PARAMS_NAME} not found in local folder {path!r} (it contains: {present}); "
                "was it written by save_pretrained?"
            )
        return file
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ValueError(f"{path!r} is a file but not a .safetensors file; pass the folder written by save_pretrained")
        return path
    if looks_like_local_path(path):
        raise FileNotFoundError(f"local folder {path!r} does not exist (and it does not look like a Hub repo id)")
    download = f"downloading {OUTER_PARAMS_NAME} from the Hub repo {path!r} (revision={revision!r})"
    try:
        return hub_call(
            lambda: hf_hub_download(path, OUTER_PARAMS_NAME, revision=revision, token=token, **hub_kwargs),
            what=download, timeout=hub_timeout, argument="hub_timeout")
    except HubError as err:  # the deadline passed
        raise FileNotFoundError(f"could not load outer parameters from {path!r}: no such local folder, and "
                                f"{err}") from err
    except Exception as err:  # network, auth, missing repo or file: one clear message
        raise FileNotFoundError(
            f"could not load outer parameters from {path!r}: no such local folder, and {download} failed: "
            f"{error_line(err)}"
        ) from err


def load_outer_files(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    hub_timeout: float | None = None,
    **hub_kwargs: Any,
) -> LoadedOuterFiles:
    """Read kind, config, metadata and tensors from a local folder, a ``.safetensors`` file or a Hub repo.

    A local folder takes precedence over a Hub repo of the same name. Only ``outer_params.safetensors`` is
    read (with ``safetensors.safe_open``: no pickle, no code execution). ``hub_kwargs`` go to
    :func:`huggingface_hub.hf_hub_download` (e.g. ``cache_dir``, ``local_files_only``, ``subfolder``,
    ``force_download``). The download has a deadline of ``hub_timeout`` seconds (:func:`hf_integration.hub.hub_call`;
    ``None``: ``HF_HUB_ETAG_TIMEOUT + HF_HUB_DOWNLOAD_TIMEOUT``, 20 s unless set), since ``hf_hub_download``'s own
    timeouts do not bound its retries (minutes against a Hub that does not answer).

    Raises:
        FileNotFoundError: No parameters file at the location (locally or on the Hub), or the download failed
            or did not finish within ``hub_timeout``; one line.
        ValueError: The file is not an outer-parameters file (missing kind/config header), is corrupt, or was
            written in a newer format version than this one reads; ``hub_timeout`` is not a finite number of
            seconds > 0.
    """
    if hub_timeout is not None:  # refused even when a local folder leaves it unused
        hub_deadline(hub_timeout, "hub_timeout")
    file = _resolve_params_file(path_or_repo_id, revision=revision, token=token, hub_timeout=hub_timeout,
                                **hub_kwargs)
    header = read_safetensors_metadata(file)
    missing = [k for k in (_KEY_KIND, _KEY_CONFIG) if k not in header]
    if missing:
        raise ValueError(
            f"{file!r} is a safetensors file but not an outer-parameters file: its header lacks {missing} "
            "(it was not written by OuterModule.save_pretrained)"
        )
    try:
        config = json.loads(header[_KEY_CONFIG])
    except (json.JSONDecodeError, RecursionError) as err:  # RecursionError: a config nested too deep
        raise ValueError(f"{file!r}: the {_KEY_CONFIG!r} header entry is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{file!r}: the {_KEY_CONFIG!r} header entry is not a JSON object")
    check_format_version(header.get(_KEY_VERSION, "1"), file, "outer-parameters", int(FORMAT_VERSION))
    tensors = load_tensors(file)
    check_finite(tensors, f"outer parameters {file!r}")
    kind = header[_KEY_KIND]
    metadata = {k: v for k, v in header.items() if k not in RESERVED_METADATA_KEYS}
    return LoadedOuterFiles(kind=kind, config=config, metadata=metadata, tensors=tensors)


def load_tensors(file: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (its header checked by safetensors, :func:`read_safetensors_metadata`).

    Each tensor is copied into memory of its own: ``safe_open`` hands out tensors at their byte offset in the
    file, which is not aligned as torch's allocator aligns (64 bytes), and BLAS kernels take other code paths
    (other rounding) on unaligned data. A matrix product of a loaded tensor would then differ in the last bits
    from the same product before the save, and a resumed run would drift from an uninterrupted one."""
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name).clone() for name in f.keys()}
    except Exception as err:
        raise ValueError(f"{file!r} is not a readable safetensors file: {type(err).__name__}: {err}") from err


def _as_comparable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_as_comparable(v) for v in value]
    if isinstance(value, list):
        return [_as_comparable(v) for v in value]
    return value


def check_expected(
    expected: Mapping[str, Any] | None,
    *,
    metadata: Mapping[str, str],
    config: Mapping[str, Any],
    source: str = "",
) -> None:
    """Refuse saved outer parameters whose metadata/config disagree with ``expected``.

    Each ``expected`` field is looked up first in the user metadata (values compared as strings, since the
    metadata is stored as strings: ``{"num_rows": 1000}`` matches a saved ``"1000"``), then in the config
    (compared as JSON values, tuples as lists: e.g. ``{"module_names": [...]}``, ``{"num_examples": 1000}``).
    A field whose expected value is ``None`` is skipped. A field that was not recorded at all is refused too:
    it cannot be verified.

    Raises:
        ValueError: naming the field, the saved value and the expected value.
    """
    where = f" in {source!r}" if source else ""
    for key, want in (expected or {}).items():
        if want is None:
            continue
        if key in metadata:
            saved = metadata[key]
            if isinstance(want, (list, tuple, dict)):
                ok = saved == json.dumps(_as_comparable(want)) or saved == str(want)
            else:
                ok = saved in (str(want), public_name(str(want)))  # a local path was saved as its last component
        elif key in config:
            saved = config[key]
            ok = _as_comparable(saved) == _as_comparable(want)
        else:
            raise ValueError(
                f"outer parameters{where}: expected {key}={want!r}, but no {key!r} was saved "
                f"(saved metadata fields: {sorted(metadata)}; config fields: {sorted(config)}); "
                f"pass expected={{{key!r}: None}} to skip this check"
            )
        if not ok:
            raise ValueError(
                f"outer parameters{where} do not match: {key} was saved as {saved!r} but {want!r} is expected. "
                + _mismatch_hint(key)
            )


def _mismatch_hint(key: str) -> str:
    if key in DATA_METADATA_KEYS or key == "num_examples":
        return ("They were learned on other data (or data processed otherwise); per-example weights, indexed by "
                "example id, would weight the wrong examples.")
    if key in {"base_model", "module_names", "granularity", "adapter_name"}:
        return "These outer parameters were learned for a different model or LoRA layout."
    return ""
