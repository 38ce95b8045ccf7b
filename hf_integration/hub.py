"""Hugging Face Hub I/O of outer parameters: upload, request timeouts, deadlines, credential and reachability checks.

* **Hub calls end**: a metadata request gets ``huggingface_hub``'s own per-call ``timeout``, and every call runs
  under a deadline (:func:`hub_call`); ``huggingface_hub``'s shared HTTP client is left as the user configured it.
  Hub failures become one-line :class:`HubError` messages; :func:`check_hub_repo` checks credentials and
  reachability before a long job, as ``Trainer`` does by creating the repo at start.
* **Hub calls have a deadline** (:func:`hub_call`): a per-request timeout does not bound a call that retries
  (``hf_hub_download`` retries its metadata request five times with a hard-coded 60 s timeout, minutes in
  all) nor a server that sends a byte now and then, so whole calls run under a wall-clock deadline.
  :func:`check_hub_reachable` lets a script find out in seconds, before loading a Hub id, that the Hub does
  not answer.
* :func:`push_folder_to_hub` uploads a folder written by ``OuterModule.save_pretrained`` in one commit.

The other persistence concepts live in their own modules: :mod:`hf_integration.serialization` (safetensors
save/load/check of outer files), :mod:`hf_integration.atomic_files` (atomic writes), :mod:`hf_integration.model_card` (cards),
:mod:`hf_integration.optimizer_state` (optimizer state without pickle), :mod:`hf_integration.checkpoints`
(complete checkpoints).
"""

from __future__ import annotations

import contextvars
import math
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from huggingface_hub import HfApi, constants, get_token

__all__ = ["HubError", "error_line", "hub_call", "hub_deadline", "upload_deadline", "check_hub_reachable",
           "check_hub_repo",
           "push_folder_to_hub"]

T = TypeVar("T")


class HubError(RuntimeError):
    """A Hub request failed (unreachable, timed out, no credentials, no permission); the message is one line."""


def error_line(err: BaseException) -> str:
    """``Type: first line of the message`` of ``err`` (Hub, HTTP and torch errors carry multi-line details)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _default_deadline() -> float:
    """``HF_HUB_ETAG_TIMEOUT + HF_HUB_DOWNLOAD_TIMEOUT``, read from ``huggingface_hub.constants`` now."""
    return float(constants.HF_HUB_ETAG_TIMEOUT) + float(constants.HF_HUB_DOWNLOAD_TIMEOUT)


def hub_deadline(timeout: float | None, argument: str = "timeout") -> float:
    """``timeout`` checked (a finite number of seconds > 0), or the default deadline when it is ``None``."""
    if timeout is None:
        seconds = _default_deadline()
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"the default Hub deadline HF_HUB_ETAG_TIMEOUT + HF_HUB_DOWNLOAD_TIMEOUT is "
                             f"{seconds:g} s; set both to positive numbers of seconds")
        return seconds
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"{argument} must be a finite number of seconds > 0 (or None for the default "
                         f"HF_HUB_ETAG_TIMEOUT + HF_HUB_DOWNLOAD_TIMEOUT), got {timeout!r}")
    return float(timeout)


def hub_call(fn: Callable[[], T], *, what: str, timeout: float | None = None, argument: str = "timeout") -> T:
    """Run ``fn()`` (a Hub request, a download) under a wall-clock deadline of ``timeout`` seconds.

    ``huggingface_hub``'s own timeouts bound each read of a request, not the call: ``hf_hub_download`` retries
    its metadata request five times with a hard-coded 60 s timeout when no local copy exists (minutes even with
    ``HF_HUB_ETAG_TIMEOUT=3``), and a server that sends one byte now and then never trips a read timeout. So
    ``fn`` runs in a worker thread and the caller waits at most ``timeout`` seconds for it.

    On expiry the worker is abandoned, not stopped (Python cannot interrupt a thread blocked in a socket): it is
    a daemon thread, so it cannot keep the process from exiting, and whatever it still returns is dropped. A
    call that writes (an upload) may therefore still complete after the deadline has been reported.

    Args:
        fn: The call, without arguments (wrap it in a ``lambda``).
        what: What ``fn`` does, as the start of the error message, e.g. ``"downloading 'x' from the Hub
            repo 'org/name'"``.
        timeout: The deadline in seconds (finite, > 0). ``None``: ``HF_HUB_ETAG_TIMEOUT +
            HF_HUB_DOWNLOAD_TIMEOUT`` (10 + 10 s unless set), read from ``huggingface_hub.constants`` at each
            call, so that a user who set those variables gets a proportionate deadline.
        argument: The name under which the caller's own users pass ``timeout`` (e.g. ``"hub_timeout"``),
            used in the error messages.

    Returns:
        What ``fn()`` returns.

    Raises:
        HubError: ``fn`` did not finish in time; one line naming ``what``, the seconds and the fix.
        ValueError: ``timeout`` is not a finite number of seconds > 0.
        Exception: whatever ``fn`` raised, unchanged (the same object).
    """
    seconds = hub_deadline(timeout, argument)
    outcome: dict[str, Any] = {}
    finished = threading.Event()
    context = contextvars.copy_context()  # the worker sees the caller's context variables

    def run() -> None:
        try:
            outcome["value"] = context.run(fn)
        except BaseException as err:  # noqa: BLE001 - handed to the caller, who re-raises it
            outcome["error"] = err
        finally:
            finished.set()

    threading.Thread(target=run, name=f"hub_call: {what}"[:100], daemon=True).start()
    if not finished.wait(seconds):
        if timeout is None:
            fix = "raise HF_HUB_DOWNLOAD_TIMEOUT (the deadline is HF_HUB_ETAG_TIMEOUT + HF_HUB_DOWNLOAD_TIMEOUT)"
        else:
            fix = f"pass a larger {argument}"
        raise HubError(f"{what} did not finish within {seconds:g} s: the Hub does not answer or is too slow; check "
                       f"the connection, {fix}, or use a local folder (or HF_HUB_OFFLINE=1 to load from the cache)")
    if "error" in outcome:
        error = outcome.pop("error")
        try:
            raise error
        finally:
            del error  # no reference cycle through this frame
    return outcome["value"]


def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


_REQUEST_TIMEOUT_MARGIN_S = 10.0


def check_hub_reachable(
    repo_id: str,
    *,
    repo_type: str = "model",
    revision: str | None = None,
    token: str | bool | None = None,
    timeout: float | None = None,
    what: str | None = None,
) -> None:
    """Fail in seconds, not minutes, when the Hub does not answer: call it before loading a Hub id.

    Makes one small metadata request (``HfApi().repo_info``) under :func:`hub_call`'s deadline, so that a script
    about to run ``from_pretrained`` / ``load_dataset`` on a Hub id stops with one line when the Hub (or
    ``HF_ENDPOINT``) hangs, instead of sitting in ``huggingface_hub``'s retries. Returns at once, without a
    request, in offline mode (``HF_HUB_OFFLINE``, and for ``repo_type="dataset"`` also ``HF_DATASETS_OFFLINE``:
    the loads then come from the cache) and when ``repo_id`` is an existing local path.

    Args:
        repo_id: The Hub id (``name`` or ``org/name``).
        repo_type: ``"model"``, ``"dataset"`` or ``"space"``.
        revision: Branch, tag or commit that must exist.
        token: Hub token (``None``: the saved one, for private or gated repos).
        timeout: Deadline in seconds; ``None``: ``HF_HUB_ETAG_TIMEOUT + HF_HUB_DOWNLOAD_TIMEOUT`` (see
            :func:`hub_call`). The request gets a timeout of its own, 10 s longer, so that the deadline is what
            fires and the abandoned request still ends by itself.
        what: How the error message names the repo (default ``"the Hub <repo_type> repo '<repo_id>'"``), e.g.
            ``"the model 'org/name' (--model_name_or_path)"``.

    Raises:
        HubError: the request timed out or failed (unreachable, no such repo or revision, no access); one line.
        ValueError: ``timeout`` is not a finite number of seconds > 0.
    """
    seconds = hub_deadline(timeout)
    if constants.HF_HUB_OFFLINE or (repo_type == "dataset" and _is_true(os.environ.get("HF_DATASETS_OFFLINE"))):
        return
    if os.path.exists(repo_id):
        return
    api = HfApi(token=token)
    what = what or f"the Hub {repo_type} repo {repo_id!r}"
    try:
        hub_call(lambda: api.repo_info(repo_id, repo_type=repo_type, revision=revision, token=token,
                                       timeout=seconds + _REQUEST_TIMEOUT_MARGIN_S),
                 what=f"reaching {what} at {api.endpoint}", timeout=timeout)
    except HubError:
        raise
    except Exception as err:
        raise HubError(f"cannot reach {what} at {api.endpoint}: {error_line(err)}") from err


# upload_folder makes a few requests in turn (pre-upload, the upload of the files, the commit), each of which may
# take a default deadline; the bytes themselves are given time at a floor bandwidth.
_UPLOAD_REQUESTS = 3
_UPLOAD_MIN_BYTES_PER_S = 100_000


def upload_deadline(num_bytes: int) -> float:
    """The deadline of an upload of ``num_bytes``: ``3 x (HF_HUB_ETAG_TIMEOUT + HF_HUB_DOWNLOAD_TIMEOUT)`` plus one
    second per 100 kB (60 s, plus 40 s for a 4 MB file, with the defaults)."""
    return _UPLOAD_REQUESTS * hub_deadline(None) + num_bytes / _UPLOAD_MIN_BYTES_PER_S


def _upload_deadline(folder: str, names: list[str]) -> float:
    """:func:`upload_deadline` of the files ``names`` of ``folder``."""
    return upload_deadline(sum(os.path.getsize(os.path.join(folder, name)) for name in names
                               if os.path.isfile(os.path.join(folder, name))))


def check_hub_repo(repo_id: str, *, token: str | bool | None = None, private: bool | None = None,
                   endpoint: str | None = None, repo_type: str | None = None) -> str:
    """Check credentials and reachability before a long job: create ``repo_id`` if needed (``exist_ok``, as
    ``Trainer`` does at start with ``push_to_hub``), with timeouts, under :func:`hub_call`'s default deadline
    (``HF_HUB_ETAG_TIMEOUT + HF_HUB_DOWNLOAD_TIMEOUT``). Returns the resolved repo id.
    ``repo_type``: ``None``/``"model"`` (outer parameters), ``"dataset"`` (e.g. a weighted training set).

    Raises:
        HubError: no token, the Hub unreachable or slow, no permission; one line, in seconds.
    """
    if token is None and get_token() is None:
        raise HubError(f"cannot push to {repo_id!r}: no Hugging Face token; log in with `hf auth login`, set "
                       "HF_TOKEN, or pass a token (--hub_token)")
    api = HfApi(token=token, endpoint=endpoint)
    kwargs = {} if repo_type in (None, "model") else {"repo_type": repo_type}
    what = "" if repo_type in (None, "model") else f"{repo_type} "
    deadline = hub_deadline(None)
    try:
        url = hub_call(lambda: api.create_repo(repo_id, token=token, private=private, exist_ok=True, **kwargs),
                       what=f"creating the Hub {what}repo {repo_id!r}", timeout=deadline)
    except HubError:  # the deadline passed (create_repo raises no HubError of its own)
        raise HubError(f"cannot create or reach the Hub {what}repo {repo_id!r} at {api.endpoint}: no answer within "
                       f"{deadline:g} s (HF_HUB_ETAG_TIMEOUT + HF_HUB_DOWNLOAD_TIMEOUT); check the connection or "
                       "raise HF_HUB_DOWNLOAD_TIMEOUT") from None
    except Exception as err:
        raise HubError(f"cannot create or reach the Hub {what}repo {repo_id!r} at {api.endpoint}: "
                       f"{error_line(err)}") from err
    resolved = getattr(url, "repo_id", None)
    return resolved if isinstance(resolved, str) and resolved else repo_id


def push_folder_to_hub(
    save_fn: Callable[[str, str], None],
    repo_id: str,
    *,
    files: Sequence[str],
    commit_message: str = "Upload outer parameters",
    private: bool | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
) -> str:
    """Create ``repo_id`` if needed, let ``save_fn(tmp_dir, repo_id)`` fill a temporary folder, upload its ``files``.

    Each call has a deadline (:func:`hub_call`): the repo creation ``HF_HUB_ETAG_TIMEOUT + HF_HUB_DOWNLOAD_TIMEOUT``, the upload three times that (it makes a few
    requests in turn) plus one second per 100 kB uploaded (outer parameters are small: 60 s, plus 40 s for a
    4 MB file, with the defaults; raise ``HF_HUB_DOWNLOAD_TIMEOUT`` on a slow link). A Hub failure raises
    :class:`HubError`. An upload abandoned at its deadline may still complete in the background.
    Returns the commit URL (the pull-request URL when ``create_pr=True``).
    """
    repo_id = check_hub_repo(repo_id, token=token, private=private)
    with tempfile.TemporaryDirectory() as tmp:
        save_fn(tmp, repo_id)
        names = list(files)
        deadline = _upload_deadline(tmp, names)
        try:
            commit = hub_call(lambda: HfApi(token=token).upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                commit_message=commit_message,
                token=token,
                create_pr=create_pr,
                allow_patterns=names,
            ), what=f"uploading to the Hub repo {repo_id!r}", timeout=deadline)
        except HubError:  # the deadline passed (upload_folder raises no HubError of its own)
            raise HubError(f"uploading to the Hub repo {repo_id!r} did not finish within {deadline:g} s "
                           "(3 x (HF_HUB_ETAG_TIMEOUT + HF_HUB_DOWNLOAD_TIMEOUT) + 1 s per 100 kB): the Hub does not "
                           "answer or is too slow; check the connection or raise HF_HUB_DOWNLOAD_TIMEOUT (the upload "
                           "may still complete in the background)") from None
        except Exception as err:
            raise HubError(f"uploading to the Hub repo {repo_id!r} failed: {error_line(err)}") from err
    pr_url = getattr(commit, "pr_url", None)
    if create_pr and isinstance(pr_url, str) and pr_url:
        return pr_url
    commit_url = getattr(commit, "commit_url", None)
    return commit_url if isinstance(commit_url, str) else str(commit)
