"""Persistence of outer parameters: local folders, the Hugging Face Hub, optimizer checkpoints.

The on-disk layout mirrors PEFT adapters and ``PyTorchModelHubMixin``::

    save_directory/
        outer_params.safetensors   # the learned tensors; header metadata holds kind, config and user metadata
        outer_config.json          # the same config and metadata, human readable
        README.md                  # a model card: what was learned, how, and how to load it
        outer_optimizer.safetensors  # optional (checkpoints only): the outer optimizer's state dict

Design rules, and why:

* **safetensors only, never pickle.** Loading a file downloaded from the Hub must not run code, so neither
  parameters nor optimizer states go through ``torch.save``/``torch.load``. Non-tensor optimizer entries
  (hyperparameters, param-group lists) are encoded as tagged JSON in the safetensors header.
* **The safetensors header is authoritative.** ``outer_config.json`` is written for humans (and the Hub's
  file viewer); loading reads kind, config and metadata from ``outer_params.safetensors`` alone, so a
  single download suffices and the two can never disagree about what is loaded.
* **Every write is atomic** (:func:`atomic_write`): an interrupted save (pre-emption, full disk, a crash in
  the middle of serialization) leaves the previous file intact rather than a truncated one that would
  poison a later resume.
* **Nothing non-finite is written or loaded**: tensors holding NaN/inf are refused on save and on load.
* **Headers are checked before anything is allocated** (:func:`read_safetensors_header`): the header's
  declared sizes must fit the file, and the shapes a config implies are compared with the file's before a
  module of that size is built.
* **Hub requests time out** (:func:`ensure_hub_timeout`) and Hub failures become one-line :class:`HubError`
  messages; :func:`check_hub_repo` checks credentials and reachability before a long job, as ``Trainer``
  does by creating the repo at start.
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
import logging
import math
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from huggingface_hub import HfApi, constants, get_session, get_token, hf_hub_download, set_client_factory
from safetensors import safe_open
from safetensors.torch import save_file

from hypergrad.outer_step import first_non_finite

logger = logging.getLogger(__name__)

__all__ = [
    "OUTER_PARAMS_NAME",
    "OUTER_CONFIG_NAME",
    "OUTER_OPTIMIZER_NAME",
    "MODEL_CARD_NAME",
    "RESERVED_METADATA_KEYS",
    "LoadedOuterFiles",
    "DATA_METADATA_KEYS",
    "CheckpointError",
    "HubError",
    "error_line",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_dir",
    "read_safetensors_header",
    "BILEVEL_CHECKPOINT_FILES",
    "checkpoint_problem",
    "looks_like_local_path",
    "last_checkpoint",
    "ensure_hub_timeout",
    "check_hub_repo",
    "normalize_metadata",
    "save_outer_files",
    "load_outer_files",
    "check_expected",
    "render_model_card",
    "outer_params_card_section",
    "save_optimizer_state",
    "load_optimizer_state",
    "push_folder_to_hub",
]

OUTER_PARAMS_NAME = "outer_params.safetensors"
OUTER_CONFIG_NAME = "outer_config.json"
OUTER_OPTIMIZER_NAME = "outer_optimizer.safetensors"
MODEL_CARD_NAME = "README.md"

FORMAT_VERSION = "1"
_OPTIMIZER_FORMAT = "hypergrad.optimizer_state.v1"

# Keys of the safetensors header that this module writes itself; user metadata may not use them.
_KEY_FORMAT = "format"  # "pt", as transformers/PEFT write it
_KEY_KIND = "kind"
_KEY_CONFIG = "outer_config"
_KEY_VERSION = "outer_format_version"
RESERVED_METADATA_KEYS = frozenset({_KEY_FORMAT, _KEY_KIND, _KEY_CONFIG, _KEY_VERSION})

# Metadata fields that identify the training data (see ``hf_integration.data.dataset_fingerprint_metadata``).
DATA_METADATA_KEYS = ("fingerprint", "num_rows", "id_column", "dataset_name", "split")


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike, writer_fn: Callable[[str], Any]) -> None:
    """Write ``path`` atomically: ``writer_fn(tmp_path)`` writes a temporary file that then replaces ``path``.

    The temporary file lives in the destination directory (so ``os.replace`` is a same-filesystem rename,
    which POSIX and Windows perform atomically) and is flushed to disk before the rename. If
    ``writer_fn`` raises, the temporary file is removed, the exception propagates, and any previous file
    at ``path`` is left untouched: a reader sees either the old complete file or the new complete one,
    never a half-written one.

    Args:
        path: Destination file. Its directory is created if missing.
        writer_fn: Called with the temporary path (a ``str``); must write the full content there (it may
            open the path itself, e.g. ``safetensors.torch.save_file(tensors, tmp_path)``).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        writer_fn(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp (and some writers, e.g. safetensors) create 0600: give the mode open() would, per the umask
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        try:
            os.remove(tmp_path)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask (reading it means setting it; the lock keeps our own threads from racing)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _fsync_dir(directory: str) -> None:
    """Persist a rename in ``directory``; not possible on every platform/filesystem."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """:func:`atomic_write` of a text file."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding=encoding) as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_dir(path: str | os.PathLike, writer_fn: Callable[[str], Any]) -> None:
    """Write the folder ``path`` through a temporary sibling folder that then takes its place.

    ``writer_fn(tmp_dir)`` fills the temporary folder; if it raises, the folder is removed and a previous
    ``path`` stays untouched. A previous ``path`` is moved aside and deleted only once the new one is in
    place, so a reader finds the old complete folder or the new complete one (or, for an instant between
    the two renames, none), never a half-written one.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        writer_fn(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if os.path.lexists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".old")
            os.rmdir(old)
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Safetensors headers, checked before anything is allocated
# --------------------------------------------------------------------------------------------------

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Read and check a safetensors file's header without loading any tensor.

    The format is an 8-byte little-endian header length, a JSON header ``{name: {"dtype", "shape",
    "data_offsets"}, "__metadata__": {str: str}}``, then the tensor bytes. Checked here: the header length
    (at most :data:`MAX_HEADER_BYTES` and within the file), valid JSON, known dtypes, non-negative integer
    shapes, and that each tensor's declared size (shape x dtype) equals its byte range, which must lie inside
    the file. A header cannot then make a loader allocate more than the file holds.

    Returns:
        ``(tensors, metadata)``: the tensor entries by name, and the ``__metadata__`` strings.

    Raises:
        ValueError: naming the file and what is wrong with it.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path!r} is not a safetensors file: {size} bytes, less than the 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise ValueError(f"{path!r} is not a valid safetensors file: its header claims {length} bytes "
                             f"(file size {size}, limit {MAX_HEADER_BYTES}); the file is truncated or corrupt")
        try:
            header = json.loads(f.read(length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"{path!r} is not a valid safetensors file: unreadable JSON header ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path!r} is not a valid safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path!r}: the safetensors __metadata__ must map strings to strings")
    data_size = size - 8 - length
    for name, entry in header.items():
        where = f"{path!r}: tensor {name!r}"
        if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPE_BYTES:
            raise ValueError(f"{where} has no valid dtype (got {entry!r:.100})")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                 for d in shape)):
            raise ValueError(f"{where} has an invalid shape {shape!r:.100}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise ValueError(f"{where}: its byte range {offsets!r:.100} is not inside the file's {data_size} "
                             "data bytes; the file is truncated or corrupt")
        declared = math.prod(shape) * _DTYPE_BYTES[entry["dtype"]]
        if declared != offsets[1] - offsets[0]:
            raise ValueError(f"{where} declares shape {shape} ({declared} bytes) but holds "
                             f"{offsets[1] - offsets[0]} bytes; the file is corrupt")
    return header, metadata


def _check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    bad = first_non_finite(tensors)
    if bad is not None:
        count = int((~torch.isfinite(tensors[bad])).sum())
        raise ValueError(f"{what}: tensor {bad!r} holds {count} NaN/inf value(s); refusing poisoned values")


# --------------------------------------------------------------------------------------------------
# Outer parameter files
# --------------------------------------------------------------------------------------------------


def normalize_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """Return ``metadata`` as ``dict[str, str]`` (safetensors headers only hold strings).

    ``str`` values are kept; ``int``, ``float`` and ``bool`` are converted with ``str``; ``None`` values are
    dropped (a field that is unknown is simply not recorded). Anything else, and the reserved keys
    (:data:`RESERVED_METADATA_KEYS`), raise, so that what is saved is exactly what :func:`check_expected`
    compares against.
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
            out[key] = value
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
    summary_stats: Mapping[str, float] | None = None,
    class_name: str | None = None,
    card_repo_id: str | None = None,
    optimizer_state: Mapping[str, Any] | None = None,
    model_card: bool = True,
) -> None:
    """Write ``outer_params.safetensors``, ``outer_config.json`` and ``README.md`` (and optionally the optimizer state).

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
        summary_stats: Shown in the model card.
        class_name: Python class name shown in the card's loading snippet.
        card_repo_id: Repo id (or path) shown in the card's loading snippet; defaults to the folder path.
        optimizer_state: If given, also written to ``outer_optimizer.safetensors`` with
            :func:`save_optimizer_state` (for checkpoints; not uploaded by ``push_to_hub``).
        model_card: Write ``README.md``. Pass ``False`` when saving next to a model whose own card lives in
            the same folder (e.g. a ``Trainer`` output dir); see :func:`outer_params_card_section`.
    """
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise NotADirectoryError(f"save_directory {save_directory!r} is a file, expected a folder")
    os.makedirs(save_directory, exist_ok=True)
    user_metadata = normalize_metadata(metadata)
    config = dict(config)
    config_json = json.dumps(config, sort_keys=True)

    cpu_tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    _check_finite(cpu_tensors, f"not saving outer parameters of kind {kind!r} to {save_directory!r}")
    header = {
        **user_metadata,
        _KEY_FORMAT: "pt",
        _KEY_KIND: kind,
        _KEY_CONFIG: config_json,
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
    card = render_model_card(
        kind=kind,
        config=config,
        metadata=user_metadata,
        summary_stats=dict(summary_stats or {}),
        class_name=class_name or "OuterModule",
        repo_id=card_repo_id or save_directory,
    )

    atomic_write(
        os.path.join(save_directory, OUTER_PARAMS_NAME),
        lambda tmp: save_file(cpu_tensors, tmp, metadata=header),
    )
    atomic_write_text(
        os.path.join(save_directory, OUTER_CONFIG_NAME), json.dumps(readable, indent=2, sort_keys=True) + "\n"
    )
    if model_card:
        atomic_write_text(os.path.join(save_directory, MODEL_CARD_NAME), card)
    if optimizer_state is not None:
        save_optimizer_state(optimizer_state, os.path.join(save_directory, OUTER_OPTIMIZER_NAME))


@dataclass
class LoadedOuterFiles:
    """What :func:`load_outer_files` read from an ``outer_params.safetensors`` file."""

    kind: str
    config: dict[str, Any]
    metadata: dict[str, str]
    tensors: dict[str, torch.Tensor]
    path: str = ""


_LOCAL_PATH_HINT = re.compile(r"^(\.{1,2}[\\/]|[\\/]|~)")


def looks_like_local_path(path: str) -> bool:
    """Whether ``path`` can only be a local path, not a Hub repo id (``name`` or ``org/name``)."""
    return bool(_LOCAL_PATH_HINT.match(path)) or path.count("/") > 1 or "\\" in path


def _resolve_params_file(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None,
    token: str | bool | None,
    **hub_kwargs: Any,
) -> str:
    """Return a local path to ``outer_params.safetensors``: local folder/file first, else the Hub."""
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
    try:
        return hf_hub_download(path, OUTER_PARAMS_NAME, revision=revision, token=token, **hub_kwargs)
    except Exception as err:  # network, auth, missing repo or file: one clear message
        raise FileNotFoundError(
            f"could not load outer parameters from {path!r}: no such local folder, and downloading "
            f"{OUTER_PARAMS_NAME} from the Hub repo {path!r} (revision={revision!r}) failed: "
            f"{type(err).__name__}: {err}"
        ) from err


def load_outer_files(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    **hub_kwargs: Any,
) -> LoadedOuterFiles:
    """Read kind, config, metadata and tensors from a local folder, a ``.safetensors`` file or a Hub repo.

    A local folder takes precedence over a Hub repo of the same name. Only ``outer_params.safetensors`` is
    read (with ``safetensors.safe_open``: no pickle, no code execution). ``hub_kwargs`` go to
    :func:`huggingface_hub.hf_hub_download` (e.g. ``cache_dir``, ``local_files_only``, ``subfolder``,
    ``force_download``).

    Raises:
        FileNotFoundError: No parameters file at the location (locally or on the Hub).
        ValueError: The file is not an outer-parameters file (missing kind/config header) or is corrupt.
    """
    file = _resolve_params_file(path_or_repo_id, revision=revision, token=token, **hub_kwargs)
    _, header = read_safetensors_header(file)
    missing = [k for k in (_KEY_KIND, _KEY_CONFIG) if k not in header]
    if missing:
        raise ValueError(
            f"{file!r} is a safetensors file but not an outer-parameters file: its header lacks {missing} "
            "(it was not written by OuterModule.save_pretrained)"
        )
    try:
        config = json.loads(header[_KEY_CONFIG])
    except json.JSONDecodeError as err:
        raise ValueError(f"{file!r}: the {_KEY_CONFIG!r} header entry is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{file!r}: the {_KEY_CONFIG!r} header entry is not a JSON object")
    tensors = _load_tensors(file)
    _check_finite(tensors, f"outer parameters {file!r}")
    kind = header[_KEY_KIND]
    metadata = {k: v for k, v in header.items() if k not in RESERVED_METADATA_KEYS}
    return LoadedOuterFiles(kind=kind, config=config, metadata=metadata, tensors=tensors, path=file)


def _load_tensors(file: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file whose header :func:`read_safetensors_header` has checked."""
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
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
                ok = saved == str(want)
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
        return ("Per-example weights are indexed by example id: loading them for a different dataset (or a "
                "differently processed one) would weight the wrong examples.")
    if key in {"base_model", "module_names", "granularity", "adapter_name"}:
        return "These outer parameters were learned for a different model or LoRA layout."
    return ""


# --------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------

_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")

_KIND_DESCRIPTIONS = {
    "data_weights": (
        "learned per-example **data weights**: one logit `s_i` per training example, weight "
        "`w_i = sigmoid(s_i)`, and the inner (training) loss is the normalized weighted mean "
        "`sum_i w_i l_i / sum_i w_i` over each batch. The weights were tuned by bilevel optimization so that "
        "training on the weighted data minimizes a held-out (outer) loss; low weights flag examples that hurt "
        "held-out performance (noisy labels, off-distribution data)."
    ),
    "lora_regularization": (
        "learned **LoRA regularization strengths**: one log-strength `s_m` per LoRA module (or per transformer "
        "layer), and the inner (training) loss is `mean_i l_i + sum_m 1/2 exp(s_m) (|A_m|^2 + |B_m|^2)`. The "
        "strengths were tuned by bilevel optimization so that fine-tuning minimizes a held-out (outer) loss."
    ),
}

_HOW_FIELDS = [
    ("method", "Hypergradient method"),
    ("rank", "Rank (Nyström)"),
    ("rho", "rho (damping)"),
    ("sketch", "Nyström sketch"),
    ("iters", "Solver iterations"),
    ("hvp_mode", "HVP mode"),
    ("steps", "Training steps"),
    ("outer_steps", "Outer steps"),
    ("unroll_steps", "Inner steps per outer step"),
    ("outer_learning_rate", "Outer learning rate"),
    ("base_model", "Base model"),
    ("dataset_name", "Dataset"),
    ("split", "Split"),
    ("num_rows", "Rows"),
    ("id_column", "Example-id column"),
    ("fingerprint", "Dataset fingerprint"),
]


def _yaml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML scalar


def render_model_card(
    *,
    kind: str,
    config: Mapping[str, Any],
    metadata: Mapping[str, str],
    summary_stats: Mapping[str, float],
    class_name: str,
    repo_id: str,
) -> str:
    """Render the README.md model card: YAML front matter, what was learned, how, statistics, loading snippet."""
    tags = ["hypergrad", "bilevel-optimization", kind.replace("_", "-")]
    front = ["---", "library_name: hypergrad", "tags:"] + [f"- {t}" for t in tags]
    base_model = metadata.get("base_model", "")
    if base_model and _REPO_ID_RE.match(base_model) and not os.path.exists(base_model):
        front.append(f"base_model: {_yaml_str(base_model)}")
    dataset_name = metadata.get("dataset_name", "")
    if dataset_name and _REPO_ID_RE.match(dataset_name) and not os.path.exists(dataset_name):
        front += ["datasets:", f"- {_yaml_str(dataset_name)}"]
    front.append("---")
    body = _card_body(kind=kind, config=config, metadata=metadata, summary_stats=summary_stats,
                      class_name=class_name, repo_id=repo_id, level=1)
    return "\n".join(front) + "\n\n" + body


def outer_params_card_section(
    module: Any,
    metadata: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
) -> str:
    """A markdown section (``##`` title, no YAML front matter) describing ``module``, to append to another card.

    Used by the trainer to extend ``transformers.Trainer``'s model card, which lives in the same
    ``README.md`` as the model when both are saved to one output folder.

    Args:
        module: An :class:`~hf_integration.outer_modules.OuterModule`.
        metadata: Training metadata (merged over ``module.metadata``).
        repo_id: Repo id or path shown in the loading snippet (default: a placeholder).
    """
    merged = {**getattr(module, "metadata", {}), **normalize_metadata(metadata)}
    return _card_body(
        kind=module.kind,
        config=module.config_dict(),
        metadata=merged,
        summary_stats=module.summary_stats(),
        class_name=type(module).__name__,
        repo_id=repo_id or "path/or/repo_id",
        level=2,
    )


_TITLES = {"data_weights": "Learned data weights", "lora_regularization": "Learned LoRA regularization"}


def _card_body(
    *,
    kind: str,
    config: Mapping[str, Any],
    metadata: Mapping[str, str],
    summary_stats: Mapping[str, float],
    class_name: str,
    repo_id: str,
    level: int,
) -> str:
    h1, h2 = "#" * level, "#" * (level + 1)
    title = _TITLES.get(kind, f"Outer parameters ({kind})")
    what = _KIND_DESCRIPTIONS.get(kind, f"outer parameters of kind `{kind}`.")
    holder = "This repository holds" if level == 1 else "Alongside the model, this folder holds"
    lines = [f"{h1} {title}", "", f"{holder} {what}", ""]
    if kind == "data_weights":
        lines += [
            f"There are {config.get('num_examples', '?')} weights, indexed by the integer example-id column "
            f"`{config.get('id_column', 'example_id')}` of the training dataset (added with "
            "`hf_integration.add_example_ids` before any shuffling or filtering).",
            "",
        ]
    elif kind == "lora_regularization":
        names = list(config.get("module_names", []))
        lines += [
            f"Granularity: `{config.get('granularity', '?')}`; {len(names)} LoRA modules "
            f"(adapter `{config.get('adapter_name', 'default')}`), "
            f"{len(config.get('group_names', names))} learned strengths.",
            "",
        ]

    lines += [f"{h2} How they were learned", "", "| | |", "|---|---|"]
    recorded = False
    for key, label in _HOW_FIELDS:
        if key in metadata:
            lines.append(f"| {label} | `{metadata[key]}` |")
            recorded = True
    for key in sorted(k for k in metadata if k not in dict(_HOW_FIELDS)):
        lines.append(f"| {key} | `{metadata[key]}` |")
        recorded = True
    if not recorded:
        lines.append("| (no training metadata recorded) | |")
    lines.append("")

    if summary_stats:
        lines += [f"{h2} Summary statistics", "", "| statistic | value |", "|---|---|"]
        for key, value in summary_stats.items():
            lines.append(f"| {key} | {_fmt(value)} |")
        lines.append("")

    expected_example = ""
    if kind == "data_weights":
        expected_example = (
            "\n\n# Optional: refuse weights learned on other data (train_dataset prepared as for training)\n"
            "from hf_integration import dataset_fingerprint_metadata\n"
            f'outer = {class_name}.from_pretrained("{repo_id}", '
            "expected=dataset_fingerprint_metadata(train_dataset))"
        )
    usage = {
        "data_weights": "w = outer.weights()  # shape (num_examples,): w[example_id] in (0, 1)",
        "lora_regularization": "print(outer.strengths())  # exp(log_strength), one per group",
    }.get(kind, "print(outer.summary_stats())")
    lines += [
        f"{h2} Loading",
        "",
        "```python",
        f"from hf_integration import {class_name}",
        "",
        f'outer = {class_name}.from_pretrained("{repo_id}")',
        usage + expected_example,
        "```",
        "",
        f"Files: `{OUTER_PARAMS_NAME}` (tensors; kind, config and the metadata above in its header), "
        f"`{OUTER_CONFIG_NAME}` (human-readable copy). Loading never unpickles.",
        "",
    ]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# --------------------------------------------------------------------------------------------------
# Optimizer state (no pickle)
# --------------------------------------------------------------------------------------------------


class _Encoder:
    """Tagged-JSON encoding of a nested state dict; tensors go to a flat ``{key: tensor}`` dict.

    JSON alone cannot round-trip a torch optimizer state dict exactly: ``state`` has ``int`` keys, ``betas``
    is a tuple, ``step`` is a tensor. Dicts are therefore encoded as ``{"__dict__": [[key, value], ...]}``
    (keys keep their type), tuples as ``{"__tuple__": [...]}``, tensors as ``{"__tensor__": "t0"}``, and
    non-finite floats as ``{"__float__": "nan" | "inf" | "-inf"}`` (strict JSON has no NaN/Infinity).
    """

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def encode(self, obj: Any, where: str = "state_dict") -> Any:
        if isinstance(obj, torch.Tensor):
            key = f"t{len(self.tensors)}"
            self.tensors[key] = obj.detach().to("cpu").contiguous().clone()
            return {"__tensor__": key}
        if isinstance(obj, Mapping):
            items = []
            for k, v in obj.items():
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise TypeError(f"{where}: dict key {k!r} ({type(k).__name__}) is not a str or int")
                items.append([k, self.encode(v, f"{where}[{k!r}]")])
            return {"__dict__": items}
        if isinstance(obj, tuple):
            return {"__tuple__": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if isinstance(obj, float) and not math.isfinite(obj):
            return {"__float__": repr(obj)}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(
            f"{where}: cannot save a {type(obj).__name__} without pickle "
            "(supported: tensors, dict, list, tuple, str, int, float, bool, None)"
        )


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__dict__"}:
            return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__float__"}:
            return float(obj["__float__"])
        raise ValueError(f"malformed optimizer-state encoding: unexpected object with keys {sorted(obj)}")
    return obj


def save_optimizer_state(state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Save a (torch.optim) state dict to a safetensors file, atomically and without pickle.

    Tensors (e.g. Adam's ``exp_avg``, ``exp_avg_sq``, ``step``) are stored as safetensors tensors; everything
    else (param groups, hyperparameters, the structure) as tagged JSON in the header, so that
    :func:`load_optimizer_state` returns an equal structure (same key types, tuples, dtypes, values).
    Works for any nested dict/list/tuple of tensors and JSON scalars (LR-scheduler state dicts too).
    """
    encoder = _Encoder()
    tree = encoder.encode(dict(state_dict))
    _check_finite(encoder.tensors, f"not saving the optimizer state to {os.fspath(path)!r}")
    header = {"format": "pt", "hypergrad_state_format": _OPTIMIZER_FORMAT,
              "state_dict": json.dumps(tree, allow_nan=False)}
    atomic_write(path, lambda tmp: save_file(encoder.tensors, tmp, metadata=header))


def load_optimizer_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a state dict written by :func:`save_optimizer_state` (safetensors only, never unpickles).

    Pass the result to ``optimizer.load_state_dict``; torch moves the state tensors to the parameters'
    device there, so ``device="cpu"`` (the default) is fine in general.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"optimizer state file {path!r} not found")
    _, header = read_safetensors_header(path)
    if header.get("hypergrad_state_format") != _OPTIMIZER_FORMAT or "state_dict" not in header:
        raise ValueError(f"{path!r} was not written by save_optimizer_state (header: {sorted(header)})")
    tensors = {name: t.to(device) for name, t in _load_tensors(path).items()}
    _check_finite(tensors, f"optimizer state {path!r}")
    try:
        return _decode(json.loads(header["state_dict"]), tensors)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path!r}: malformed optimizer state ({type(err).__name__}: {err})") from None


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR + "-<step>"


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from (incomplete, corrupt, or from other data); the message names the
    folder or file and the problem."""


BILEVEL_CHECKPOINT_FILES = (OUTER_OPTIMIZER_NAME, OUTER_PARAMS_NAME)


def checkpoint_problem(folder: str | os.PathLike, *, outer_files: Sequence[str] = BILEVEL_CHECKPOINT_FILES
                       ) -> str | None:
    """Why ``folder`` is not a complete checkpoint (one line), or ``None`` if it is.

    ``Trainer`` writes ``trainer_state.json`` last, so its presence (readable) marks a finished save; the
    model weights and ``outer_files`` must be there too: a ``BilevelTrainer`` checkpoint holds the outer
    optimizer state and, with an outer module, the outer parameters (pass ``()`` for a plain ``Trainer``).
    """
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.utils import (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME,
                                    SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME)

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return f"{folder!r} is not a folder"
    files = set(os.listdir(folder))
    if TRAINER_STATE_NAME not in files:
        return f"{folder!r} has no {TRAINER_STATE_NAME}: the checkpoint save did not finish"
    try:
        with open(os.path.join(folder, TRAINER_STATE_NAME), encoding="utf-8") as handle:
            json.load(handle)
    except (OSError, ValueError) as err:
        return f"{folder!r}: {TRAINER_STATE_NAME} is unreadable ({type(err).__name__}: {err})"
    weights = {ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME, SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME,
               WEIGHTS_NAME, WEIGHTS_INDEX_NAME}
    if not files & weights and not any(f.startswith("pytorch_model_fsdp") for f in files):
        return f"{folder!r} holds no model weights (none of {sorted(weights)})"
    for name in outer_files:
        if name not in files:
            return (f"{folder!r} has no {name}: a BilevelTrainer checkpoint needs it to resume "
                    "(without it the outer problem would restart from scratch)")
    return None


def last_checkpoint(folder: str | os.PathLike, *, outer_files: Sequence[str] = BILEVEL_CHECKPOINT_FILES
                    ) -> str | None:
    """The complete ``checkpoint-<step>`` folder of ``folder`` with the highest step (``None`` if there is none).

    Like ``transformers.trainer_utils.get_last_checkpoint``, but incomplete folders (a save killed midway,
    see :func:`checkpoint_problem`) are skipped with a warning instead of being returned.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return None
    steps = sorted(((int(m.group(1)), name) for name in os.listdir(folder) if (m := _CHECKPOINT_RE.match(name))),
                   reverse=True)
    for _, name in steps:
        path = os.path.join(folder, name)
        problem = checkpoint_problem(path, outer_files=outer_files)
        if problem is None:
            return path
        if os.path.isdir(path):
            logger.warning("Skipping incomplete checkpoint: %s", problem)
    return None


# --------------------------------------------------------------------------------------------------
# Hub upload
# --------------------------------------------------------------------------------------------------


class HubError(RuntimeError):
    """A Hub request failed (unreachable, timed out, no credentials, no permission); the message is one line."""


def error_line(err: BaseException) -> str:
    """``Type: first line of the message`` of ``err`` (Hub, HTTP and torch errors carry multi-line details)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def ensure_hub_timeout(seconds: float | None = None) -> None:
    """Give ``huggingface_hub``'s shared HTTP client a timeout if it has none, so that no Hub request can hang.

    ``huggingface_hub`` passes timeouts to its downloads (``HF_HUB_ETAG_TIMEOUT``, ``HF_HUB_DOWNLOAD_TIMEOUT``)
    but its API calls (``create_repo``, the commit of ``upload_folder``) use the shared client, which has no
    timeout by default. This installs, with ``huggingface_hub.set_client_factory``, the default client with a
    timeout of ``seconds`` (default: ``HF_HUB_DOWNLOAD_TIMEOUT``, 10 s unless set) per connect, read and
    write; a client configured by the user with a timeout of its own is kept.
    """
    from huggingface_hub.utils._http import default_client_factory

    current = get_session().timeout
    if any(t is not None for t in (current.connect, current.read, current.write, current.pool)):
        return
    seconds = float(seconds if seconds is not None else constants.HF_HUB_DOWNLOAD_TIMEOUT)

    def client_with_timeout():
        client = default_client_factory()
        client.timeout = seconds
        return client

    set_client_factory(client_with_timeout)


def check_hub_repo(repo_id: str, *, token: str | bool | None = None, private: bool | None = None,
                   endpoint: str | None = None) -> str:
    """Check credentials and reachability before a long job: create ``repo_id`` if needed (``exist_ok``, as
    ``Trainer`` does at start with ``push_to_hub``), with timeouts. Returns the resolved repo id.

    Raises:
        HubError: no token, the Hub unreachable or slow, no permission; one line, in seconds.
    """
    ensure_hub_timeout()
    if token is None and get_token() is None:
        raise HubError(f"cannot push to {repo_id!r}: no Hugging Face token; log in with `hf auth login`, set "
                       "HF_TOKEN, or pass a token (--hub_token)")
    api = HfApi(token=token, endpoint=endpoint)
    try:
        url = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
    except Exception as err:
        raise HubError(f"cannot create or reach the Hub repo {repo_id!r} at {api.endpoint}: {error_line(err)}") from err
    resolved = getattr(url, "repo_id", None)
    return resolved if isinstance(resolved, str) and resolved else repo_id


def push_folder_to_hub(
    save_fn: Callable[[str, str], None],
    repo_id: str,
    *,
    commit_message: str = "Upload outer parameters",
    private: bool | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
    revision: str | None = None,
) -> str:
    """Create ``repo_id`` if needed, let ``save_fn(tmp_dir, repo_id)`` fill a temporary folder, upload it.

    Every request has a timeout (:func:`ensure_hub_timeout`); a Hub failure raises :class:`HubError`.
    Returns the commit URL (the pull-request URL when ``create_pr=True``).
    """
    repo_id = check_hub_repo(repo_id, token=token, private=private)
    with tempfile.TemporaryDirectory() as tmp:
        save_fn(tmp, repo_id)
        try:
            commit = HfApi(token=token).upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                commit_message=commit_message,
                token=token,
                create_pr=create_pr,
                revision=revision,
                allow_patterns=[OUTER_PARAMS_NAME, OUTER_CONFIG_NAME, MODEL_CARD_NAME],
            )
        except Exception as err:
            raise HubError(f"uploading to the Hub repo {repo_id!r} failed: {error_line(err)}") from err
    pr_url = getattr(commit, "pr_url", None)
    if create_pr and isinstance(pr_url, str) and pr_url:
        return pr_url
    commit_url = getattr(commit, "commit_url", None)
    return commit_url if isinstance(commit_url, str) else str(commit)
