"""Hugging Face Hub I/O of outer parameters: upload, request timeouts, credential and reachability checks.

* **Hub requests time out** (:func:`ensure_hub_timeout`) and Hub failures become one-line :class:`HubError`
  messages; :func:`check_hub_repo` checks credentials and reachability before a long job, as ``Trainer``
  does by creating the repo at start.
* :func:`push_folder_to_hub` uploads a folder written by ``OuterModule.save_pretrained`` in one commit.

The other persistence concepts live in their own modules, re-exported here for compatibility:
:mod:`hf_integration.serialization` (atomic writes, safetensors save/load/check of outer files),
:mod:`hf_integration.model_card` (cards), :mod:`hf_integration.optimizer_state` (optimizer state without
pickle), :mod:`hf_integration.checkpoints` (complete checkpoints).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable

from huggingface_hub import HfApi, constants, get_session, get_token, set_client_factory

from .checkpoints import BILEVEL_CHECKPOINT_FILES, CheckpointError, checkpoint_problem, last_checkpoint  # noqa: F401
from .model_card import outer_params_card_section, render_model_card  # noqa: F401
from .optimizer_state import load_optimizer_state, save_optimizer_state  # noqa: F401
from .serialization import (DATA_METADATA_KEYS, FORMAT_VERSION, MODEL_CARD_NAME, OUTER_CONFIG_NAME,  # noqa: F401
                            OUTER_OPTIMIZER_NAME, OUTER_PARAMS_NAME, RESERVED_METADATA_KEYS, LoadedOuterFiles,
                            atomic_write, atomic_write_dir, atomic_write_text, check_expected, load_outer_files,
                            looks_like_local_path, normalize_metadata, read_safetensors_header, save_outer_files)

# The names imported above from the other persistence modules stay importable from here (``hub.atomic_write``,
# ``hub.CheckpointError``, ...) for existing code; they are documented, and listed, in their own modules.
__all__ = ["HubError", "error_line", "ensure_hub_timeout", "check_hub_repo", "push_folder_to_hub"]


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
                   endpoint: str | None = None, repo_type: str | None = None) -> str:
    """Check credentials and reachability before a long job: create ``repo_id`` if needed (``exist_ok``, as
    ``Trainer`` does at start with ``push_to_hub``), with timeouts. Returns the resolved repo id.
    ``repo_type``: ``None``/``"model"`` (outer parameters), ``"dataset"`` (e.g. a weighted training set).

    Raises:
        HubError: no token, the Hub unreachable or slow, no permission; one line, in seconds.
    """
    ensure_hub_timeout()
    if token is None and get_token() is None:
        raise HubError(f"cannot push to {repo_id!r}: no Hugging Face token; log in with `hf auth login`, set "
                       "HF_TOKEN, or pass a token (--hub_token)")
    api = HfApi(token=token, endpoint=endpoint)
    try:
        kwargs = {} if repo_type in (None, "model") else {"repo_type": repo_type}
        url = api.create_repo(repo_id, token=token, private=private, exist_ok=True, **kwargs)
    except Exception as err:
        what = "" if repo_type in (None, "model") else f"{repo_type} "
        raise HubError(f"cannot create or reach the Hub {what}repo {repo_id!r} at {api.endpoint}: "
                       f"{error_line(err)}") from err
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
                allow_patterns=[OUTER_PARAMS_NAME, OUTER_CONFIG_NAME, MODEL_CARD_NAME],
            )
        except Exception as err:
            raise HubError(f"uploading to the Hub repo {repo_id!r} failed: {error_line(err)}") from err
    pr_url = getattr(commit, "pr_url", None)
    if create_pr and isinstance(pr_url, str) and pr_url:
        return pr_url
    commit_url = getattr(commit, "commit_url", None)
    return commit_url if isinstance(commit_url, str) else str(commit)
