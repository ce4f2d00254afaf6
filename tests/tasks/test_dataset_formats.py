import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from tasks.dataset_formats import (
    DatasetFormat,
    DatasetInfo,
    DatasetValidationError,
    detect_row_format,
    validate_dataset_file,
)

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
}
ALPACA = {"instruction": "Translate to French", "input": "cat", "output": "chat"}
QUERY = {"query": "2+2?", "response": "4", "system": "Math tutor", "history": [["1+1?", "2"]]}
PREFERENCE_QUERY = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
PREFERENCE_MESSAGES = {
    "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    "rejected_response": "5",
}
TEXT = {"text": "Once upon a time."}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def error_for(path: Path, **limits: int) -> DatasetValidationError:
    with pytest.raises(DatasetValidationError) as caught:
        validate_dataset_file(path, **limits)
    return caught.value


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (CHAT, DatasetFormat.MESSAGES),
        (ALPACA, DatasetFormat.ALPACA),
        (QUERY, DatasetFormat.QUERY_RESPONSE),
        (PREFERENCE_QUERY, DatasetFormat.PREFERENCE),
        (PREFERENCE_MESSAGES, DatasetFormat.PREFERENCE),
        (TEXT, DatasetFormat.TEXT),
    ],
)
def test_each_format_is_detected_in_jsonl_with_the_right_row_count(
    tmp_path: Path, row: dict[str, Any], expected: DatasetFormat
) -> None:
    info = validate_dataset_file(write_jsonl(tmp_path / "data.jsonl", [row] * 3))
    assert info == DatasetInfo(format=expected, rows=3, file_type="jsonl", columns=tuple(sorted(row)))


def test_a_json_array_is_read_and_its_errors_are_numbered_by_row(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps([ALPACA, ALPACA], indent=2), encoding="utf-8")
    assert validate_dataset_file(path) == DatasetInfo(
        DatasetFormat.ALPACA, 2, "json", ("input", "instruction", "output")
    )
    path.write_text(json.dumps([ALPACA, ALPACA, ALPACA, ["not", "a", "row"]], indent=2), encoding="utf-8")
    assert str(error_for(path)) == "row 4: expected a JSON object, got list"


def test_a_json_file_with_one_object_per_line_is_accepted(tmp_path: Path) -> None:
    info = validate_dataset_file(write_jsonl(tmp_path / "data.json", [TEXT, TEXT]))
    assert (info.format, info.rows, info.file_type) == (DatasetFormat.TEXT, 2, "json")


def test_a_json_file_holding_a_single_pretty_printed_object_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(TEXT, indent=2), encoding="utf-8")
    error = error_for(path)
    assert error.line is None
    assert "JSON array" in error.reason


def test_broken_json_array_syntax_reports_the_physical_line(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"}\n  {"text": "c"}\n]\n', encoding="utf-8")
    error = error_for(path)
    assert (error.line, error.unit) == (4, "line")
    assert error.reason.startswith("invalid JSON (Expecting ',' delimiter")


def test_a_csv_file_is_read_with_empty_cells_treated_as_missing(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text(
        'instruction,input,output\nSay hi,,Hi\n"Multi\nline",x,y\n,,\nAdd,1 and 2,3\n', encoding="utf-8"
    )
    info = validate_dataset_file(path)
    assert info == DatasetInfo(DatasetFormat.ALPACA, 3, "csv", ("input", "instruction", "output"))


def test_csv_errors_report_the_line_where_the_row_starts(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text('query,response\n"two\nlines",ok\n\n,missing query\n', encoding="utf-8")
    error = error_for(path)
    assert str(error) == "line 5: the 'query' field is missing"


def test_a_csv_row_with_more_cells_than_the_header_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\nhello,extra\n", encoding="utf-8")
    assert str(error_for(path)) == "line 3: the row has more cells than the header has columns"


def test_an_unclosed_csv_quote_reports_the_line_where_the_row_starts(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text('text\nfine\n"never closed\nmore text\n', encoding="utf-8")
    error = error_for(path)
    assert error.line == 3
    assert error.reason.startswith("malformed CSV")


def test_the_conversations_key_is_accepted_as_messages(tmp_path: Path) -> None:
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    info = validate_dataset_file(write_jsonl(tmp_path / "data.jsonl", [{"conversations": CHAT["messages"]}]))
    assert (info.format, info.columns) == (DatasetFormat.MESSAGES, ("conversations",))
    assert detect_row_format(sharegpt) is DatasetFormat.MESSAGES


def test_blank_lines_are_skipped_but_still_count_for_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(f"\n{json.dumps(TEXT)}\n   \n\n{json.dumps(TEXT)}\n\n", encoding="utf-8")
    assert validate_dataset_file(path).rows == 2
    path.write_text(f"\n{json.dumps(TEXT)}\n\n{json.dumps({'text': ''})}\n", encoding="utf-8")
    assert str(error_for(path)) == "line 4: 'text' is empty"


def test_invalid_json_on_line_3_reports_line_3(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(f'{json.dumps(TEXT)}\n{json.dumps(TEXT)}\n{{"text": "a" "b"}}\n', encoding="utf-8")
    error = error_for(path)
    assert error.line == 3
    assert str(error) == "line 3: invalid JSON (Expecting ',' delimiter at column 14)"
    assert "Traceback" not in str(error)


def test_a_row_that_is_not_an_object_is_rejected(tmp_path: Path) -> None:
    error = error_for(write_jsonl(tmp_path / "data.jsonl", [TEXT, [1, 2]]))
    assert str(error) == "line 2: expected a JSON object, got list"


def test_mixed_formats_report_the_first_line_that_differs(tmp_path: Path) -> None:
    error = error_for(write_jsonl(tmp_path / "data.jsonl", [CHAT, CHAT, ALPACA]))
    assert error.line == 3
    assert "row is in 'alpaca' format but the file started as 'messages'" in str(error)


def test_a_conversation_without_an_assistant_turn_is_rejected(tmp_path: Path) -> None:
    row = {"messages": [{"role": "user", "content": "Hi"}]}
    error = error_for(write_jsonl(tmp_path / "data.jsonl", [CHAT, row]))
    assert error.line == 2
    assert "no assistant message" in error.reason


def test_an_unknown_role_is_named_in_the_error() -> None:
    with pytest.raises(ValueError, match="message 1 in 'messages' has the unknown role \"bot\""):
        detect_row_format({"messages": [{"role": "bot", "content": "Hi"}]})


def test_identical_chosen_and_rejected_responses_are_rejected(tmp_path: Path) -> None:
    rows = [PREFERENCE_QUERY] * 6 + [{"prompt": "2+2?", "chosen": "4", "rejected": "4"}]
    error = error_for(write_jsonl(tmp_path / "data.jsonl", rows))
    assert str(error).startswith("line 7: rejected is identical to the chosen response")
    same = {**PREFERENCE_MESSAGES, "rejected_response": "4"}
    with pytest.raises(ValueError, match="rejected_response is identical to the chosen response"):
        detect_row_format(same)


def test_a_preference_conversation_must_end_with_the_assistant() -> None:
    row = {"messages": [{"role": "user", "content": "2+2?"}], "rejected_response": "5"}
    with pytest.raises(ValueError, match="last message in 'messages' must be the assistant"):
        detect_row_format(row)


def test_a_row_matching_no_format_names_its_fields() -> None:
    with pytest.raises(ValueError, match=r"unrecognised row \(fields: answer, question\)"):
        detect_row_format({"question": "q", "answer": "a"})


@pytest.mark.parametrize(
    ("name", "content"),
    [("data.jsonl", "\n\n"), ("data.csv", "text\n"), ("data.json", "[]"), ("data.json", "")],
)
def test_a_file_without_rows_is_rejected(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    error = error_for(path)
    assert (error.line, str(error)) == (None, "the file contains no rows")


def test_an_unsupported_suffix_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("hello", encoding="utf-8")
    assert str(error_for(path)) == "unsupported file type '.txt': upload .jsonl, .json or .csv"


def test_invalid_utf8_is_reported_with_its_line(tmp_path: Path) -> None:
    for name in ("data.jsonl", "data.json", "data.csv"):
        path = tmp_path / name
        header = b"text\n" if name.endswith(".csv") else b""
        path.write_bytes(header + b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
        error = error_for(path)
        assert error.line == (3 if header else 2)
        assert "not valid UTF-8" in error.reason


def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps(TEXT).encode() + b"\n")
    assert validate_dataset_file(jsonl).rows == 1
    csv_file = tmp_path / "data.csv"
    csv_file.write_text("text\nhello\n", encoding="utf-8-sig")
    assert validate_dataset_file(csv_file).columns == ("text",)


def test_exceeding_max_rows_is_rejected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [TEXT] * 5)
    assert validate_dataset_file(path, max_rows=5).rows == 5
    assert str(error_for(path, max_rows=4)) == "the file has more than 4 rows"


def test_exceeding_max_bytes_is_rejected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [TEXT] * 5)
    assert str(error_for(path, max_bytes=10)) == "the file is larger than 10 bytes"
    path.write_bytes(b" " * (3 * 1024 * 1024))
    assert str(error_for(path, max_bytes=2 * 1024 * 1024)) == "the file is larger than 2 MB"


def test_validation_errors_survive_pickling() -> None:
    error = pickle.loads(pickle.dumps(DatasetValidationError(4, "bad", "row")))
    assert (error.line, error.reason, error.unit, str(error)) == (4, "bad", "row", "row 4: bad")
