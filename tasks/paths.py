"""Where files live, and the checks that keep every user-named path inside an allowed root.

* A user's workspace is ``<FINETUNE_DATA_DIR>/workspaces/<user id>/``; datasets, task logs and
  outputs are created there by the server, never at a path the user chose.
* Local base models must live under an operator-configured root (``FINETUNE_MODEL_ROOTS``). A user
  names one by absolute path or by a path relative to a root; anything that resolves (symlinks
  included) outside every root is refused.
* Built-in models (``builtin:tiny-qwen2``, :mod:`tasks.builtin_models`) are local models the platform
  builds itself on first use, in ``FINETUNE_BUILTIN_MODELS_DIR``.
* Hub ids (``Qwen/Qwen2.5-7B-Instruct``, ``AI-ModelScope/alpaca-gpt4-data-zh#500``) pass through
  to swift after a strict syntax check (no URLs, no paths) and the trust policy below.

**Code from the hub** (docs/security.md, C1). swift loads every hub model and dataset with
``trust_remote_code=True``: a repository's Python runs on the worker. A hub id is therefore accepted
only when its repository (``owner/name``; a dataset's ``:subset`` and ``#count`` do not count) matches
one of the operator's globs, ``FINETUNE_HUB_MODELS`` / ``FINETUNE_HUB_DATASETS`` (case-sensitive,
``*`` trusts every id), or when the user is trusted (:func:`accounts.services.account_hub_trusted`).
:func:`check_hub_model` and :func:`check_hub_dataset` are the one place this rule lives; the task and
deployment services and the launch of every task call them.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from tasks.builtin_models import BuiltinModelError, builtin_model_path, is_builtin_model_id


class PathError(ValueError):
    """A path or id the platform refuses; the message is for the user."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")
# dataset ids may carry a subset (``:name``) and a sample count (``#N``), as swift accepts.
_HUB_DATASET = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95})"
    r"(?::(?P<subset>[A-Za-z0-9][A-Za-z0-9_.\-/]{0,95}))?(?:#(?P<count>[1-9][0-9]{0,9}))?$"
)


def workspace_dir(user_id: int) -> Path:
    return settings.WORKSPACES_DIR / str(int(user_id))


def task_dir(user_id: int, task_id: int) -> Path:
    return workspace_dir(user_id) / "tasks" / str(int(task_id))


def datasets_dir(user_id: int) -> Path:
    return workspace_dir(user_id) / "datasets"


def is_within(path: Path, root: Path) -> bool:
    """True when ``path`` (resolved, symlinks followed) lies inside ``root`` (resolved)."""
    try:
        return path.resolve(strict=False).is_relative_to(root.resolve(strict=False))
    except (OSError, RuntimeError):
        return False


def folder_size(folder: Path) -> int:
    """Bytes under ``folder`` (links not followed; files that vanish meanwhile are skipped)."""
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += (Path(dirpath) / name).lstat().st_size
            except OSError:
                continue
    return total


def _refuse_odd_characters(value: str, what: str) -> None:
    if any(ord(ch) < 32 or ch == "\x7f" for ch in value):
        raise PathError(f"{what} contains control characters")
    if value.startswith("-"):
        raise PathError(f"{what} must not start with '-'")


def is_hub_id(value: str) -> bool:
    return bool(_HUB_ID.match(value)) and ".." not in value


def is_hub_dataset_id(value: str) -> bool:
    match = _HUB_DATASET.match(value)
    return bool(match) and ".." not in value


def hub_repo(value: str) -> str:
    """The repository of a hub model or dataset id: ``owner/name`` without ``:subset`` or ``#count``."""
    match = _HUB_DATASET.match(value.strip())
    return match.group("repo") if match else value.strip()


def _allowed(repo: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(repo, pattern) for pattern in patterns)


def hub_model_allowed(repo: str, *, trusted: bool) -> bool:
    """Whether a hub model may be used: a trusted user may use any, others those matching
    ``FINETUNE_HUB_MODELS``."""
    return trusted or _allowed(hub_repo(repo), settings.FINETUNE_HUB_MODELS)


def hub_dataset_allowed(repo: str, *, trusted: bool) -> bool:
    """Whether a hub dataset may be used: a trusted user may use any, others those matching
    ``FINETUNE_HUB_DATASETS``."""
    return trusted or _allowed(hub_repo(repo), settings.FINETUNE_HUB_DATASETS)


def _patterns_shown(patterns: list[str], *, limit: int = 8) -> str:
    if not patterns:
        return "none: it is empty"
    shown = ", ".join(patterns[:limit])
    return shown + (", …" if len(patterns) > limit else "")


def _refusal(kind: str, repo: str, setting: str, patterns: list[str]) -> str:
    return (f"Hub {kind} {repo!r} is not allowed on this platform: an operator allows hub {kind}s matching "
            f"{setting} ({_patterns_shown(patterns)}), or marks your account trusted.")


def check_hub_model(value: str, *, trusted: bool) -> None:
    """Raise :class:`PathError` (the message names ``FINETUNE_HUB_MODELS``) unless the hub model
    ``value`` may be used."""
    if not hub_model_allowed(value, trusted=trusted):
        raise PathError(_refusal("model", hub_repo(value), "FINETUNE_HUB_MODELS", settings.FINETUNE_HUB_MODELS))


def check_hub_dataset(value: str, *, trusted: bool) -> None:
    """Raise :class:`PathError` (the message names ``FINETUNE_HUB_DATASETS``) unless the hub dataset
    ``value`` may be used."""
    if not hub_dataset_allowed(value, trusted=trusted):
        raise PathError(_refusal("dataset", hub_repo(value), "FINETUNE_HUB_DATASETS",
                                 settings.FINETUNE_HUB_DATASETS))


@dataclass(frozen=True)
class ResolvedModel:
    source: str  # "hub" | "local"
    argument: str  # what --model receives (absolute path for local models)


def resolve_model(value: str, roots: list[Path] | None = None) -> ResolvedModel:
    """Resolve a base model name to a hub id, a built-in model or a folder inside a model root."""
    value = (value or "").strip()
    if not value:
        raise PathError("name a base model: a hub id such as Qwen/Qwen2.5-7B-Instruct or a local model folder")
    _refuse_odd_characters(value, "the model name")
    if is_builtin_model_id(value):
        # Its folder may not exist yet: the worker builds it at launch (tasks.command.build_argv).
        try:
            return ResolvedModel(source="local", argument=str(builtin_model_path(value)))
        except BuiltinModelError as exc:
            raise PathError(str(exc)) from None
    roots = settings.FINETUNE_MODEL_ROOTS if roots is None else roots
    parts = Path(value).parts
    if ".." in parts:
        raise PathError("the model path must not contain '..'")
    if len(value) > 1000 or any(len(part) > 255 for part in parts):
        raise PathError("the model name is too long")
    candidate_paths: list[tuple[Path, Path]] = []
    if Path(value).is_absolute():
        # Only the roots the path names lexically; a symlink inside one that resolves elsewhere
        # is caught below.
        candidate_paths = [(Path(value), root) for root in roots
                           if Path(value).is_relative_to(root) or is_within(Path(value), root)]
    else:
        candidate_paths = [(root / value, root) for root in roots]
    for path, root in candidate_paths:
        try:
            exists = path.exists()
        except OSError:
            exists = False
        if not exists:
            continue
        if not is_within(path, root):
            # Exists under a root by name but resolves elsewhere: a symlink escaping the root.
            raise PathError(f"the model folder {value!r} resolves outside the allowed model roots")
        resolved = path.resolve()
        if not resolved.is_dir():
            raise PathError(f"{value!r} is not a model folder")
        return ResolvedModel(source="local", argument=str(resolved))
    if Path(value).is_absolute() or value.startswith("."):
        allowed = ", ".join(str(r) for r in roots) or "none configured (set FINETUNE_MODEL_ROOTS)"
        raise PathError(f"{value!r} is not a folder inside an allowed model root ({allowed})")
    if is_hub_id(value):
        return ResolvedModel(source="hub", argument=value)
    raise PathError(
        f"{value!r} is neither a hub id (owner/name) nor a model folder inside an allowed model root"
    )


def local_model_choices(roots: list[Path] | None = None, *, limit: int = 200) -> list[str]:
    """Model folders under the roots (a folder with a ``config.json``), for forms and docs."""
    roots = settings.FINETUNE_MODEL_ROOTS if roots is None else roots
    found: list[str] = []
    for root in roots:
        if not root.is_dir():
            continue
        for config in sorted(root.glob("*/config.json")) + sorted(root.glob("*/*/config.json")):
            if is_within(config.parent, root):
                found.append(str(config.parent))
            if len(found) >= limit:
                return found
    return found
