"""Validate uploaded training datasets against the row formats ms-swift reads.

No Django (the standard library and ijson), so it can run in the web app, a worker or a script.
``validate_dataset_file`` reports the detected format and row count, or raises
``DatasetValidationError`` with the 1-based line (or, for JSON arrays, row) number and a
short plain-English reason meant to be shown to the person who uploaded the file.

Every file type is read as a stream, one row in memory at a time: .jsonl and .csv line by line,
a .json array record by record with ijson (docs/security.md, M8).
"""

import codecs
import csv
import enum
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import ijson

__all__ = [
    "DatasetFormat",
    "DatasetInfo",
    "DatasetValidationError",
    "detect_row_format",
    "validate_dataset_file",
]


class DatasetFormat(enum.StrEnum):
    """Row formats accepted by ms-swift's dataset preprocessors."""

    MESSAGES = "messages"  # {"messages": [{"role": ..., "content": ...}, ...]} (or "conversations")
    ALPACA = "alpaca"  # {"instruction": str, "input"?: str, "output": str}
    QUERY_RESPONSE = "query_response"  # {"query": str, "response": str, "system"?: str, "history"?: [[q, r]]}
    PREFERENCE = "preference"  # DPO rows: chosen answer plus a "rejected_response" / "rejected"
    TEXT = "text"  # pre-training: {"text": str}


@dataclass(frozen=True)
class DatasetInfo:
    """Summary of a dataset file that passed validation."""

    format: DatasetFormat
    rows: int
    file_type: str  # "jsonl" | "json" | "csv"
    columns: tuple[str, ...]  # sorted union of the top-level keys seen in any row


class DatasetValidationError(ValueError):
    """A dataset file that ms-swift could not train on.

    ``line`` is 1-based: the physical line of the row for .jsonl/.csv (and for JSON syntax
    errors), or the position of the record in the top-level array of a .json file, in which
    case ``unit`` is ``"row"``. ``line`` is None for whole-file problems.
    """

    def __init__(self, line: int | None, reason: str, unit: str = "line") -> None:
        super().__init__(line, reason, unit)  # keeps the exception picklable
        self.line: int | None = line
        self.reason: str = reason
        self.unit: str = unit

    def __str__(self) -> str:
        return self.reason if self.line is None else f"{self.unit} {self.line}: {self.reason}"


MESSAGE_ROLES = frozenset({"system", "user", "assistant", "tool", "tool_call", "tool_response"})
_ROLE_ALIASES = {"human": "user", "gpt": "assistant"}  # ShareGPT-style "from"/"value" messages
_MESSAGE_KEYS = ("messages", "conversations")
_REJECTED_KEYS = ("rejected_response", "rejected")
_PROMPT_KEYS = ("query", "prompt")
_CHOSEN_KEYS = ("response", "chosen")
_SUFFIXES = (".jsonl", ".json", ".csv")
_NOT_UTF8 = "the text is not valid UTF-8; save the file with UTF-8 encoding"


def _json_type(value: object) -> str:
    """Name a Python value by its JSON type, in plain words."""
    if isinstance(value, bool):
        return "true/false"
    for kind, name in ((dict, "object"), (list, "list"), (str, "string"), (int | float | Decimal, "number")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def _first_key(row: dict[str, Any], keys: Sequence[str]) -> str | None:
    return next((key for key in keys if key in row), None)


def _require_str(row: dict[str, Any], keys: Sequence[str], *, non_empty: bool) -> str:
    """Return the string under the first of ``keys`` present in ``row``, or explain what's wrong."""
    key = _first_key(row, keys)
    if key is None or row[key] is None:
        alternatives = "".join(f" (or '{other}')" for other in keys[1:])
        _fail(f"the '{keys[0]}'{alternatives} field is missing")
    value = row[key]
    if not isinstance(value, str):
        _fail(f"'{key}' must be a string, got {_json_type(value)}")
    if non_empty and not value.strip():
        _fail(f"'{key}' is empty")
    return value


def _fail(reason: str) -> NoReturn:
    raise ValueError(reason)


def _check_optional_str(row: dict[str, Any], *keys: str) -> None:
    for key in keys:
        if row.get(key) is not None and not isinstance(row[key], str):
            _fail(f"'{key}' must be a string, got {_json_type(row[key])}")


def _check_messages(row: dict[str, Any], key: str) -> list[tuple[str, Any]]:
    """Validate a messages/conversations list; return its (role, content) turns."""
    messages = row[key]
    if not isinstance(messages, list) or not messages:
        _fail(f'\'{key}\' must be a non-empty list of {{"role": ..., "content": ...}} objects')
    turns: list[tuple[str, Any]] = []
    for number, message in enumerate(messages, 1):
        where = f"message {number} in '{key}'"
        if not isinstance(message, dict):
            _fail(f"{where} must be an object, got {_json_type(message)}")
        role = message.get("role", message.get("from"))
        role = _ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role is None:
            _fail(f"{where} has no 'role'")
        if not isinstance(role, str) or role not in MESSAGE_ROLES:
            allowed = ", ".join(sorted(MESSAGE_ROLES))
            _fail(f"{where} has the unknown role {json.dumps(role, default=float)}; use one of: {allowed}")
        content = message.get("content", message.get("value"))
        if not isinstance(content, str | list):
            _fail(f"{where} needs a 'content' string, got {_json_type(content)}")
        turns.append((role, content))
    return turns


def _check_history(row: dict[str, Any]) -> None:
    history = row.get("history")
    if history is None:
        return
    pairs_ok = isinstance(history, list) and all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(part, str) for part in pair)
        for pair in history
    )
    if not pairs_ok:
        _fail("'history' must be a list of [query, response] pairs of strings")


def detect_row_format(row: dict[str, Any]) -> DatasetFormat:
    """Detect and check the format of one dataset row.

    A row with a rejected field (``rejected_response``/``rejected``) is a preference row even
    when it also has messages or query/response. Raises ``ValueError`` with a plain-English
    reason when the row matches no format or a field is missing or malformed.
    """
    if not isinstance(row, dict):
        _fail(f"expected a JSON object, got {_json_type(row)}")
    messages_key = _first_key(row, _MESSAGE_KEYS)
    rejected_key = _first_key(row, _REJECTED_KEYS)
    if rejected_key is not None:
        rejected = _require_str(row, _REJECTED_KEYS, non_empty=True)
        chosen: Any
        if messages_key is not None:
            turns = _check_messages(row, messages_key)
            if turns[-1][0] != "assistant":
                _fail(f"the last message in '{messages_key}' must be the assistant's chosen reply")
            chosen = turns[-1][1]
        else:
            _require_str(row, _PROMPT_KEYS, non_empty=True)
            chosen = _require_str(row, _CHOSEN_KEYS, non_empty=True)
        if isinstance(chosen, str) and chosen.strip() == rejected.strip():
            _fail(f"{rejected_key} is identical to the chosen response; the two answers must differ")
        return DatasetFormat.PREFERENCE
    if messages_key is not None:
        if not any(role == "assistant" for role, _ in _check_messages(row, messages_key)):
            _fail(f"'{messages_key}' has no assistant message; add the reply the model should learn")
        return DatasetFormat.MESSAGES
    if "instruction" in row or "output" in row:
        _require_str(row, ("instruction",), non_empty=True)
        _require_str(row, ("output",), non_empty=False)
        _check_optional_str(row, "input", "system")
        return DatasetFormat.ALPACA
    if "query" in row or "response" in row:
        _require_str(row, ("query",), non_empty=True)
        _require_str(row, ("response",), non_empty=False)
        _check_optional_str(row, "system")
        _check_history(row)
        return DatasetFormat.QUERY_RESPONSE
    if "prompt" in row or "chosen" in row:
        _fail("this looks like a preference row but has no 'rejected_response' (or 'rejected') field")
    if "text" in row:
        _require_str(row, ("text",), non_empty=True)
        return DatasetFormat.TEXT
    found = ", ".join(sorted(map(str, row))[:10]) or "none"
    _fail(
        f"unrecognised row (fields: {found}); expected 'messages', 'instruction' + 'output', "
        "'query' + 'response', 'text', or a preference row with 'rejected_response'"
    )


def _decoded_lines(raw_lines: Iterable[bytes]) -> Iterator[str]:
    """Decode binary lines one at a time so a bad byte is reported with its line number."""
    for number, raw in enumerate(raw_lines, 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DatasetValidationError(number, _NOT_UTF8) from None
        yield text.removeprefix("\ufeff") if number == 1 else text


def _parse_json(text: str, line_offset: int = 0) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        reason = f"invalid JSON ({exc.msg} at column {exc.colno})"
        raise DatasetValidationError(line_offset + exc.lineno, reason) from None


def _iter_jsonl(lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed value) for each non-blank line."""
    for number, text in enumerate(lines, 1):
        if text.strip():
            value = _parse_json(text, line_offset=number - 1)
            yield number, value


# --- .json ---------------------------------------------------------------------------------------
_JSON_WHITESPACE = b" \t\r\n"
_CHUNK = 64 * 1024
#: The most text the syntax-error locator holds at once (one record and what follows it).
_LOCATE_WINDOW = 32 * 1024 * 1024


def _first_symbol(handle: BinaryIO) -> bytes:
    """The first byte of the file that is neither a byte order mark nor whitespace (b"" if none)."""
    head = handle.read(len(codecs.BOM_UTF8)).removeprefix(codecs.BOM_UTF8)
    while True:
        stripped = head.lstrip(_JSON_WHITESPACE)
        if stripped:
            return stripped[:1]
        head = handle.read(_CHUNK)
        if not head:
            return b""


class _CheckedUtf8:
    """A binary reader for ijson that checks the UTF-8 as it passes, so that a bad byte is reported
    with its line as in the other file types, and that drops a leading byte order mark."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._newlines = 0
        self._first = True

    def read(self, size: int = -1) -> bytes:
        if size == 0:
            return b""
        data = self._handle.read(size)
        if self._first and data:
            self._first = False
            data = data.removeprefix(codecs.BOM_UTF8)
        try:
            self._decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:  # exc.object: the bytes held back from the last read + data
            line = self._newlines + exc.object.count(b"\n", 0, exc.start) + 1
            raise DatasetValidationError(line, _NOT_UTF8) from None
        self._newlines += data.count(b"\n")
        return data


def _iter_json_array(handle: BinaryIO) -> Iterator[tuple[int, Any]]:
    """Yield (row number, record) for each record of a top-level JSON array, one at a time."""
    number = 0
    try:
        for number, record in enumerate(ijson.items(_CheckedUtf8(handle), "item"), 1):
            yield number, record
    except ijson.JSONError as exc:
        handle.seek(0)
        error = _json_array_error(handle)
        if error is None:  # what ijson refuses and Python's json reads (NaN, Infinity)
            reason = str(exc).splitlines()[0].split(": ", 1)[-1] if str(exc) else "broken"
            error = DatasetValidationError(number + 1, f"invalid JSON ({reason})", "row")
        raise error from None


class _TextWindow:
    """Text read from a stream that is kept from a point on, with the line and column of that point."""

    def __init__(self, stream: io.TextIOBase) -> None:
        self._stream = stream
        self.text = ""
        self.line = 1  # of text[0]
        self.column = 0  # characters before text[0] on its line
        self.eof = False

    def extend(self) -> bool:
        chunk = self._stream.read(_CHUNK)
        self.eof = not chunk
        self.text += chunk
        return bool(chunk) and len(self.text) < _LOCATE_WINDOW

    def skip_whitespace(self, index: int) -> int:
        while True:
            while index < len(self.text) and self.text[index] in " \t\r\n":
                index += 1
            if index < len(self.text) or not self.extend():
                return index

    def drop(self, count: int) -> None:
        dropped, self.text = self.text[:count], self.text[count:]
        newlines = dropped.count("\n")
        self.line += newlines
        self.column = count - dropped.rfind("\n") - 1 if newlines else self.column + count

    def where(self, index: int) -> tuple[int, int]:
        """Line and column (1-based, as ``json`` counts them) of ``text[index]``."""
        newlines = self.text.count("\n", 0, index)
        column = index - self.text.rfind("\n", 0, index) if newlines else self.column + index + 1
        return self.line + newlines, column


def _json_array_error(handle: BinaryIO) -> DatasetValidationError | None:
    """The first syntax error of a .json array, at the line and in the words of Python's ``json``
    (as when the file was read whole), or None if ``json`` reads it. Reads a record at a time: the
    text from the start of the record where ``json`` fails is checked with an opening ``[`` (or
    ``[0,`` after a comma) in front, which puts its parser in the state it would be in there."""
    stream = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="replace", newline="")
    try:
        window = _TextWindow(stream)
        window.drop(window.skip_whitespace(0) + 1)  # the opening "["
        opener, decoder = "[", json.JSONDecoder()
        while True:
            index = window.skip_whitespace(0)
            if opener == "[" and window.text[index : index + 1] == "]":
                end = index
            else:
                try:
                    _, end = decoder.raw_decode(window.text, index)
                except json.JSONDecodeError as exc:
                    cut_short = exc.pos >= len(window.text) - 16 or exc.msg.startswith("Unterminated string")
                    if cut_short and not window.eof and window.extend():
                        continue  # the record goes on past what was read: read more and try again
                    break
                end = window.skip_whitespace(end)
            symbol = window.text[end : end + 1]
            if symbol == ",":
                window.drop(end + 1)
                opener = "[0,"
                continue
            if symbol == "]" and window.skip_whitespace(end + 1) == len(window.text) and window.eof:
                return None
            break
        try:
            json.loads(opener + window.text)
        except json.JSONDecodeError as exc:
            line, column = window.where(exc.pos - len(opener))
            return DatasetValidationError(line, f"invalid JSON ({exc.msg} at column {column})")
        return None
    finally:
        stream.detach()


def _iter_json_lines(handle: BinaryIO) -> Iterator[tuple[int, Any]]:
    """Read a .json file whose top level is not an array as one JSON object per line."""
    try:
        yield from _iter_jsonl(_decoded_lines(handle))
    except DatasetValidationError as error:
        if error.reason == _NOT_UTF8 or not _is_one_json_value(handle):
            raise  # genuinely broken: report the line that failed
        reason = "a .json file must hold a JSON array of records ([{...}, {...}]) or one JSON object per line"
        raise DatasetValidationError(None, reason) from None


def _is_one_json_value(handle: BinaryIO) -> bool:
    handle.seek(0)
    try:
        for _event in ijson.basic_parse(_CheckedUtf8(handle)):
            pass
    except (ijson.JSONError, DatasetValidationError):
        return False
    return True


class _LineTracker:
    """Line iterator for the csv module that remembers where the current record started."""

    def __init__(self, lines: Iterator[str]) -> None:
        self._lines = lines
        self.number = 0
        self.start: int | None = None

    def __iter__(self) -> "_LineTracker":
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self.number += 1
        if self.start is None and line.strip("\r\n"):
            self.start = self.number
        return line


def _iter_csv(lines: Iterator[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, row) for each CSV record; empty cells are left out of the row."""
    tracker = _LineTracker(lines)
    reader = csv.DictReader(tracker, strict=True)
    try:
        header = reader.fieldnames
        if header is None:
            return
        if not header:
            raise DatasetValidationError(1, "the first line must be a header row naming the columns")
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise DatasetValidationError(tracker.number, f"the header repeats the column '{repeated[0]}'")
        while True:
            tracker.start = None
            record = next(reader, None)
            if record is None:
                return
            line = tracker.start or tracker.number
            if None in record:
                raise DatasetValidationError(line, "the row has more cells than the header has columns")
            row = {key: value for key, value in record.items() if value is not None and value.strip()}
            if row:  # rows of empty cells (",,,") are treated as blank lines
                yield line, row
    except csv.Error as exc:
        reason = f"malformed CSV ({exc}); check the quotes and commas in this row"
        raise DatasetValidationError(tracker.start or tracker.number, reason) from None


def _format_size(num_bytes: int) -> str:
    if num_bytes < 1024 * 1024:
        return f"{num_bytes:,} bytes"
    return f"{num_bytes / (1024 * 1024):,.1f}".removesuffix(".0") + " MB"


def _summarise(
    rows: Iterable[tuple[int, Any]], file_type: str, unit: str, max_rows: int | None, max_columns: int | None
) -> DatasetInfo:
    """Check every row, that all rows share the first row's format and that, together, they have
    at most ``max_columns`` different fields."""
    file_format: DatasetFormat | None = None
    count = 0
    columns: set[str] = set()
    for number, row in rows:
        count += 1
        if max_rows is not None and count > max_rows:
            raise DatasetValidationError(None, f"the file has more than {max_rows:,} rows")
        try:
            row_format = detect_row_format(row)
        except ValueError as exc:
            raise DatasetValidationError(number, str(exc), unit) from None
        if file_format is None:
            file_format = row_format
        elif row_format != file_format:
            reason = (
                f"row is in '{row_format}' format but the file started as '{file_format}'; "
                "use one format for every row"
            )
            raise DatasetValidationError(number, reason, unit)
        columns.update(row)
        if max_columns is not None and len(columns) > max_columns:
            reason = (
                f"with this row the file has more than {max_columns:,} different fields (columns); "
                f"a dataset may have at most {max_columns:,}"
            )
            raise DatasetValidationError(number, reason, unit)
    if file_format is None:
        raise DatasetValidationError(None, "the file contains no rows")
    return DatasetInfo(format=file_format, rows=count, file_type=file_type, columns=tuple(sorted(columns)))


def validate_dataset_file(
    path: Path, *, max_rows: int | None = None, max_bytes: int | None = None, max_columns: int | None = None
) -> DatasetInfo:
    """Validate a .jsonl, .json or .csv dataset file and return its format and row count.

    Every file is read as a stream, one row at a time: .jsonl and .csv line by line, a .json file
    record by record (a top-level array of objects, read with ijson) or line by line (one object
    per line). Raises ``DatasetValidationError`` for any problem, and ``OSError`` if the file
    cannot be opened.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        shown = suffix or "(no extension)"
        raise DatasetValidationError(None, f"unsupported file type '{shown}': upload .jsonl, .json or .csv")
    file_type = suffix.removeprefix(".")
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise DatasetValidationError(None, f"the file is larger than {_format_size(max_bytes)}")
    with path.open("rb") as handle:
        rows: Iterator[tuple[int, Any]]
        unit = "line"
        if suffix == ".json":
            array = _first_symbol(handle) == b"["
            handle.seek(0)
            rows, unit = (_iter_json_array(handle), "row") if array else (_iter_json_lines(handle), "line")
        elif suffix == ".jsonl":
            rows = _iter_jsonl(_decoded_lines(handle))
        else:
            rows = _iter_csv(_decoded_lines(handle))
        return _summarise(rows, file_type, unit, max_rows, max_columns)
