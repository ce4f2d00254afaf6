"""The quotas a request is refused for at once (issue 12), where they concern the compute layer:
GPUs asked for at once and running deployments. (GPU-hours per week and GPUs held now are not
refusals: the dispatcher keeps such a run waiting and says why, see :mod:`gpus.scheduler`.)

A refusal is :class:`core.errors.QuotaExceeded` (the API's 403 naming the quota, its limit and the
current usage). The limits come from :func:`accounts.services.quota_limits`.
"""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.utils.translation import gettext as _

from accounts.services import Limits, quota_limits
from core.errors import QuotaExceeded
from gpus.placement import HostState, Request
from gpus.usage import active_deployments_by_owner


def owner_lock(owner: AbstractBaseUser) -> None:
    """Serialise one user's admissions for the rest of the transaction (a row lock on the user on
    PostgreSQL; SQLite serialises writers anyway), so two requests at once cannot both pass a count."""
    get_user_model().objects.select_for_update().filter(pk=owner.pk).exists()


def check_gpu_request(*, owner: AbstractBaseUser, request: Request, hosts: list[HostState],
                      limits: Limits | None = None) -> None:
    """Refuse a request for more GPUs at once than the owner's ``max_gpus``: it could never start."""
    limit = (limits or quota_limits(user=owner)).max_gpus
    wanted = request.gpu_count(hosts)
    if limit is not None and wanted > limit:
        raise QuotaExceeded(
            quota="max_gpus", limit=limit, used=wanted,
            detail=_("This asks for %(wanted)s GPUs at once; your quota allows %(limit)s (max_gpus).")
            % {"wanted": wanted, "limit": limit},
        )


def check_deployment_admission(*, owner: AbstractBaseUser, limits: Limits | None = None) -> None:
    """Refuse one more deployment when the owner already has ``max_deployments`` waiting, starting
    or serving. Call inside the transaction that creates it, after :func:`owner_lock`."""
    limit = (limits or quota_limits(user=owner)).max_deployments
    if limit is None:
        return
    running = active_deployments_by_owner(owner_ids=[owner.pk]).get(owner.pk, 0)
    if running >= limit:
        raise QuotaExceeded(
            quota="max_deployments", limit=limit, used=running,
            detail=_("You have %(used)s deployments running or starting; your quota allows %(limit)s "
                     "(max_deployments). Stop one first.") % {"used": running, "limit": limit},
        )
