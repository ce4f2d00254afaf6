"""The quotas a task or a dataset is refused for at once (issue 12): tasks waiting to start, GPUs
asked for at once, storage. A refusal is :class:`core.errors.QuotaExceeded`: the API's 403 with
the quota's name, its limit and the current usage; a page shows the sentence.

GPU-hours per week and GPUs held now do not refuse anything: the dispatcher keeps the task waiting
and its page says why (:mod:`gpus.scheduler`).
"""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser
from django.utils.translation import gettext as _

from accounts.services import Limits, quota_limits
from core.errors import QuotaExceeded
from gpus.placement import HostState, Request
from gpus.quotas import check_gpu_request, owner_lock
from tasks import selectors
from tasks.models import FinetuningTask, TaskStatus

#: A task in one of these has not started yet: it counts against ``max_waiting_tasks``.
WAITING_STATUSES = (TaskStatus.PENDING, TaskStatus.QUEUED)


def _gb(size: int) -> float:
    return round(size / 10**9, 3)


def check_storage(*, owner: AbstractBaseUser, adding: int = 0, limits: Limits | None = None) -> None:
    """Refuse when the owner's storage (datasets and task outputs) is at its quota already, or would
    pass it with ``adding`` more bytes."""
    limit = (limits or quota_limits(user=owner)).max_storage_bytes
    if limit is None:
        return
    used = selectors.storage_by_owner(owner_ids=[owner.pk]).get(owner.pk, 0)
    if used + adding > limit or (not adding and used >= limit):
        raise QuotaExceeded(
            quota="max_storage_gb", limit=_gb(limit), used=_gb(used),
            detail=_("Your datasets and task outputs use %(used)s GB of your %(limit)s GB storage quota "
                     "(max_storage_gb)%(adding)s. Delete outputs of old tasks (on their pages) or datasets "
                     "to make room.")
            % {"used": _gb(used), "limit": _gb(limit),
               "adding": _("; this upload adds %(size)s GB") % {"size": _gb(adding)} if adding else ""},
        )


def check_task_admission(*, owner: AbstractBaseUser, request: Request, hosts: list[HostState]) -> None:
    """Whether one more task of ``owner`` may join the queue: its GPUs fit ``max_gpus``, the owner has
    fewer than ``max_waiting_tasks`` waiting, and storage is not full. Call inside the transaction
    that creates (or resumes) it: the owner's admissions are serialised from here to its commit."""
    owner_lock(owner)
    limits = quota_limits(user=owner)
    check_gpu_request(owner=owner, request=request, hosts=hosts, limits=limits)
    if limits.max_waiting_tasks is not None:
        waiting = FinetuningTask.objects.filter(
            owner_id=owner.pk, status__in=WAITING_STATUSES, delete_requested_at__isnull=True
        ).count()
        if waiting >= limits.max_waiting_tasks:
            raise QuotaExceeded(
                quota="max_waiting_tasks", limit=limits.max_waiting_tasks, used=waiting,
                detail=_("You have %(used)s tasks waiting to start; your quota allows %(limit)s "
                         "(max_waiting_tasks). Wait for some to start, or cancel some.")
                % {"used": waiting, "limit": limits.max_waiting_tasks},
            )
    check_storage(owner=owner, limits=limits)
