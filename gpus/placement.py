"""Where a task can run: pure functions over a snapshot of the inventory (no database access).

A request comes from a task's ``gpu_config`` (``{"count": N}``, ``{"devices": "0,1"}``,
``{"cpu": true}``, optional ``min_memory_gb``; ``{}`` means one GPU where the host has GPUs, else a
CPU slot) and its memory estimate. All GPUs of a task are on one host. Among the hosts that fit,
the one with the fewest free GPUs wins (best fit: keeps large blocks of GPUs free for large tasks).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class GpuSlot:
    id: int
    host: str
    index: int
    uuid: str
    memory_total_mb: int
    name: str = ""  # the GPU model ("NVIDIA H100 80GB HBM3"): what usage is counted by


@dataclass
class HostState:
    name: str
    gpus: list[GpuSlot] = field(default_factory=list)  # every enabled, present GPU
    free_gpu_ids: set[int] = field(default_factory=set)
    cpu_slots: int = 0
    free_cpu_slots: list[int] = field(default_factory=list)
    id: int = 0  # the Host row, so a dispatcher books without looking it up again


@dataclass(frozen=True)
class Request:
    kind: str  # "gpu" | "cpu" | "auto"
    count: int = 1
    devices: tuple[str, ...] = ()
    min_memory_mb: int = 0

    @classmethod
    def from_task(cls, gpu_config: dict, memory_estimate_gb: float | None) -> Request:
        explicit = gpu_config.get("min_memory_gb")
        memory_gb = explicit if explicit is not None else (memory_estimate_gb or 0)
        min_mb = int(float(memory_gb) * 1024)
        if gpu_config.get("cpu"):
            return cls(kind="cpu")
        if gpu_config.get("devices"):
            devices = tuple(str(gpu_config["devices"]).split(","))
            return cls(kind="gpu", count=len(devices), devices=devices, min_memory_mb=min_mb)
        if gpu_config.get("count"):
            return cls(kind="gpu", count=int(gpu_config["count"]), min_memory_mb=min_mb)
        return cls(kind="auto", min_memory_mb=min_mb)

    def resolved(self, hosts: list[HostState] | list[TimedHost]) -> Request:
        """``auto`` made concrete: one GPU when any host has GPUs, else a CPU slot."""
        if self.kind != "auto":
            return self
        if any(h.gpus for h in hosts):
            return replace(self, kind="gpu", count=1)
        return replace(self, kind="cpu")

    def gpu_count(self, hosts: list[HostState] | list[TimedHost]) -> int:
        """How many GPUs the request holds once placed on ``hosts`` (0 for a CPU slot)."""
        resolved = self.resolved(hosts)
        return resolved.count if resolved.kind == "gpu" else 0


@dataclass(frozen=True)
class Placement:
    host: str
    gpu_ids: tuple[int, ...] = ()
    cpu_slot: int | None = None


def _named(pool: list[GpuSlot], devices: tuple[str, ...]) -> list[GpuSlot] | None:
    """The GPUs a request names (by index or UUID), in its order; None if one is not in ``pool``."""
    chosen = []
    for device in devices:
        found = [g for g in pool if str(g.index) == device or g.uuid == device]
        if not found:
            return None
        chosen.append(found[0])
    return chosen


def _matching(host: HostState, request: Request, *, free_only: bool) -> list[GpuSlot] | None:
    pool = [g for g in host.gpus if (not free_only or g.id in host.free_gpu_ids)]
    pool = [g for g in pool if g.memory_total_mb >= request.min_memory_mb]
    if request.devices:
        return _named(pool, request.devices)
    count = request.count if request.kind == "gpu" else 1
    if len(pool) < count:
        return None
    # Prefer the smallest cards that fit, so big cards stay free for big tasks.
    return sorted(pool, key=lambda g: (g.memory_total_mb, g.index))[:count]


def place(request: Request, hosts: list[HostState]) -> Placement | None:
    """A placement on free resources now, or None."""
    request = request.resolved(hosts)
    candidates: list[tuple[int, str, Placement]] = []
    for host in hosts:
        if request.kind == "gpu":
            chosen = _matching(host, request, free_only=True)
            if chosen is not None:
                candidates.append(
                    (len(host.free_gpu_ids), host.name, Placement(host=host.name, gpu_ids=tuple(g.id for g in chosen)))
                )
        elif host.free_cpu_slots:
            candidates.append(
                (len(host.free_cpu_slots), host.name, Placement(host=host.name, cpu_slot=min(host.free_cpu_slots)))
            )
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


def take(placement: Placement, hosts: list[HostState]) -> None:
    """Mark a placement's resources as used in the snapshot."""
    for host in hosts:
        if host.name == placement.host:
            host.free_gpu_ids -= set(placement.gpu_ids)
            if placement.cpu_slot is not None:
                host.free_cpu_slots.remove(placement.cpu_slot)


def impossible_reason(request: Request, hosts: list[HostState]) -> str | None:
    """Why a request can never be placed on the known inventory, or None if it could be.

    With no known host at all nothing is decided (a worker may not have announced itself yet).
    """
    if not hosts:
        return None
    if request.kind == "cpu":
        if not any(h.cpu_slots for h in hosts):
            return 'no host offers CPU slots; ask for GPUs instead (e.g. {"count": 1})'
        return None
    gpu_hosts = [h for h in hosts if h.gpus]
    if request.kind == "auto" and not gpu_hosts:
        return None if any(h.cpu_slots for h in hosts) else "no host offers GPUs or CPU slots"
    if not gpu_hosts:
        return 'no host has GPUs; ask for a CPU slot with {"cpu": true}'
    if any(_matching(h, request, free_only=False) is not None for h in gpu_hosts):
        return None
    most = max(len(h.gpus) for h in gpu_hosts)
    biggest = max(g.memory_total_mb for h in gpu_hosts for g in h.gpus)
    if request.devices:
        known = sorted({str(g.index) for h in gpu_hosts for g in h.gpus}, key=lambda x: int(x))
        if request.min_memory_mb > biggest:
            return (
                f"needs {request.min_memory_mb / 1024:.0f} GiB per GPU but the largest GPU has {biggest / 1024:.0f} GiB"
            )
        return f"devices {','.join(request.devices)} do not exist on any single host (known devices: {','.join(known)})"
    if request.count > most:
        return f"asks for {request.count} GPUs but the largest host has {most}"
    if request.min_memory_mb > biggest:
        return (
            f"needs {request.min_memory_mb / 1024:.0f} GiB per GPU but the largest GPU has "
            f"{biggest / 1024:.0f} GiB; use QLoRA, more GPUs with DeepSpeed, or set gpu_config.min_memory_gb"
        )
    return f"no host has {request.count} GPUs with {request.min_memory_mb / 1024:.0f} GiB each"


# --- estimated start times (the queue page) --------------------------------------------------
UNKNOWN = float("inf")


@dataclass
class TimedHost:
    """A host whose every GPU and CPU slot carries the number of seconds until it is free
    (0 = free now, ``UNKNOWN`` = held by work without an ETA)."""

    name: str
    gpus: list[GpuSlot] = field(default_factory=list)
    gpu_free_in: dict[int, float] = field(default_factory=dict)
    slot_free_in: dict[int, float] = field(default_factory=dict)


def earliest_start(request: Request, hosts: list[TimedHost]) -> tuple[float, Placement] | None:
    """The soonest this request could start (seconds from now) and where; None if it never fits.

    The caller marks the returned resources ``UNKNOWN`` afterwards: a waiting task's own run time
    is unknown, so what it takes stays taken for the tasks behind it.
    """
    request = request.resolved(hosts)
    best: tuple[float, str, Placement] | None = None
    for host in hosts:
        candidate: tuple[float, Placement] | None = None
        if request.kind == "gpu":
            pool = [g for g in host.gpus if g.memory_total_mb >= request.min_memory_mb]
            if request.devices:
                named = _named(pool, request.devices)
                if named is None:
                    continue
                chosen = named
            else:
                if len(pool) < request.count:
                    continue
                chosen = sorted(pool, key=lambda g: (host.gpu_free_in[g.id], g.memory_total_mb, g.index))[
                    : request.count]
            start = max(host.gpu_free_in[g.id] for g in chosen)
            candidate = (start, Placement(host=host.name, gpu_ids=tuple(g.id for g in chosen)))
        elif host.slot_free_in:
            slot = min(host.slot_free_in, key=lambda s: (host.slot_free_in[s], s))
            candidate = (host.slot_free_in[slot], Placement(host=host.name, cpu_slot=slot))
        if candidate is not None and (best is None or (candidate[0], host.name) < (best[0], best[1])):
            best = (candidate[0], host.name, candidate[1])
    return None if best is None else (best[0], best[2])


def occupy(placement: Placement, hosts: list[TimedHost], until: float = UNKNOWN) -> None:
    for host in hosts:
        if host.name == placement.host:
            for gpu_id in placement.gpu_ids:
                host.gpu_free_in[gpu_id] = until
            if placement.cpu_slot is not None:
                host.slot_free_in[placement.cpu_slot] = until
