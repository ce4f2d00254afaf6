"""A task's outputs on disk (issue 12, storage hygiene): how much its folder uses, what deleting its
outputs removes, and who may veto that.

* **Measured**: everything under the task's folder ``workspaces/<owner>/tasks/<id>/`` (checkpoints,
  merged exports, logs, caches), links not followed; ``tasks.storage.task_storage_measure`` stores it.
* **Deleted** (``tasks.storage.task_outputs_delete``): the checkpoint folders of every run
  (``output/checkpoint-N``, ``output/v<N>-…/checkpoint-N``), the merged exports next to them
  (``checkpoint-N-merged``), links named like them, and the scratch ``cache/``. The log, swift's
  ``logging.jsonl`` and ``args.json``, the export logs and every database record stay. Only paths
  inside the task's folder are touched: a link is removed, never followed.
* **Guards**: apps above ``tasks`` veto a delete through :func:`register_output_guard` (a
  deployment serving one of the task's checkpoints registers one in ``deployments.apps``): the
  tasks app never imports them.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings

from tasks.paths import folder_size, is_within, task_dir

if TYPE_CHECKING:
    from tasks.models import FinetuningTask

# No model is imported at run time: ``deployments.apps`` imports this module to register its guard
# while the app registry is still being populated.

logger = logging.getLogger(__name__)

#: What a guard says: why the task's outputs may not be deleted now (for its owner), or ``None``.
OutputGuard = Callable[["FinetuningTask"], str | None]

_GUARDS: list[OutputGuard] = []

#: Children of the output folder (and of each resumed run's folder) that a delete removes.
_DELETABLE = re.compile(r"checkpoint-\d+(-merged)?|last-checkpoint|best-checkpoint")


def register_output_guard(guard: OutputGuard) -> OutputGuard:
    """Register a veto on deleting a task's outputs (from an ``AppConfig.ready()``; usable as a
    decorator). Registering the same function twice keeps one."""
    if guard not in _GUARDS:
        _GUARDS.append(guard)
    return guard


def output_guard_refusals(task: FinetuningTask) -> list[str]:
    """What every registered guard says against deleting the task's outputs now (empty: nothing)."""
    return [text for guard in list(_GUARDS) if (text := guard(task))]


def task_folder(task: FinetuningTask) -> Path:
    return task_dir(task.owner_id, task.pk)


def _real_task_folder(task: FinetuningTask) -> Path | None:
    """The task's folder, or None when it does not exist, is a link or lies outside the workspaces
    (nothing is followed out of them)."""
    folder = task_folder(task)
    if folder.is_symlink() or not folder.is_dir() or not is_within(folder, settings.WORKSPACES_DIR):
        return None
    return folder


def task_folder_bytes(task: FinetuningTask) -> int:
    """Bytes under the task's folder; 0 without a real one (:func:`_real_task_folder`)."""
    folder = _real_task_folder(task)
    return 0 if folder is None else folder_size(folder)


def deletable_outputs(task: FinetuningTask) -> list[Path]:
    """The paths a delete of the task's outputs removes (see the module's docstring), each inside the
    task's folder."""
    folder = _real_task_folder(task)
    if folder is None:
        return []
    from tasks.selectors import run_folders  # imports the models: see the note on the imports

    found: list[Path] = []
    cache = folder / "cache"
    if cache.exists() or cache.is_symlink():
        found.append(cache)
    output = Path(task.output_path) if task.output_path else folder / "output"
    if output.parent != folder or output.is_symlink() or not output.is_dir():
        return found
    for parent in [output, *run_folders(output)]:  # run_folders leaves links out
        try:
            children = sorted(parent.iterdir())
        except OSError:
            continue
        found.extend(child for child in children if _DELETABLE.fullmatch(child.name))
    return found


def remove_output(path: Path, *, root: Path) -> bool:
    """Remove one path found by :func:`deletable_outputs`: a link or a file is unlinked (a link's
    target is never touched), a folder inside ``root`` removed with everything in it (``shutil.rmtree``
    does not follow the links inside). True when it is gone."""
    try:
        if path.is_symlink() or path.is_file():
            if is_within(path.parent, root):
                path.unlink(missing_ok=True)
        elif path.is_dir() and is_within(path, root):
            shutil.rmtree(path)
    except OSError as exc:
        logger.warning("could not remove %s: %s", path, exc)
    return not (path.exists() or path.is_symlink())


def human_bytes(size: int) -> str:
    """``1234567890`` → ``1.2 GB`` (decimal units, as the storage quota counts)."""
    value = float(max(0, size))
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} PB"  # pragma: no cover - the loop returns
