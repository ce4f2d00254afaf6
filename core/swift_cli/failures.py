"""Why did a swift run fail? Plain words from swift's last output lines.

Each explainer reads swift's output as the runner saw it (the last few hundred lines; see
tests/fixtures/swift_outputs/ for real recordings) and returns a plain reason, or None when the
failure is not its kind. The first reason found wins; swift's own error line always follows it
(``swift said: …``), so the raw message stays one click away on the task page.
"""

from __future__ import annotations

import ast
import difflib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?(?P<name>_?(?:[A-Z]\w*?)?(?:Error|Exception|Exit|Interrupt))\b:?")
_HUB_MARKERS = (
    "OfflineModeIsEnabled",
    "LocalEntryNotFoundError",
    "outgoing traffic has been disabled",
    "Couldn't reach",
    "NameResolutionError",
    "_DownloadDeadlineError",
    "Max retries exceeded with url",
    "modelscope_hub.errors.NetworkError",
    "ConnectionError: Couldn't",
)
_HUB_ID_IN_LINE = re.compile(
    r"'(?P<id>[A-Za-z0-9][\w.\-]*/[\w.\-]+)'|/api/v1/models/(?P<mid>[\w.\-]+/[\w.\-]+)/"
    r"|Dataset (?P<did>[A-Za-z0-9][\w.\-]*/[\w.\-]+) load failed"
)
# swift names what it is about to download: "Downloading the model from HuggingFace Hub, model_id: X".
_HUB_DOWNLOADING = re.compile(r"Downloading the (?:model|dataset) from [\w ]+, (?:model|dataset)_id: (?P<id>\S+)")
_SIGNALS = {9: "SIGKILL", 15: "SIGTERM", 6: "SIGABRT", 11: "SIGSEGV", 2: "SIGINT"}


def last_error_line(lines: list[str]) -> str:
    """The most meaningful error line: the last exception line of the last traceback, else the
    last ``[ERROR`` line, else the last non-empty line."""
    for line in reversed(lines):
        text = line.strip()
        if _EXCEPTION_LINE.match(text):
            return text
    for line in reversed(lines):
        if "[ERROR" in line or "Error:" in line:
            return line.strip()
    for line in reversed(lines):
        if line.strip():
            return line.strip()
    return ""


@dataclass(frozen=True)
class _Failure:
    lines: list[str]
    offline: bool
    error: str

    @property
    def tail(self) -> str:
        return "\n".join(self.lines[-200:])

    def argument(self, name: str) -> str | None:
        """The value swift used for an argument: its own ``[INFO:swift] name: value`` line (the
        effective value), else the ``name=value,`` line of the ``args: …Arguments(`` dump, else the
        ``run sh:`` command line; None when unknown or ``None``."""
        patterns = (
            re.compile(rf"\[INFO:swift\] {name}: (?P<value>\S+)\s*$"),
            re.compile(rf"^{name}=(?P<value>[^,\s]+),?$"),
            re.compile(rf"^run sh: .*--{name}[ =](?P<value>[^\s`]+)"),
        )
        for pattern in patterns:
            for line in reversed(self.lines):
                match = pattern.search(line.strip())
                if match and match.group("value") != "None":
                    return match.group("value")
        return None


def _literal_list(text: str | None) -> list[str]:
    """The items of a Python list literal swift printed (``['qwen2', 'qwen2_gte']``); [] if unreadable."""
    try:
        value = ast.literal_eval(text or "")
    except (ValueError, SyntaxError):
        return []
    return [str(item) for item in value] if isinstance(value, list) else []


# Hub downloads -----------------------------------------------------------------------------------
def _explain_hub(failure: _Failure) -> str | None:
    tail = failure.tail
    if not any(marker in tail for marker in _HUB_MARKERS):
        return None
    # The id in swift's last error line, else the one swift said it was downloading, else any in the tail.
    match = _HUB_ID_IN_LINE.search(failure.error)
    downloading = [m.group("id") for line in failure.lines if (m := _HUB_DOWNLOADING.search(line))]
    match = match or (None if downloading else _HUB_ID_IN_LINE.search(tail))
    if match:
        name = match.group("id") or match.group("mid") or match.group("did")
    else:
        name = downloading[-1] if downloading else "a model or dataset"
    where = (
        "this platform runs offline (FINETUNE_OFFLINE is on), so nothing can be downloaded"
        if failure.offline
        else "the hub could not be reached from this server"
    )
    return (
        f"Could not download {name} from the model hub: {where}. Use a local model folder under an "
        "allowed model root, or upload the dataset and use its id."
    )


# Arguments ---------------------------------------------------------------------------------------
_REMAINING_ARGV = re.compile(r"remaining_argv: (?P<argv>\[.*\])")
# Flags whose ms-swift 3.x name is still common in recipes.
_RENAMED_FLAGS = {"train_type": "tuner_type"}
_ARGPARSE_ERROR = re.compile(r"^\S+\.py: error: argument --(?P<name>[\w-]+)(?:/--[\w-]+)?: (?P<what>.+)$")
_ARGPARSE_KINDS = {"int": "a whole number", "float": "a number"}


def _explain_unknown_arguments(failure: _Failure) -> str | None:
    match = _REMAINING_ARGV.search(failure.error)
    if not match:
        return None
    words = _literal_list(match.group("argv"))
    flags = [word for word in words if word.startswith("--")]
    if not flags:
        shown = ", ".join(words) or match.group("argv")
        return f"swift did not understand these words on its command line: {shown}; check the training arguments."
    hints = "".join(f" (ms-swift 4 calls it --{_RENAMED_FLAGS[f[2:]]})" for f in flags if f[2:] in _RENAMED_FLAGS)
    one = len(flags) == 1
    return (
        f"swift does not know the argument{'' if one else 's'} {', '.join(flags)}{hints}; remove "
        f"{'it' if one else 'them'} from the training arguments or correct {'its' if one else 'their'} spelling."
    )


def _explain_invalid_argument_value(failure: _Failure) -> str | None:
    for line in reversed(failure.lines[-20:]):
        match = _ARGPARSE_ERROR.match(line.strip())
        if not match:
            continue
        name, what = match.group("name").replace("-", "_"), match.group("what")
        kind = re.match(r"invalid (?P<kind>\w+) value: (?P<value>.+)$", what)
        if kind and kind.group("kind") in _ARGPARSE_KINDS:
            expected = _ARGPARSE_KINDS[kind.group("kind")]
            return f"The training argument {name} must be {expected}, not {kind.group('value')}."
        return f"The training argument {name} has a value swift does not accept: {what}."
    return None


# Model and dataset paths, model type and template ------------------------------------------------
_MISSING_DATASET = re.compile(r"The local path does not exist, dataset_id: `(?P<path>[^`]+)`")
_MISSING_MODEL = re.compile(r"ValueError: path: '(?P<path>[^']+)' not found")
_NOT_MATCHED = re.compile(
    r"Failed to automatically match `(?P<what>model_type|template_type)` for `(?P<path>[^`]+)`\."
    r"(?: Multiple possible types found: (?P<candidates>\[[^\]]*\])\.)?"
)
_UNKNOWN_TYPE = re.compile(r"(?P<what>model_type|template_type): '(?P<value>[^']*)' not in (?P<known>\[.*)")
_TRANSFORMERS_UNKNOWN = re.compile(r"trying to load has model type `(?P<type>[^`]+)` but Transformers does not")


def _explain_missing_path(failure: _Failure) -> str | None:
    if match := _MISSING_DATASET.search(failure.error):
        return (
            f"The dataset file {match.group('path')} does not exist on the server; upload the dataset again "
            "or choose another one."
        )
    if match := _MISSING_MODEL.search(failure.error):
        return (
            f"The model folder {match.group('path')} does not exist on the server; check the model path "
            "(a local model must be a folder under an allowed model root)."
        )
    return None


def _closest(value: str, options: list[str]) -> str:
    """Pick the option sharing the longest prefix with ``value`` (the first one on a tie)."""
    return max(options, key=lambda option: len(os.path.commonprefix([value, option])))


def _explain_model_type_or_template(failure: _Failure) -> str | None:
    if match := _NOT_MATCHED.search(failure.error):
        folder, candidates = match.group("path"), _literal_list(match.group("candidates"))
        listed = f" swift's candidates: {', '.join(candidates)}." if candidates else ""
        if match.group("what") == "model_type":
            example = f" (e.g. {candidates[0]})" if candidates else ""
            template = "" if failure.argument("template") else " and template"
            return (
                f"swift cannot tell which model type the local model folder {folder} is: set model_type"
                f"{example}{template} in the training arguments.{listed}"
            )
        model_type = failure.argument("model_type")
        example = f" (e.g. {_closest(model_type or '', candidates)})" if candidates else ""
        return (
            f"swift cannot tell which chat template the local model folder {folder} uses: set template{example} "
            f"in the training arguments.{listed}"
        )
    if match := _UNKNOWN_TYPE.search(failure.error):
        setting = "model_type" if match.group("what") == "model_type" else "template"
        known = re.findall(r"'([^']+)'", match.group("known"))
        close = difflib.get_close_matches(match.group("value"), known, n=3)
        hint = f" (closest: {', '.join(close)})" if close else ""
        return (
            f"swift does not know the {setting} '{match.group('value')}'{hint}; set {setting} to one that swift "
            "supports, or leave it empty to let swift choose."
        )
    if match := _TRANSFORMERS_UNKNOWN.search(failure.tail):
        return (
            f"The model folder's config.json says model type '{match.group('type')}', which the installed "
            "transformers library does not support, so the model cannot be loaded; use a model of a supported "
            "architecture."
        )
    return None


# Datasets that end up empty ----------------------------------------------------------------------
_FILTERED = re.compile(r"Dataset filtered, origin length: (?P<before>\d+), filtered dataset length: (?P<after>\d+)")
_ROWS_WITH_ERRORS = "There are errors in the dataset"
_ROW_TRACEBACK = "[INFO:swift] Traceback (most recent call last):"
_TRAIN_NONE = "[INFO:swift] train_dataset: None"
_TRAIN_LOADED = "[INFO:swift] train_dataset: Dataset("


@dataclass(frozen=True)
class _Filtered:
    """One ``Dataset filtered`` line: swift dropped rows while reading (bad rows) or while encoding
    (bad rows, or rows over max_length with the default ``truncation_strategy=delete``)."""

    index: int
    before: int
    after: int
    had_row_errors: bool
    first_problem: str | None


def _filtered_events(lines: list[str]) -> list[_Filtered]:
    events: list[_Filtered] = []
    problem: str | None = None
    had_errors = in_row_traceback = False
    for index, line in enumerate(lines):
        text = line.strip()
        if text.startswith(_ROW_TRACEBACK):
            in_row_traceback = True
        elif in_row_traceback and _EXCEPTION_LINE.match(text):
            problem, in_row_traceback = problem or text, False
        if _ROWS_WITH_ERRORS in text:
            had_errors = True
        if match := _FILTERED.search(text):
            before, after = int(match.group("before")), int(match.group("after"))
            events.append(_Filtered(index, before, after, had_errors, problem if had_errors else None))
            problem, had_errors, in_row_traceback = None, False, False
    return events


def _explain_empty_dataset(failure: _Failure) -> str | None:
    """Every training row was dropped: swift logs ``Dataset filtered, …: 0`` and then crashes on the
    empty set (``TypeError: 'NoneType' object is not iterable`` after encoding,
    ``ZeroDivisionError`` when nothing survived reading)."""
    lines = failure.lines
    events = _filtered_events(lines)
    none_at = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].strip().startswith(_TRAIN_NONE)), None)
    val: _Filtered | None = None
    if none_at is not None:
        # Encoding filters the training set, then the validation set: the last two lines before.
        recent = [event for event in events if event.index < none_at][-2:]
        train = next((event for event in recent if event.after == 0), None)
        val = next((event for event in recent if train and event.index > train.index), None)
    else:
        train = next((event for event in events if event.after == 0), None)
        if train and any(line.strip().startswith(_TRAIN_LOADED) for line in lines[train.index :]):
            return None
    if train is None:
        return None
    if train.had_row_errors:
        problem = f" (first problem: {train.first_problem[:300]})" if train.first_problem else ""
        return (
            f"All {train.before} rows were dropped because swift could not use them{problem}; fix the rows "
            "or choose another dataset."
        )
    if none_at is None:
        return (
            f"All {train.before} rows were dropped while swift read the dataset, so nothing is left to train on; "
            "check that the rows are in a format swift understands."
        )
    max_length = failure.argument("max_length")
    limit = f"max_length={max_length} tokens" if max_length else "the max_length setting"
    advice = "raise max_length or shorten the rows."
    if val is not None and val.after == 0:
        return (
            f"All {train.before + val.before} rows ({train.before} for training, {val.before} for validation) are "
            f"longer than {limit} and were dropped; {advice}"
        )
    rows = f"{train.before} training rows" if val is not None else f"{train.before} rows"
    return f"All {rows} are longer than {limit} and were dropped; {advice}"


def _explain_split_too_small(failure: _Failure) -> str | None:
    if failure.error != "AssertionError" or "assert train_sample > 0" not in failure.tail:
        return None
    ratio = failure.argument("split_dataset_ratio")
    setting = f"split_dataset_ratio={ratio}" if ratio else "split_dataset_ratio"
    return (
        f"The dataset has too few rows to split off a validation set with {setting}: no rows would be left "
        "for training. Add rows, or set split_dataset_ratio to 0 (or turn evaluation off)."
    )


# Memory ------------------------------------------------------------------------------------------
_SIZE = r"\d+(?:\.\d+)?\s*(?:[KMGTP]i?B|bytes)"
_OOM_TRIED = re.compile(rf"Tried to allocate (?P<size>{_SIZE})")
_OOM_GPU = re.compile(
    rf"total capac(?:i)?ty of (?P<total>{_SIZE}) of which (?P<free>{_SIZE}) is free"  # torch >= 2.1
    rf"|\(GPU \d+; (?P<old_total>{_SIZE}) total capacity;.*?(?P<old_free>{_SIZE}) free"  # older torch
)
_OOM_OTHER_PROCESS = re.compile(rf"Process \d+ has (?P<size>{_SIZE}) memory in use")
_UNITS = {"bytes": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "PiB": 2**50}
_GPU_ADVICE = (
    "Lower per_device_train_batch_size (raise gradient_accumulation_steps to keep the same effective batch) "
    "or max_length, turn on gradient_checkpointing, or train with QLoRA"
)


def _gib(size: str) -> float:
    match = re.match(r"(?P<number>[\d.]+)\s*(?P<unit>\S+)", size)
    return float(match.group("number")) * _UNITS.get(match.group("unit"), 1) / 2**30 if match else 0.0


def _oom_line(lines: list[str]) -> str | None:
    for line in reversed(lines):
        text = line.strip()
        if "out of memory" in text.lower() and _EXCEPTION_LINE.match(text):
            return text
    return None


def _explain_gpu_memory(failure: _Failure) -> str | None:
    tail = failure.tail.lower()
    if "out of memory" not in tail or "cuda" not in tail:
        return None
    line = _oom_line(failure.lines) or ""
    detail = ""
    if tried := _OOM_TRIED.search(line):
        detail = f": it needed {tried.group('size')} more"
    if gpu := _OOM_GPU.search(line):
        total, free = gpu.group("total") or gpu.group("old_total"), gpu.group("free") or gpu.group("old_free")
        detail += f"{', but' if detail else ':'} the GPU ({total} in total) had only {free} free"
    others = sum(_gib(m.group("size")) for m in _OOM_OTHER_PROCESS.finditer(line))
    if others:  # torch lists every other process that holds memory on the GPU: another job shares it
        detail += f"{', and' if detail else ':'} other processes were using {others:.2f} GiB of it"
    shared = "; and give the task a GPU that no other job is using" if others else ""
    return f"The GPU ran out of memory{detail}. {_GPU_ADVICE}{shared}."


_EXPLAINERS: tuple[Callable[[_Failure], str | None], ...] = (
    _explain_unknown_arguments,
    _explain_invalid_argument_value,
    _explain_missing_path,
    _explain_model_type_or_template,
    _explain_hub,
    _explain_empty_dataset,
    _explain_split_too_small,
    _explain_gpu_memory,
)


def explain_failure(lines: list[str], exit_code: int | None, *, offline: bool, what: str = "training") -> str:
    """A plain-English reason for a failed run, followed by ``swift said:`` and swift's own last
    error line (``Last output:`` when a signal killed it). ``what``: the process ("training", "export")."""
    error = last_error_line(lines)
    if exit_code is not None and exit_code > 128 and (256 - exit_code) in _SIGNALS:
        sig = 256 - exit_code
        hint = " (often the out-of-memory killer)" if sig == 9 else ""
        return f"The {what} process was killed by {_SIGNALS[sig]}{hint}.\nLast output: {error}"
    if exit_code is not None and exit_code < 0:
        name = _SIGNALS.get(-exit_code, f"signal {-exit_code}")
        return f"swift was killed by {name}.\nLast output: {error}"
    failure = _Failure(lines=lines, offline=offline, error=error)
    for explain in _EXPLAINERS:
        if reason := explain(failure):
            said = (_oom_line(lines) or error) if explain is _explain_gpu_memory else error
            return f"{reason}\nswift said: {said}"
    if error:
        return f"swift exited with code {exit_code}: {error}"
    return f"swift exited with code {exit_code} without printing an error."
