"""Names of models, datasets and files as they may appear in metadata and cards that can reach the Hub.

A machine path (user names, home folders) must never reach a pushed file: :func:`public_name` reduces a local path to
its last component, :func:`hub_model_id` gives a model's Hub id (or ``None``), :func:`looks_like_local_path` and
:func:`is_hub_id` tell the two apart.
"""

from __future__ import annotations

import os
import re

from .embedded_models import EMBEDDED_MODEL_HUB_IDS

__all__ = ["is_hub_id", "hub_model_id", "public_name", "looks_like_local_path"]


_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is a Hub repo id (``name`` or ``org/name``) and not an existing local path."""
    return bool(name) and bool(_REPO_ID_RE.match(name)) and not os.path.exists(name)


def hub_model_id(name_or_path: str | os.PathLike | None) -> str | None:
    """The Hub id of a model given as a Hub id or a local folder, or ``None`` when none is known.

    A Hub id (``name`` or ``org/name``, not an existing local path) is returned as is; a snapshot folder of the
    Hub cache (``.../models--<org>--<name>/snapshots/<revision>``, what ``from_pretrained`` and
    ``snapshot_download`` load) gives the id it caches; a local folder of a model embedded in a Python package
    (:data:`~hf_integration.embedded_models.EMBEDDED_MODEL_HUB_IDS`) gives that model's Hub id; any other local path
    gives ``None``: a machine path must never reach the Hub metadata.
    """
    if not name_or_path:
        return None
    name = os.fspath(name_or_path)
    if is_hub_id(name):
        return name
    parts = re.split(r"[\\/]", os.path.normpath(name))
    for part in parts:  # a snapshot in the Hub cache: .../models--<org>--<name>/snapshots/<revision>
        cached = re.fullmatch(r"models--([A-Za-z0-9][\w.\-]*?)(?:--([A-Za-z0-9][\w.\-]*))?", part)
        if cached:
            return "/".join(p for p in cached.groups() if p)
    lowered = {part.lower() for part in parts}
    for package, hub_id in EMBEDDED_MODEL_HUB_IDS.items():
        if package in lowered:
            return hub_id
    return None


def public_name(value: str) -> str:
    """``value`` as it may appear in saved metadata and cards: a local path (:func:`looks_like_local_path`: absolute,
    ``~``, ``./``, deeper than ``org/name``) becomes its last component, so that no machine path (user names, home
    folders) reaches a file that may be pushed to the Hub; anything else (a Hub id, a split, a number) is kept."""
    if looks_like_local_path(value):
        stripped = value.rstrip("/\\")
        return re.split(r"[\\/]", stripped)[-1] or stripped
    return value


_LOCAL_PATH_HINT = re.compile(r"^(\.{1,2}[\\/]|[\\/]|~)")


def looks_like_local_path(path: str) -> bool:
    """Whether ``path`` can only be a local path, not a Hub repo id (``name`` or ``org/name``)."""
    return bool(_LOCAL_PATH_HINT.match(path)) or path.count("/") > 1 or "\\" in path
