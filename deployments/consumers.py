"""The live sockets of the deployment pages, on the bases of :mod:`core.live` (docs/live.md).

* **Deployment** (``/ws/deployments/<id>/?after=<seq>&lang=xx``, a
  :class:`~core.live.sockets.StreamConsumer`): the log lines after ``after`` from the database, then live
  from the deployment's group (:func:`deployments.logs.deployment_group`), and the deployment's
  state: ``{"type": "state", "state": {...}, "html": {"status", "alerts", "facts", "command"}}`` (the
  page's parts, rendered by the same partials as the page), sent on connect and whenever it
  changes. The state is read again on a notice that carries no lines (a service announcing a
  change), with a platform line (starting, ready, stopping, failing) and after a loss.
* **List** (``/ws/deployments/?ids=1,2&lang=xx``, a :class:`~core.live.sockets.SnapshotConsumer`): the
  watched rows (``deployments/_deployment_row.html``) when they change, from notices on
  :data:`deployments.logs.DEPLOYMENTS_GROUP`.

Anonymous sockets close with 4401; another user's (or a missing) deployment with 4404, before
joining any group (and later, when a staff flag taken away leaves the deployment another user's).
"""

from __future__ import annotations

from typing import Any, ClassVar

from channels.db import database_sync_to_async
from django.template.loader import render_to_string
from django.utils import translation

from core.live.sockets import CLOSE_NOT_FOUND, SnapshotConsumer, StreamConsumer, query_language
from deployments import selectors
from deployments.logs import DEPLOYMENTS_GROUP, PLATFORM_PREFIX, deployment_group
from deployments.models import Deployment, DeploymentLogLine

#: The parts of the detail page that follow the deployment, by the partial that renders each.
PARTS = {
    "status": "deployments/_deployment_status.html",
    "alerts": "deployments/_deployment_alerts.html",
    "facts": "deployments/_deployment_facts.html",
    "command": "deployments/_deployment_command.html",
}
MAX_WATCHED = 200


def deployment_state(deployment: Deployment) -> dict[str, Any]:
    """What the detail page shows of a deployment that changes, as JSON-ready values (one small
    function: the columns may move to the deployment's run)."""
    return {
        "id": deployment.pk,
        "status": deployment.status,
        "is_active": deployment.is_active,
        "error_message": deployment.error_message,
        "stop_reason": deployment.stop_reason,
        "host": deployment.host,
        "port": deployment.port,
        "request_count": deployment.request_count,
        "prompt_tokens": deployment.prompt_tokens,
        "completion_tokens": deployment.completion_tokens,
        "ready_at": deployment.ready_at.isoformat() if deployment.ready_at else None,
        "stopped_at": deployment.stopped_at.isoformat() if deployment.stopped_at else None,
        "command_line": deployment.command_line,
        "last_log_seq": deployment.last_log_seq,
    }


def _line(line: DeploymentLogLine) -> dict[str, Any]:
    return {"seq": line.seq, "text": line.text, "time": line.created_at.isoformat()}


def _find(user: Any, pk: Any) -> Deployment | None:
    try:
        key = int(pk)
    except (TypeError, ValueError):
        return None
    return selectors.deployment_list(user=user).filter(pk=key).first()


class DeploymentConsumer(StreamConsumer):
    """A deployment's log and state, for its owner (or staff)."""

    line_message: ClassVar[dict[str, Any]] = {"type": "lines"}

    async def authorize(self) -> bool:
        deployment = await database_sync_to_async(_find)(self.user, self.scope["url_route"]["kwargs"]["deployment_id"])
        if deployment is None:
            return False
        self.deployment_id = deployment.pk
        self.language = query_language(self.query)
        self.sent_state: dict[str, Any] | None = None
        return True

    def live_groups(self) -> list[str]:
        return [deployment_group(self.deployment_id)]

    async def reauthorize(self) -> bool:
        return await database_sync_to_async(_find)(self.user, self.deployment_id) is not None

    def read_lines(self, *, after: int, limit: int) -> list[dict[str, Any]]:
        deployment = Deployment(pk=self.deployment_id)
        return [_line(line) for line in selectors.deployment_log_lines(deployment=deployment, after=after, limit=limit)]

    async def start(self) -> None:
        self.sent_seq = self.query_after() or 0
        await self.resync()

    async def resync(self) -> None:
        state = await self.send_state()
        if state is not None:
            await self.send_lines_from_db(upto=state["last_log_seq"])

    async def on_live(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        read_state = False
        for _group, message in batch:
            lines = message.get("lines") or []
            repaired = await self.take_lines(lines, message.get("last_log_seq"))
            read_state |= repaired or not lines or any(line["text"].startswith(PLATFORM_PREFIX) for line in lines)
        if read_state:
            await self.send_state()

    def _read_state(self) -> tuple[dict[str, Any], dict[str, str]] | None:
        deployment = _find(self.user, self.deployment_id)
        if deployment is None:
            return None
        with translation.override(self.language):
            html = {key: render_to_string(template, {"deployment": deployment}) for key, template in PARTS.items()}
        return deployment_state(deployment), html

    async def send_state(self) -> dict[str, Any] | None:
        """Send the state when it changed; None (and the socket closed) when the deployment is gone."""
        found = await database_sync_to_async(self._read_state)()
        if found is None:
            await self.close_with(CLOSE_NOT_FOUND, {"type": "deleted"})
            return None
        state, html = found
        if state != self.sent_state:
            self.sent_state = state
            await self.send_json({"type": "state", "state": state, "html": html})
        return state


class DeploymentListConsumer(SnapshotConsumer):
    """Live rows of the deployment list: the deployments it shows, as they change."""

    volatile: ClassVar[frozenset[str]] = frozenset()

    async def authorize(self) -> bool:
        ids: set[int] = set()
        for part in (self.query.get("ids") or [""])[0].split(",")[:MAX_WATCHED]:
            if part.strip().isdigit():
                ids.add(int(part))
        self.watched = ids
        self.language = query_language(self.query)
        return True

    def live_groups(self) -> list[str]:
        return [DEPLOYMENTS_GROUP]

    async def snapshot(self, batch: list[tuple[str, dict[str, Any]]] | None) -> list[dict[str, Any]] | None:
        ids = set(self.watched)
        if batch is not None:
            ids &= {payload.get("deployment") for _group, payload in batch}
            if not ids:
                return []
        return await database_sync_to_async(self._read)(ids)

    def _read(self, ids: set[int]) -> list[dict[str, Any]]:
        rows = list(selectors.deployment_list(user=self.user).filter(pk__in=ids)) if ids else []
        with translation.override(self.language):
            return [
                {"type": "deployments", "key": f"deployment.{d.pk}",
                 "deployments": [{**deployment_state(d), "html": render_to_string(
                     "deployments/_deployment_row.html", {"d": d})}]}
                for d in rows
            ]
