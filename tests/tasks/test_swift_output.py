"""Reading swift's output: the merged log stream, logging.jsonl, and why a run failed."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest

from core.swift_cli.failures import explain_failure, last_error_line
from core.swift_cli.output import (
    MAX_LINE_CHARS,
    JsonlTail,
    LoggingRecord,
    LogSplitter,
    MetricPoint,
    checkpoint_saved,
    interpret_logging_record,
    parse_duration,
    split_glued,
)

BAR_1 = "Train:  10%|█         | 1/10 [00:00<00:02,  4.22it/s]"
BAR_2 = "Train:  20%|██        | 2/10 [00:00<00:01,  4.30it/s]"
BAR_DONE = "Train: 100%|██████████| 10/10 [00:02<00:00,  4.32it/s]"
SAVING = "[INFO:swift] Saving model checkpoint to /x/checkpoint-5"


def feed_all(splitter: LogSplitter, *chunks: bytes) -> list[str]:
    lines: list[str] = []
    for chunk in chunks:
        lines += splitter.feed(chunk)
    return lines


# --- LogSplitter ---------------------------------------------------------------------------------
def test_plain_lines_are_emitted_one_by_one() -> None:
    splitter = LogSplitter()
    assert splitter.feed(b"run sh: `python sft.py`\n[INFO:swift] Start time of running main\n") == [
        "run sh: `python sft.py`",
        "[INFO:swift] Start time of running main",
    ]


def test_redrawn_bar_states_are_not_emitted_but_the_final_state_is() -> None:
    splitter = LogSplitter()
    stream = f"\r{BAR_1}\r{BAR_2}\r".encode()
    assert splitter.feed(stream) == []
    assert splitter.current_bar == BAR_2
    assert splitter.feed(f"{BAR_DONE}\n".encode()) == [BAR_DONE]
    assert splitter.current_bar == BAR_DONE


def test_a_dataset_progress_bar_is_treated_like_a_training_bar() -> None:
    splitter = LogSplitter()
    generating = "Generating train split: 64 examples [00:00, 16310.33 examples/s]"
    mapping = "Map (num_proc=1): 100%|██████████| 64/64 [00:00<00:00, 475.80 examples/s]"
    assert splitter.feed(f"\r{generating}\r{mapping}\r{mapping}\n".encode()) == [mapping]


def test_a_log_line_glued_onto_a_bar_is_emitted_as_its_own_line() -> None:
    splitter = LogSplitter()
    assert splitter.feed(f"\r{BAR_1}\r{BAR_2}{SAVING}\n".encode()) == [SAVING]
    assert splitter.current_bar == BAR_2


def test_a_progress_dict_glued_onto_a_bar_is_emitted_as_its_own_line() -> None:
    record = "{'loss': '8.018', 'global_step/max_steps': '1/10'}"
    assert LogSplitter().feed(f"\r{BAR_1}{record}\n".encode()) == [record]


def test_a_line_split_across_two_reads_is_emitted_once_intact() -> None:
    splitter = LogSplitter()
    assert splitter.feed(SAVING[:20].encode()) == []
    assert splitter.feed(SAVING[20:].encode() + b"\n") == [SAVING]


@pytest.mark.parametrize("text", ["Résumé des données: café", "训练中文数据集"])
def test_a_multibyte_character_split_across_reads_is_kept_intact(text: str) -> None:
    data = f"[INFO:swift] {text}\n".encode()
    # Cut inside every multi-byte character once; each cut must decode the same.
    for cut in range(1, len(data)):
        splitter = LogSplitter()
        assert feed_all(splitter, data[:cut], data[cut:]) == [f"[INFO:swift] {text}"], cut


def test_byte_by_byte_feeding_gives_the_same_lines() -> None:
    data = f"\r{BAR_1}\r{BAR_2}{SAVING}\nLoading 中文 é\n".encode()
    splitter = LogSplitter()
    assert feed_all(splitter, *(data[i : i + 1] for i in range(len(data)))) == [SAVING, "Loading 中文 é"]


def test_invalid_utf8_is_replaced() -> None:
    assert LogSplitter().feed(b"bad \xff\xfe byte\n") == ["bad \ufffd\ufffd byte"]


def test_an_overlong_line_is_clipped() -> None:
    lines = LogSplitter().feed(b"x" * (MAX_LINE_CHARS + 1000) + b"\n")
    assert lines == ["x" * MAX_LINE_CHARS + " … [1000 more characters]"]


def test_a_line_of_exactly_the_limit_is_not_clipped() -> None:
    assert LogSplitter().feed(b"y" * MAX_LINE_CHARS + b"\n") == ["y" * MAX_LINE_CHARS]


def test_an_endless_line_without_a_terminator_is_emitted_once_it_exceeds_a_megabyte() -> None:
    splitter = LogSplitter()
    assert splitter.feed(b"z" * (1 << 20)) == []
    assert splitter.feed(b"z") == ["z" * MAX_LINE_CHARS + f" … [{(1 << 20) + 1 - MAX_LINE_CHARS} more characters]"]
    assert splitter.flush() == []


def test_blank_lines_and_trailing_spaces_are_dropped() -> None:
    assert LogSplitter().feed(b"\n   \n\r\nkept   \r\n") == ["kept"]


def test_flush_emits_a_trailing_partial_line_once() -> None:
    splitter = LogSplitter()
    assert splitter.feed(b"first\nValueError: no newline at exit") == ["first"]
    assert splitter.flush() == ["ValueError: no newline at exit"]
    assert splitter.flush() == []


def test_flush_emits_the_last_bar_state() -> None:
    splitter = LogSplitter()
    assert splitter.feed(f"\r{BAR_1}\r{BAR_2}".encode()) == []
    assert splitter.flush() == [BAR_2]


def test_split_glued_tells_bars_from_log_lines() -> None:
    assert split_glued(SAVING) == (False, SAVING)
    assert split_glued(BAR_1) == (True, "")
    assert split_glued(BAR_1 + SAVING) == (True, SAVING)


# --- JsonlTail -----------------------------------------------------------------------------------
def append(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(text)


def test_complete_records_are_read_incrementally(tmp_path: Path) -> None:
    path = tmp_path / "logging.jsonl"
    tail = JsonlTail(path)
    append(path, '{"loss": 1.0}\n{"loss": 0.9}\n')
    assert tail.read() == [{"loss": 1.0}, {"loss": 0.9}]
    assert tail.read() == []
    append(path, '{"loss": 0.8}\n')
    assert tail.read() == [{"loss": 0.8}]


def test_a_partial_last_line_waits_for_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "logging.jsonl"
    tail = JsonlTail(path)
    append(path, '{"loss": 1.0}\n{"loss": 0.')
    assert tail.read() == [{"loss": 1.0}]
    assert tail.read() == []
    append(path, "9")
    assert tail.read() == []
    append(path, ', "epoch": "中"}\n')
    assert tail.read() == [{"loss": 0.9, "epoch": "中"}]


def test_a_multibyte_character_split_between_reads_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "logging.jsonl"
    tail = JsonlTail(path)
    data = json.dumps({"note": "café"}, ensure_ascii=False).encode() + b"\n"
    cut = data.index("é".encode()) + 1
    path.write_bytes(data[:cut])
    assert tail.read() == []
    with path.open("ab") as handle:
        handle.write(data[cut:])
    assert tail.read() == [{"note": "café"}]


def test_a_missing_file_reads_as_empty_until_it_appears(tmp_path: Path) -> None:
    path = tmp_path / "out" / "logging.jsonl"
    tail = JsonlTail(path)
    assert tail.read() == []
    path.parent.mkdir()
    append(path, '{"loss": 1.0}\n')
    assert tail.read() == [{"loss": 1.0}]


def test_malformed_lines_and_non_objects_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "logging.jsonl"
    append(path, '{"loss": 1.0}\nnot json at all\n\n[1, 2]\n"text"\n{"loss": \n{"loss": 0.5}\n')
    assert JsonlTail(path).read() == [{"loss": 1.0}, {"loss": 0.5}]


def test_a_file_that_shrank_is_read_again_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "logging.jsonl"
    tail = JsonlTail(path)
    append(path, '{"loss": 1.0}\n{"loss": 0.9}\n{"loss": 0.8}\n')
    assert len(tail.read()) == 3
    path.write_text('{"step": 1}\n')
    assert tail.read() == [{"step": 1}]
    append(path, '{"step": 2}\n')
    assert tail.read() == [{"step": 2}]


# --- parse_duration ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0s", 0.0),
        ("5s", 5.0),
        ("1m 5s", 65.0),
        ("2h 3m 4s", 7384.0),
        ("1d 2h 3m 4s", 93784.0),
        ("3m", 180.0),
        ("1.5s", 1.5),
        (12, 12.0),
        (0.25, 0.25),
    ],
)
def test_a_swift_duration_is_read_in_seconds(text: Any, seconds: float) -> None:
    result = parse_duration(text)
    assert result == seconds
    assert type(result) is float


@pytest.mark.parametrize("text", ["garbage", "", "soon", None, True, ["5s"], {"s": 5}])
def test_anything_else_is_not_a_duration(text: Any) -> None:
    assert parse_duration(text) is None


# --- interpret_logging_record --------------------------------------------------------------------
def test_a_train_record_from_logging_jsonl_becomes_a_train_point() -> None:
    record = json.loads(
        '{"loss": 8.01822472, "grad_norm": 1.00036454, "learning_rate": 9.755e-05, "token_acc": 0.0, '
        '"epoch": 0.25, "global_step/max_steps": "1/10", "elapsed_time": "0s", "remaining_time": "2s", '
        '"train_speed(s/it)": 0.257478}'
    )
    assert interpret_logging_record(record) == LoggingRecord(
        point=MetricPoint(
            kind="train",
            step=1,
            max_steps=10,
            epoch=0.25,
            loss=8.01822472,
            learning_rate=9.755e-05,
            grad_norm=1.00036454,
            token_acc=0.0,
            memory_gib=None,
            seconds_per_step=0.257478,
            remaining_seconds=2.0,
            values={
                "loss": 8.01822472,
                "grad_norm": 1.00036454,
                "learning_rate": 9.755e-05,
                "token_acc": 0.0,
                "epoch": 0.25,
                "train_speed(s/it)": 0.257478,
            },
        )
    )


def test_a_stdout_progress_dict_with_string_values_becomes_a_train_point() -> None:
    record = {
        "loss": "7.999",
        "grad_norm": "1.065",
        "learning_rate": "5e-05",
        "token_acc": "0",
        "epoch": "1.25",
        "global_step/max_steps": "5/10",
        "elapsed_time": "2s",
        "remaining_time": "1m 2s",
        "train_speed(s/it)": "0.4662",
        "memory(GiB)": "14.25",
    }
    result = interpret_logging_record(record)
    assert result.summary is None
    assert result.last_checkpoint is None
    assert result.point == MetricPoint(
        kind="train",
        step=5,
        max_steps=10,
        epoch=1.25,
        loss=7.999,
        learning_rate=5e-05,
        grad_norm=1.065,
        token_acc=0.0,
        memory_gib=14.25,
        seconds_per_step=0.4662,
        remaining_seconds=62.0,
        values={
            "loss": 7.999,
            "grad_norm": 1.065,
            "learning_rate": 5e-05,
            "token_acc": 0.0,
            "epoch": 1.25,
            "train_speed(s/it)": 0.4662,
            "memory(GiB)": 14.25,
        },
    )


def test_an_eval_record_becomes_an_eval_point_with_eval_loss_as_loss() -> None:
    record = {
        "eval_loss": "7.99",
        "eval_runtime": "0.0913",
        "eval_samples_per_second": "65.69",
        "eval_steps_per_second": "65.69",
        "eval_token_acc": "0.5",
        "epoch": "1.276",
        "global_step/max_steps": "5/10",
        "elapsed_time": "2s",
        "remaining_time": "2s",
    }
    point = interpret_logging_record(record).point
    assert point is not None
    assert point.kind == "eval"
    assert (point.step, point.max_steps) == (5, 10)
    assert point.loss == 7.99
    assert point.token_acc == 0.5
    assert point.epoch == 1.276
    assert point.learning_rate is None
    assert point.values == {
        "eval_loss": 7.99,
        "eval_runtime": 0.0913,
        "eval_samples_per_second": 65.69,
        "eval_steps_per_second": 65.69,
        "eval_token_acc": 0.5,
        "epoch": 1.276,
    }


def test_the_train_runtime_record_is_a_summary_with_numbers() -> None:
    record = {
        "train_runtime": "4.627",
        "train_samples_per_second": "34.58",
        "train_steps_per_second": "2.161",
        "train_loss": "8.004",
        "epoch": "2.5",
        "global_step/max_steps": "10/10",
        "elapsed_time": "5s",
        "remaining_time": "0s",
        "train_speed(s/it)": "0.4624",
    }
    assert interpret_logging_record(record) == LoggingRecord(
        summary={
            "train_runtime": 4.627,
            "train_samples_per_second": 34.58,
            "train_steps_per_second": 2.161,
            "train_loss": 8.004,
            "epoch": 2.5,
            "global_step/max_steps": "10/10",
            "elapsed_time": "5s",
            "remaining_time": "0s",
            "train_speed(s/it)": 0.4624,
        }
    )


def test_the_train_runtime_record_from_logging_jsonl_keeps_its_numbers() -> None:
    record = json.loads(
        '{"train_runtime": 2.4894, "train_samples_per_second": 64.272, "train_steps_per_second": 4.017, '
        '"total_flos": 10732380672.0, "train_loss": 8.00427914, "epoch": 2.5, "global_step/max_steps": "10/10", '
        '"elapsed_time": "2s", "remaining_time": "0s", "train_speed(s/it)": 0.248407}'
    )
    result = interpret_logging_record(record)
    assert result.point is None
    assert result.last_checkpoint is None
    assert result.summary == record


def test_the_final_record_names_the_last_checkpoint_and_drops_the_log_history() -> None:
    record = {
        "train_dataset": "108.750000±22.682592, min=78.000000, max=164.000000, size=64",
        "model_parameter_info": "PeftModelForCausalLM: 0.2827M Params",
        "last_model_checkpoint": "/out/checkpoint-10",
        "best_model_checkpoint": None,
        "best_metric": None,
        "global_step": 10,
        "log_history": [{"loss": 8.0, "step": 1}],
        "memory": 0,
    }
    assert interpret_logging_record(record) == LoggingRecord(
        last_checkpoint="/out/checkpoint-10",
        summary={
            "train_dataset": "108.750000±22.682592, min=78.000000, max=164.000000, size=64",
            "model_parameter_info": "PeftModelForCausalLM: 0.2827M Params",
            "last_model_checkpoint": "/out/checkpoint-10",
            "best_model_checkpoint": None,
            "best_metric": None,
            "global_step": 10,
            "memory": 0,
        },
    )


def test_a_final_record_without_a_checkpoint_has_none() -> None:
    result = interpret_logging_record({"last_model_checkpoint": None, "global_step": 0})
    assert result.last_checkpoint is None
    assert result.summary == {"last_model_checkpoint": None, "global_step": 0}
    assert result.point is None


def test_a_dpo_record_keeps_the_reward_keys_in_values() -> None:
    record = {
        "loss": "0.6931",
        "grad_norm": "1.068",
        "learning_rate": "9.755e-05",
        "rewards/chosen": "0",
        "rewards/rejected": "0",
        "rewards/accuracies": "0",
        "rewards/margins": "0",
        "logps/chosen": "-142.5",
        "logps/rejected": "-155.8",
        "logits/chosen": "-2.759e-05",
        "logits/rejected": "-0.000115",
        "epoch": "0.25",
        "global_step/max_steps": "1/10",
        "elapsed_time": "0s",
        "remaining_time": "4s",
        "train_speed(s/it)": "0.3918",
    }
    point = interpret_logging_record(record).point
    assert point is not None
    assert point.kind == "train"
    assert point.loss == 0.6931
    assert (point.step, point.max_steps) == (1, 10)
    assert point.values == {
        "loss": 0.6931,
        "grad_norm": 1.068,
        "learning_rate": 9.755e-05,
        "rewards/chosen": 0.0,
        "rewards/rejected": 0.0,
        "rewards/accuracies": 0.0,
        "rewards/margins": 0.0,
        "logps/chosen": -142.5,
        "logps/rejected": -155.8,
        "logits/chosen": -2.759e-05,
        "logits/rejected": -0.000115,
        "epoch": 0.25,
        "train_speed(s/it)": 0.3918,
    }


def test_a_record_with_only_a_global_step_has_no_max_steps() -> None:
    point = interpret_logging_record({"loss": 1.5, "global_step": 3}).point
    assert point is not None
    assert (point.kind, point.step, point.max_steps, point.loss) == ("train", 3, None, 1.5)


@pytest.mark.parametrize(
    "record",
    [{}, {"loss": 1.0}, {"loss": 1.0, "global_step/max_steps": "x/10"}, {"loss": 1.0, "global_step": True}],
)
def test_a_record_without_a_step_means_nothing(record: dict[str, Any]) -> None:
    assert interpret_logging_record(record) == LoggingRecord()


# --- checkpoint_saved ----------------------------------------------------------------------------
def test_a_saved_checkpoint_is_found_in_a_log_line() -> None:
    assert checkpoint_saved(SAVING) == "/x/checkpoint-5"
    assert checkpoint_saved(f"{BAR_2}{SAVING}") == "/x/checkpoint-5"


@pytest.mark.parametrize(
    "line", ["[INFO:swift] last_model_checkpoint: /x/checkpoint-10", "Saving model checkpoint", ""]
)
def test_other_lines_name_no_saved_checkpoint(line: str) -> None:
    assert checkpoint_saved(line) is None


# --- last_error_line and explain_failure -----------------------------------------------------------
TRACEBACK = [
    "[INFO:swift] Start time of running main: 2026-11-22 22:57:35.901903",
    "Traceback (most recent call last):",
    '  File "/venv/lib/python3.11/site-packages/swift/cli/sft.py", line 10, in <module>',
    "    sft_main()",
    '  File "/venv/lib/python3.11/site-packages/swift/llm/argument/base_args.py", line 99, in parse',
    "    raise ValueError(f'remaining_argv: {remaining_argv}')",
    "ValueError: remaining_argv: ['--no_such_flag', '3']",
]


def test_the_exception_line_of_a_traceback_is_picked() -> None:
    assert last_error_line(TRACEBACK) == "ValueError: remaining_argv: ['--no_such_flag', '3']"


def test_the_last_exception_of_a_chained_traceback_is_picked() -> None:
    lines = [
        "Traceback (most recent call last):",
        "KeyError: 'model_type'",
        "",
        "During handling of the above exception, another exception occurred:",
        "",
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in <module>',
        "datasets.exceptions.DatasetGenerationError: An error occurred while generating the dataset",
        "[INFO:swift] cleanup",
    ]
    assert last_error_line(lines) == (
        "datasets.exceptions.DatasetGenerationError: An error occurred while generating the dataset"
    )


@pytest.mark.parametrize(
    "final",
    [
        "modelscope_hub._download_control._DownloadDeadlineError: [E1001] 下载总时限已耗尽；已保存可继续下载的临时文件",
        "Exception: boom",
    ],
)
def test_the_final_exception_wins_over_an_earlier_one_whatever_its_class_name(final: str) -> None:
    lines = [
        "Traceback (most recent call last):",
        "requests.exceptions.ConnectionError: HTTPSConnectionPool(host='modelscope.cn', port=443)",
        "",
        "During handling of the above exception, another exception occurred:",
        "",
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in <module>',
        final,
    ]
    assert last_error_line(lines) == final


def test_without_a_traceback_the_last_error_log_line_is_picked() -> None:
    lines = [
        "[ERROR:swift] Dataset a/b load failed: first try",
        "[ERROR:swift] Dataset a/b load failed: second try",
        "[INFO:swift] giving up",
    ]
    assert last_error_line(lines) == "[ERROR:swift] Dataset a/b load failed: second try"


def test_without_any_error_the_last_non_empty_line_is_picked() -> None:
    assert last_error_line(["first", "  last  ", "", "   "]) == "last"
    assert last_error_line([]) == ""


MODELSCOPE_OFFLINE = [
    "[INFO:swift] Downloading the model from ModelScope Hub, model_id: Qwen/Qwen2.5-0.5B-Instruct",
    "Traceback (most recent call last):",
    '  File "/venv/lib/python3.11/site-packages/modelscope_hub/api.py", line 120, in get_model_files',
    "    raise NetworkError(msg)",
    "modelscope_hub.errors.NetworkError: [E1020] Connection failed: _DownloadHTTPSConnectionPool("
    "host='modelscope.cn', port=443): Max retries exceeded with url: "
    "/api/v1/models/Qwen/Qwen2.5-0.5B-Instruct/repo/files?Revision=master&Recursive=True "
    "(Caused by NameResolutionError(...",
]

HF_OFFLINE_DATASET = [
    "[INFO:swift] Loading dataset AI-ModelScope/alpaca-gpt4-data-zh#500",
    "Traceback (most recent call last):",
    '  File "/venv/lib/python3.11/site-packages/datasets/load.py", line 1800, in dataset_module_factory',
    "    raise ConnectionError(f\"Couldn't reach '{path}' on the Hub ({e.__class__.__name__})\") from e",
    "ConnectionError: Couldn't reach 'AI-ModelScope/alpaca-gpt4-data-zh' on the Hub (OfflineModeIsEnabled)",
]


@pytest.mark.parametrize(
    ("lines", "name"),
    [(MODELSCOPE_OFFLINE, "Qwen/Qwen2.5-0.5B-Instruct"), (HF_OFFLINE_DATASET, "AI-ModelScope/alpaca-gpt4-data-zh")],
)
def test_an_offline_hub_failure_says_what_could_not_be_downloaded(lines: list[str], name: str) -> None:
    message = explain_failure(lines, 1, offline=True)
    assert message == (
        f"Could not download {name} from the model hub: this platform runs offline (FINETUNE_OFFLINE is on), "
        "so nothing can be downloaded. Use a local model folder under an allowed model root, or upload the "
        f"dataset and use its id.\nswift said: {lines[-1]}"
    )


def test_an_online_hub_failure_blames_the_network() -> None:
    message = explain_failure(MODELSCOPE_OFFLINE, 1, offline=False)
    assert message.startswith(
        "Could not download Qwen/Qwen2.5-0.5B-Instruct from the model hub: "
        "the hub could not be reached from this server."
    )


def test_a_hub_failure_without_an_id_names_a_model_or_dataset() -> None:
    lines = [
        "Traceback (most recent call last):",
        "huggingface_hub.errors.LocalEntryNotFoundError: Cannot find an appropriate cached snapshot folder for the "
        "specified revision on the local disk and outgoing traffic has been disabled.",
    ]
    assert explain_failure(lines, 1, offline=True).startswith(
        "Could not download a model or dataset from the model hub"
    )


def test_exit_code_247_is_a_sigkill_probably_out_of_memory() -> None:
    lines = [f"\r{BAR_2}", "[INFO:swift] last words"]
    assert explain_failure(lines, 247, offline=True) == (
        "The training process was killed by SIGKILL (often the out-of-memory killer).\n"
        "Last output: [INFO:swift] last words"
    )


def test_exit_code_241_is_a_sigterm_without_the_memory_hint() -> None:
    assert (
        explain_failure(["bye"], 241, offline=True) == "The training process was killed by SIGTERM.\nLast output: bye"
    )


def test_a_negative_exit_code_names_the_signal() -> None:
    assert explain_failure(["bye"], -9, offline=True) == "swift was killed by SIGKILL.\nLast output: bye"
    assert explain_failure(["bye"], -7, offline=True) == "swift was killed by signal 7.\nLast output: bye"


def test_a_cuda_out_of_memory_error_suggests_smaller_settings() -> None:
    lines = [
        "Traceback (most recent call last):",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.",
    ]
    assert explain_failure(lines, 1, offline=True) == (
        "The GPU ran out of memory: it needed 2.00 GiB more. Lower per_device_train_batch_size (raise "
        "gradient_accumulation_steps to keep the same effective batch) or max_length, turn on "
        "gradient_checkpointing, or train with QLoRA.\n"
        "swift said: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."
    )


def test_a_plain_traceback_reports_the_exit_code_and_the_exception() -> None:
    # TRACEBACK itself (remaining_argv) is explained in plain words now, see test_an_unknown_argument_…
    lines = [*TRACEBACK[:-2], "    return batch['input_ids']", "KeyError: 'input_ids'"]
    assert explain_failure(lines, 1, offline=True) == "swift exited with code 1: KeyError: 'input_ids'"


def test_a_silent_failure_says_so() -> None:
    assert explain_failure([], 2, offline=True) == "swift exited with code 2 without printing an error."


def test_a_modelscope_dataset_download_deadline_is_a_hub_failure() -> None:
    lines = [
        "[ERROR:swift] Dataset AI-ModelScope/alpaca-gpt4-data-zh load failed: subset_name=default,split=train "
        "with error: [E1001] 下载总时限已耗尽",
        "Traceback (most recent call last):",
        '  File "/venv/lib/python3.11/site-packages/modelscope_hub/_download_control.py", line 80, in check',
        "    raise _DownloadDeadlineError(msg)",
        "modelscope_hub._download_control._DownloadDeadlineError: [E1001] 下载总时限已耗尽；已保存可继续下载的临时文件",
    ]
    message = explain_failure(lines, 1, offline=True)
    assert message.startswith("Could not download ")
    assert message.endswith(f"\nswift said: {lines[-1]}")


# --- explain_failure on real swift output ---------------------------------------------------------
# Recorded from ms-swift 4.6.0 (tests/fixtures/swift_outputs/README.md says how); cuda_out_of_memory.log
# is written by hand. Each file starts with "# " header lines (provenance and exit code).
SWIFT_OUTPUTS = Path(__file__).resolve().parents[1] / "fixtures" / "swift_outputs"
RECORDED = sorted(path.stem for path in SWIFT_OUTPUTS.glob("*.log"))


def recorded(case: str) -> tuple[list[str], int]:
    """A recording as the runner sees it (split by LogSplitter, header dropped) and its exit code."""
    raw = (SWIFT_OUTPUTS / f"{case}.log").read_bytes().splitlines(keepends=True)
    header = b"".join(itertools.takewhile(lambda line: line.startswith(b"# "), raw))
    exit_code = re.search(rb"exit code (\d+)", header)
    assert exit_code, f"{case}.log names no exit code in its header"
    splitter = LogSplitter()
    lines = splitter.feed(b"".join(raw)[len(header) :]) + splitter.flush()
    return lines, int(exit_code.group(1))


def explain_recorded(case: str, *, offline: bool = True) -> tuple[str, str]:
    """(plain reason, swift said line) for a recording."""
    lines, exit_code = recorded(case)
    reason, _, said = explain_failure(lines, exit_code, offline=offline).partition("\nswift said: ")
    assert said == last_error_line(lines) or case == "cuda_out_of_memory"
    return reason, said


@pytest.mark.parametrize("case", RECORDED)
def test_every_recorded_failure_gets_a_plain_reason_and_swifts_own_line(case: str) -> None:
    lines, exit_code = recorded(case)
    message = explain_failure(lines, exit_code, offline=True)
    reason, said = message.split("\nswift said: ")
    assert not reason.startswith("swift exited with code")
    assert "\n" not in reason and said


def test_all_rows_too_long_is_explained_with_the_numbers() -> None:
    assert explain_recorded("all_rows_too_long") == (
        "All 40 rows are longer than max_length=128 tokens and were dropped; raise max_length or shorten the rows.",
        "TypeError: 'NoneType' object is not iterable",
    )


def test_all_rows_too_long_after_a_split_counts_training_and_validation_rows() -> None:
    assert explain_recorded("all_rows_too_long_after_split")[0] == (
        "All 40 rows (36 for training, 4 for validation) are longer than max_length=128 tokens and were dropped; "
        "raise max_length or shorten the rows."
    )


def test_all_dpo_rows_too_long_is_explained_the_same_way() -> None:
    assert explain_recorded("dpo_all_rows_too_long")[0] == (
        "All 64 rows are longer than max_length=32 tokens and were dropped; raise max_length or shorten the rows."
    )


def test_the_reported_lines_are_explained_with_max_length_from_the_arguments_dump() -> None:
    lines = [
        "args: SftArguments(",
        "generation_max_length=None,",
        "max_length=128,",
        "[INFO:swift] Dataset filtered, origin length: 40, filtered dataset length: 0",
        "[INFO:swift] train_dataset: None",
        "Traceback (most recent call last):",
        "TypeError: 'NoneType' object is not iterable",
    ]
    assert explain_failure(lines, 1, offline=True) == (
        "All 40 rows are longer than max_length=128 tokens and were dropped; raise max_length or shorten the rows.\n"
        "swift said: TypeError: 'NoneType' object is not iterable"
    )


def test_without_any_max_length_value_the_reason_still_names_the_setting() -> None:
    lines = [
        "[INFO:swift] Dataset filtered, origin length: 7, filtered dataset length: 0",
        "[INFO:swift] train_dataset: None",
        "TypeError: 'NoneType' object is not iterable",
    ]
    assert explain_failure(lines, 1, offline=True).startswith(
        "All 7 rows are longer than the max_length setting and were dropped; raise max_length or shorten the rows."
    )


def test_a_training_split_emptied_while_validation_rows_survive_counts_the_training_rows() -> None:
    lines = [
        "[INFO:swift] max_length: 512",
        "[INFO:swift] Dataset filtered, origin length: 90, filtered dataset length: 0",
        "[INFO:swift] Dataset filtered, origin length: 10, filtered dataset length: 3",
        "[INFO:swift] train_dataset: None",
        "TypeError: 'NoneType' object is not iterable",
    ]
    assert explain_failure(lines, 1, offline=True).startswith(
        "All 90 training rows are longer than max_length=512 tokens and were dropped;"
    )


def test_rows_dropped_only_in_part_or_only_from_validation_are_not_blamed() -> None:
    lines = [
        "[INFO:swift] Dataset filtered, origin length: 64, filtered dataset length: 60",
        "[INFO:swift] Dataset filtered, origin length: 4, filtered dataset length: 0",
        "[INFO:swift] train_dataset: Dataset({",
        "Traceback (most recent call last):",
        "KeyError: 'labels'",
    ]
    assert explain_failure(lines, 1, offline=True) == "swift exited with code 1: KeyError: 'labels'"


def test_rows_swift_could_not_read_are_explained_with_the_first_problem() -> None:
    assert explain_recorded("all_rows_unreadable") == (
        "All 40 rows were dropped because swift could not use them (first problem: AssertionError: message: "
        "{'role': 'robot', 'content': 'beep 0'}); fix the rows or choose another dataset.",
        "ZeroDivisionError: integer division or modulo by zero",
    )


def test_a_split_that_leaves_no_training_rows_says_so() -> None:
    assert explain_recorded("split_leaves_no_training_rows") == (
        "The dataset has too few rows to split off a validation set with split_dataset_ratio=0.1: no rows would "
        "be left for training. Add rows, or set split_dataset_ratio to 0 (or turn evaluation off).",
        "AssertionError",
    )


def test_a_missing_local_dataset_file_is_named() -> None:
    assert explain_recorded("missing_local_dataset")[0] == (
        "The dataset file $LAB/data/nope.jsonl does not exist on the server; upload the dataset again or choose "
        "another one."
    )


def test_a_missing_local_model_folder_is_named() -> None:
    assert explain_recorded("missing_local_model") == (
        "The model folder $LAB/nomodel does not exist on the server; check the model path (a local model must be "
        "a folder under an allowed model root).",
        "ValueError: path: '$LAB/nomodel' not found",
    )


@pytest.mark.parametrize(
    ("case", "name"),
    [("hub_model_offline", "Qwen/Qwen2.5-0.5B-Instruct"), ("hub_dataset_offline", "AI-ModelScope/alpaca-gpt4-data-zh")],
)
def test_a_recorded_hub_id_while_offline_is_named(case: str, name: str) -> None:
    assert explain_recorded(case)[0] == (
        f"Could not download {name} from the model hub: this platform runs offline (FINETUNE_OFFLINE is on), "
        "so nothing can be downloaded. Use a local model folder under an allowed model root, or upload the "
        "dataset and use its id."
    )


def test_an_unmatched_model_type_asks_for_model_type_and_template_and_lists_the_candidates() -> None:
    assert explain_recorded("model_type_not_matched")[0] == (
        "swift cannot tell which model type the local model folder $LAB/tiny-qwen2 is: set model_type (e.g. qwen2) "
        "and template in the training arguments. swift's candidates: qwen2, qwen2_gte."
    )


def test_an_unmatched_model_type_does_not_ask_for_a_template_already_given() -> None:
    lines = [
        "run sh: `python sft.py --model /m --template qwen2_5`",
        "ValueError: Failed to automatically match `model_type` for `/m`. Multiple possible types found: "
        "['qwen2', 'qwen2_gte']. Please specify `model_type` manually.",
    ]
    assert explain_failure(lines, 1, offline=True).startswith(
        "swift cannot tell which model type the local model folder /m is: set model_type (e.g. qwen2) in the "
        "training arguments."
    )


def test_an_unmatched_template_asks_for_a_template_and_lists_the_candidates() -> None:
    assert explain_recorded("template_not_matched")[0] == (
        "swift cannot tell which chat template the local model folder $LAB/tiny-qwen2 uses: set template "
        "(e.g. qwen2_5) in the training arguments. swift's candidates: qwen, qwen2_5, qwen2_5_math, marco_o1, "
        "qwq_preview, qwq, deepseek_r1."
    )


@pytest.mark.parametrize(("case", "setting"), [("unknown_model_type", "model_type"), ("unknown_template", "template")])
def test_a_model_type_or_template_swift_does_not_know_is_named(case: str, setting: str) -> None:
    assert explain_recorded(case)[0] == (
        f"swift does not know the {setting} 'nope'; set {setting} to one that swift supports, or leave it empty "
        "to let swift choose."
    )


def test_a_misspelt_model_type_gets_the_closest_known_ones() -> None:
    lines = ["ValueError: model_type: 'qwen25' not in ['llama', 'qwen2', 'qwen2_5_vl', 'qwen3']"]
    assert explain_failure(lines, 1, offline=True).startswith(
        "swift does not know the model_type 'qwen25' (closest: qwen2, qwen2_5_vl, qwen3);"
    )


def test_a_model_type_transformers_does_not_know_is_explained() -> None:
    assert explain_recorded("model_architecture_unknown_to_transformers")[0] == (
        "The model folder's config.json says model type 'foo', which the installed transformers library does not "
        "support, so the model cannot be loaded; use a model of a supported architecture."
    )


def test_an_unknown_argument_is_named_in_plain_words() -> None:
    assert explain_recorded("unknown_argument") == (
        "swift does not know the argument --no_such_flag; remove it from the training arguments or correct its "
        "spelling.",
        "ValueError: remaining_argv: ['--no_such_flag', '3']",
    )
    assert explain_failure(TRACEBACK, 1, offline=True).startswith("swift does not know the argument --no_such_flag;")


def test_a_renamed_argument_names_its_new_name() -> None:
    assert explain_recorded("renamed_argument")[0] == (
        "swift does not know the argument --train_type (ms-swift 4 calls it --tuner_type); remove it from the "
        "training arguments or correct its spelling."
    )


def test_several_unknown_arguments_are_all_named() -> None:
    lines = ["ValueError: remaining_argv: ['--a', '1', '--b_c', 'x']"]
    assert explain_failure(lines, 1, offline=True).startswith(
        "swift does not know the arguments --a, --b_c; remove them from the training arguments or correct their "
        "spelling."
    )


def test_an_invalid_argument_value_says_what_is_expected() -> None:
    assert explain_recorded("invalid_argument_value") == (
        "The training argument max_length must be a whole number, not 'abc'.",
        "sft.py: error: argument --max_length/--max-length: invalid int value: 'abc'",
    )


def test_a_cuda_out_of_memory_transcript_reports_the_sizes_and_the_other_job() -> None:
    lines, exit_code = recorded("cuda_out_of_memory")
    message = explain_failure(lines, exit_code, offline=True)
    reason, said = message.split("\nswift said: ")
    assert reason == (
        "The GPU ran out of memory: it needed 9.28 GiB more, but the GPU (79.19 GiB in total) had only 1.12 GiB "
        "free, and other processes were using 31.40 GiB of it. Lower per_device_train_batch_size (raise "
        "gradient_accumulation_steps to keep the same effective batch) or max_length, turn on "
        "gradient_checkpointing, or train with QLoRA; and give the task a GPU that no other job is using."
    )
    assert said.startswith("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 9.28 GiB.")


def test_an_older_cuda_out_of_memory_message_reports_the_sizes() -> None:
    lines = [
        "Traceback (most recent call last):",
        "RuntimeError: CUDA out of memory. Tried to allocate 2.26 GiB (GPU 0; 6.00 GiB total capacity; "
        "781.59 MiB already allocated; 3.03 GiB free; 1.24 GiB reserved in total by PyTorch)",
    ]
    assert explain_failure(lines, 1, offline=True).startswith(
        "The GPU ran out of memory: it needed 2.26 GiB more, but the GPU (6.00 GiB in total) had only 3.03 GiB "
        "free. Lower per_device_train_batch_size"
    )


def test_a_cuda_out_of_memory_under_torchrun_quotes_the_memory_error_not_the_launcher() -> None:
    oom = "[rank1]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.00 GiB."
    lines = [
        "Traceback (most recent call last):",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.00 GiB.",
        oom,
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:",
        "  exitcode  : 1 (pid: 4242)",
    ]
    reason, said = explain_failure(lines, 1, offline=True).split("\nswift said: ")
    assert reason.startswith("The GPU ran out of memory: it needed 1.00 GiB more. ")
    assert said == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.00 GiB."


def test_a_kill_by_signal_wins_over_earlier_hub_retries() -> None:
    lines = ["modelscope_hub.errors.NetworkError: retry", f"\r{BAR_2}", "[INFO:swift] last words"]
    assert explain_failure(lines, 247, offline=False).startswith("The training process was killed by SIGKILL")
