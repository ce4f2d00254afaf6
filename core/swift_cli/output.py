"""Read what ``swift`` writes: its merged stdout/stderr log and ``<output_dir>/logging.jsonl``.

Pure functions and small stateful readers, no Django, so they are easy to test and to reuse for
export and deploy logs. Formats are documented in docs/ms-swift-notes.md:

* tqdm bars are redrawn with ``\\r``; a bar state is not a log line (only a bar's final state,
  ended by ``\\n``, is kept), and log messages glued onto a bar without a newline are split off.
* ``logging.jsonl`` has one JSON object per logging step (numeric values), a summary object with
  ``train_runtime`` and a final object with ``last_model_checkpoint``.
* Non-finite numbers are data: swift writes ``logging.jsonl`` with ``json.dumps`` (``NaN``,
  ``Infinity``, ``-Infinity`` for a diverged loss or an fp16 overflow) and its stdout dicts say
  ``'nan'``/``'inf'``. Neither JSON columns nor browsers accept them, so every value read here is
  finite or ``None``; where swift reported a non-finite number, its kind (``"nan"``, ``"inf"``,
  ``"-inf"``) is kept beside it (:attr:`MetricPoint.nonfinite`, :attr:`LoggingRecord.nonfinite`)
  so the pages can still say "NaN" or "∞".
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_LINE_CHARS = 8000
_MAX_PENDING_BYTES = 1 << 20

_BAR = re.compile(r"(\d{1,3}%\|.*?\|\s*\d+/\d+|: *\d+ examples \[)")
_GLUED = re.compile(r"\[(?:INFO|WARNING|ERROR|DEBUG|CRITICAL):[^\]]*\]|\{'")


def _clip(text: str) -> str:
    text = text.rstrip()
    if len(text) > MAX_LINE_CHARS:
        return text[:MAX_LINE_CHARS] + f" … [{len(text) - MAX_LINE_CHARS} more characters]"
    return text


def split_glued(record: str) -> tuple[bool, str]:
    """For a record that starts with a progress bar, return (True, glued message or "")."""
    if not _BAR.search(record[:300]):
        return False, record
    match = _GLUED.search(record)
    if match and match.start() > 0:
        return True, record[match.start() :]
    return True, ""


class LogSplitter:
    """Turns a byte stream into log lines: ``\\n`` ends a line, ``\\r`` ends a redrawn bar state.

    Bytes are buffered until a terminator arrives, so a UTF-8 character or a line split across
    two reads is never broken; invalid UTF-8 is replaced, overlong lines are clipped.
    """

    def __init__(self) -> None:
        self._pending = b""
        self.current_bar = ""

    def feed(self, data: bytes) -> list[str]:
        self._pending += data
        lines: list[str] = []
        while True:
            idx_n = self._pending.find(b"\n")
            idx_r = self._pending.find(b"\r")
            candidates = [i for i in (idx_n, idx_r) if i >= 0]
            if not candidates:
                break
            idx = min(candidates)
            raw, terminator = self._pending[:idx], self._pending[idx : idx + 1]
            self._pending = self._pending[idx + 1 :]
            self._take(raw.decode("utf-8", errors="replace"), terminator == b"\n", lines)
        if len(self._pending) > _MAX_PENDING_BYTES:
            raw, self._pending = self._pending, b""
            self._take(raw.decode("utf-8", errors="replace"), True, lines)
        return lines

    def flush(self) -> list[str]:
        """Emit whatever is left (the process has exited)."""
        lines: list[str] = []
        if self._pending:
            raw, self._pending = self._pending, b""
            self._take(raw.decode("utf-8", errors="replace"), True, lines)
        return lines

    def _take(self, record: str, newline: bool, out: list[str]) -> None:
        if not record.strip():
            return
        is_bar, rest = split_glued(record)
        if is_bar:
            self.current_bar = record[: len(record) - len(rest)].strip() if rest else record.strip()
            if rest:
                out.append(_clip(rest))
            elif newline:
                out.append(_clip(record))  # a bar's final state
            return
        out.append(_clip(record))


class JsonlTail:
    """Follows a JSON-lines file that another process appends to.

    Only complete lines are parsed; a partial last line waits for its newline. A missing file is
    simply empty; a file that shrank (rewritten) is read again from the start.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._pending = b""
        #: False while the file holds more than the last :meth:`read` took (its ``max_bytes``).
        self.caught_up = True

    def read(self, max_bytes: int | None = None) -> list[dict[str, Any]]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            self.caught_up = True
            return []
        if size < self._offset:
            self._offset, self._pending = 0, b""
        if size == self._offset:
            self.caught_up = True
            return []
        wanted = size - self._offset if max_bytes is None else min(max_bytes, size - self._offset)
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read(wanted)
        self._offset += len(data)
        self.caught_up = self._offset >= size
        self._pending += data
        *complete, self._pending = self._pending.split(b"\n")
        records: list[dict[str, Any]] = []
        for raw in complete:
            if not raw.strip():
                continue
            try:
                value = json.loads(raw.decode("utf-8", errors="replace"))
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                records.append(value)
        return records


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms])")
_UNIT = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: Any) -> float | None:
    """swift's ``format_time`` output (``'1d 2h 3m 4s'``, ``'5s'``) in seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    if not isinstance(text, str):
        return None
    parts = _DURATION.findall(text)
    if not parts:
        return None
    return float(sum(float(num) * _UNIT[unit] for num, unit in parts))


def nonfinite_kind(value: float) -> str | None:
    """``"nan"``, ``"inf"`` or ``"-inf"`` for a non-finite float, ``None`` for a finite one."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return None


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (at any depth) replaced by ``None``: what a JSON column,
    ``json.dumps(allow_nan=False)`` and a browser's ``JSON.parse`` accept."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def _number(value: Any) -> float | None:
    """A number swift reported (a JSON number or a stdout string such as ``'0.5'`` or ``'nan'``);
    may be non-finite."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


@dataclass
class MetricPoint:
    kind: str  # "train" | "eval"
    step: int
    max_steps: int | None
    epoch: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    token_acc: float | None = None
    memory_gib: float | None = None
    seconds_per_step: float | None = None
    remaining_seconds: float | None = None
    #: Every numeric value swift reported; ``None`` where it was not finite (see ``nonfinite``).
    values: dict[str, float | None] = field(default_factory=dict)
    #: ``{"loss": "nan", "grad_norm": "inf"}``: the values swift reported as NaN or ±infinity.
    nonfinite: dict[str, str] = field(default_factory=dict)


@dataclass
class LoggingRecord:
    """What one ``logging.jsonl`` object means to the runner."""

    point: MetricPoint | None = None
    #: Finite numbers or ``None`` (and other JSON values): ready for a JSON column.
    summary: dict[str, Any] | None = None
    #: The summary's top-level values that swift reported as NaN or ±infinity, by kind.
    nonfinite: dict[str, str] = field(default_factory=dict)
    last_checkpoint: str | None = None


def _steps(record: dict[str, Any]) -> tuple[int | None, int | None]:
    raw = record.get("global_step/max_steps")
    if isinstance(raw, str) and "/" in raw:
        left, _, right = raw.partition("/")
        if left.strip().isdigit() and right.strip().isdigit():
            return int(left), int(right)
    step = record.get("global_step")
    if isinstance(step, int) and not isinstance(step, bool):
        return step, None
    return None, None


def interpret_logging_record(record: dict[str, Any]) -> LoggingRecord:
    """Classify one logging.jsonl object (or a stdout progress dict, whose values are strings)."""
    result = LoggingRecord()
    if "last_model_checkpoint" in record:
        result.last_checkpoint = record.get("last_model_checkpoint") or None
        summary = {k: v for k, v in record.items() if k != "log_history"}
        result.nonfinite = _nonfinite_kinds(summary)
        result.summary = json_safe(summary)
        return result
    step, max_steps = _steps(record)
    if "train_runtime" in record:
        summary = {k: (_number(v) if _number(v) is not None else v) for k, v in record.items()}
        result.nonfinite = _nonfinite_kinds(summary)
        result.summary = json_safe(summary)
        return result
    if step is None:
        return result
    numbers = {k: n for k, v in record.items() if (n := _number(v)) is not None}
    nonfinite = _nonfinite_kinds(numbers)
    finite = {k: (None if k in nonfinite else n) for k, n in numbers.items()}
    is_eval = any(k.startswith("eval_") for k in numbers)
    point = MetricPoint(kind="eval" if is_eval else "train", step=step, max_steps=max_steps)
    point.epoch = finite.get("epoch")
    point.loss = finite.get("eval_loss" if is_eval else "loss")
    point.learning_rate = finite.get("learning_rate")
    point.grad_norm = finite.get("grad_norm")
    point.token_acc = finite.get("eval_token_acc" if is_eval else "token_acc")
    point.memory_gib = finite.get("memory(GiB)")
    point.seconds_per_step = finite.get("train_speed(s/it)")
    remaining = parse_duration(record.get("remaining_time"))
    point.remaining_seconds = remaining if remaining is not None and math.isfinite(remaining) else None
    point.values = finite
    point.nonfinite = nonfinite
    if is_eval and "eval_loss" in nonfinite:  # an eval point's loss is its eval_loss
        point.nonfinite = {**nonfinite, "loss": nonfinite["eval_loss"]}
    result.point = point
    return result


def _nonfinite_kinds(values: dict[str, Any]) -> dict[str, str]:
    return {key: kind for key, value in values.items()
            if isinstance(value, float) and (kind := nonfinite_kind(value)) is not None}


_CHECKPOINT_SAVED = re.compile(r"Saving model checkpoint to (?P<path>\S+)")


def checkpoint_saved(line: str) -> str | None:
    match = _CHECKPOINT_SAVED.search(line)
    return match.group("path") if match else None
