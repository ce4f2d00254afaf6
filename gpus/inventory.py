"""Reading this host's GPUs: NVML (``nvidia-ml-py``, imported as ``pynvml``) or a fake inventory.

``FINETUNE_GPU_BACKEND`` picks ``nvml`` (default), ``fake`` (``FINETUNE_FAKE_GPUS`` describes the
cards, for tests and machines without GPUs) or ``none``. A host without an NVIDIA driver reports no
GPUs and the reason; it never crashes the worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    name: str
    memory_total_mb: int
    memory_used_mb: int = 0
    utilization_pct: int = 0
    temperature_c: int | None = None
    processes: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Discovery:
    backend: str
    gpus: list[GpuInfo]
    error: str = ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def discover_nvml() -> Discovery:
    """Query NVML. ``nvmlInit`` is called per discovery: forked worker processes must not share it."""
    try:
        import pynvml
    except ImportError as exc:  # nvidia-ml-py is a dependency; this is a broken install
        return Discovery("nvml", [], f"nvidia-ml-py is not installed: {exc}")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return Discovery("nvml", [], f"no NVIDIA driver or GPU found (NVML: {exc})")
    try:
        gpus: list[GpuInfo] = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                util = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except pynvml.NVMLError:
                util = 0
            try:
                temp: int | None = int(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))
            except pynvml.NVMLError:
                temp = None
            try:
                procs = [
                    {"pid": p.pid, "used_memory_mb": int((p.usedGpuMemory or 0) // (1024 * 1024))}
                    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                ]
            except pynvml.NVMLError:
                procs = []
            gpus.append(
                GpuInfo(
                    index=index,
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    memory_total_mb=int(memory.total // (1024 * 1024)),
                    memory_used_mb=int(memory.used // (1024 * 1024)),
                    utilization_pct=util,
                    temperature_c=temp,
                    processes=procs,
                )
            )
        return Discovery("nvml", gpus)
    except pynvml.NVMLError as exc:
        return Discovery("nvml", [], f"NVML query failed: {exc}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def parse_fake_gpus(spec: str, host: str) -> list[GpuInfo]:
    """``FINETUNE_FAKE_GPUS``: ``"2x80"`` (two 80 GB cards), ``"80,24"``, or a JSON list of
    ``{"name", "memory_gb"}`` objects. UUIDs are stable per host and index."""
    spec = spec.strip()
    if not spec:
        return []
    cards: list[tuple[str, float]] = []
    if spec.startswith("["):
        for item in json.loads(spec):
            cards.append((str(item.get("name", "Fake GPU")), float(item["memory_gb"])))
    else:
        for part in spec.split(","):
            part = part.strip()
            count, _, memory = part.partition("x") if "x" in part else ("1", "", part)
            cards += [("Fake GPU", float(memory))] * int(count)
    gpus = []
    for index, (name, memory_gb) in enumerate(cards):
        digest = hashlib.sha1(f"{host}/{index}".encode()).hexdigest()
        uuid = f"GPU-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"
        gpus.append(
            GpuInfo(index=index, uuid=uuid, name=f"{name} {int(memory_gb)}GB", memory_total_mb=int(memory_gb * 1024))
        )
    return gpus


def discover() -> Discovery:
    backend = settings.FINETUNE_GPU_BACKEND
    if backend == "fake":
        try:
            return Discovery("fake", parse_fake_gpus(settings.FINETUNE_FAKE_GPUS, settings.FINETUNE_HOST))
        except (ValueError, KeyError, TypeError) as exc:
            return Discovery("fake", [], f"FINETUNE_FAKE_GPUS is malformed: {exc}")
    if backend == "none":
        return Discovery("none", [])
    return discover_nvml()
