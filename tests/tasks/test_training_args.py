"""The allow-list of training arguments: validation, normalisation and rendering into argv."""

from __future__ import annotations

from typing import Any

import pytest

from core.swift_cli.training_args import (
    RESERVED_ARGS,
    TRAINING_ARGS,
    TrainingArgsError,
    training_args_catalogue,
    training_args_to_argv,
    validate_training_args,
)


def errors_for(raw: Any) -> dict[str, str]:
    with pytest.raises(TrainingArgsError) as caught:
        validate_training_args(raw)
    return caught.value.errors


# --- accepted values, one per kind -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"max_steps": 100}, {"max_steps": 100}),  # int
        ({"learning_rate": 2e-4}, {"learning_rate": 2e-4}),  # float
        ({"gradient_checkpointing": False}, {"gradient_checkpointing": False}),  # bool
        ({"torch_dtype": "bfloat16"}, {"torch_dtype": "bfloat16"}),  # choice
        ({"system": "You are a helpful assistant."}, {"system": "You are a helpful assistant."}),  # text
        ({"model_type": "qwen2"}, {"model_type": "qwen2"}),  # name
        ({"target_modules": ["q_proj", "v_proj"]}, {"target_modules": ["q_proj", "v_proj"]}),  # names
    ],
)
def test_a_good_value_of_every_kind_is_accepted_unchanged(raw: dict[str, Any], expected: dict[str, Any]) -> None:
    assert validate_training_args(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"max_steps": "100"}, {"max_steps": 100}),
        ({"max_steps": " 100 "}, {"max_steps": 100}),
        ({"max_steps": 100.0}, {"max_steps": 100}),
        ({"learning_rate": "0.0002"}, {"learning_rate": 0.0002}),
        ({"gradient_checkpointing": "True"}, {"gradient_checkpointing": True}),
        ({"gradient_checkpointing": "false"}, {"gradient_checkpointing": False}),
        ({"target_modules": "all-linear"}, {"target_modules": ["all-linear"]}),
        ({"target_modules": "q_proj  v_proj"}, {"target_modules": ["q_proj", "v_proj"]}),
    ],
)
def test_strings_from_a_form_are_normalised_to_their_kind(raw: dict[str, Any], expected: dict[str, Any]) -> None:
    result = validate_training_args(raw)
    assert result == expected
    for key, value in expected.items():
        assert type(result[key]) is type(value)


def test_every_allowed_argument_together_is_accepted() -> None:
    raw = {
        "num_train_epochs": 2,
        "max_steps": 10,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2,
        "gradient_accumulation_steps": 4,
        "learning_rate": 1e-4,
        "warmup_ratio": 0.05,
        "warmup_steps": 0,
        "weight_decay": 0.1,
        "logging_steps": 1,
        "save_steps": 5,
        "eval_steps": 5,
        "save_total_limit": 2,
        "split_dataset_ratio": 0.1,
        "max_length": 256,
        "lora_rank": 8,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "target_modules": "all-linear",
        "gradient_checkpointing": True,
        "torch_dtype": "float32",
        "system": "Be brief.",
        "model_author": "Alice",
        "model_name": "Helper",
        "dataloader_num_workers": 0,
        "seed": 42,
        "model_type": "qwen2",
        "template": "qwen2_5",
        "beta": 0.1,
        "rpo_alpha": 1.0,
        "deepspeed": "zero2",
    }
    assert set(raw) == set(TRAINING_ARGS)
    assert validate_training_args(raw) == {**raw, "target_modules": ["all-linear"]}


@pytest.mark.parametrize("raw", [None, "", {}])
def test_no_training_arguments_give_an_empty_dict(raw: Any) -> None:
    assert validate_training_args(raw) == {}


def test_training_args_that_are_not_an_object_are_refused() -> None:
    assert errors_for(["learning_rate", 1e-4]) == {"training_args": "must be an object of argument names to values"}


def test_none_values_are_skipped() -> None:
    assert validate_training_args({"max_steps": None, "learning_rate": 1e-4, "system": None}) == {"learning_rate": 1e-4}


# --- unknown keys and wrong types --------------------------------------------------------------------
def test_an_unknown_key_is_refused_under_its_own_name() -> None:
    assert errors_for({"learning_rate": 1e-4, "fsdp": "full_shard"}) == {"fsdp": "is not an allowed training argument"}


def test_every_bad_key_is_reported_at_once() -> None:
    assert errors_for({"foo": 1, "lora_rank": 0, "output_dir": "/tmp"}) == {
        "foo": "is not an allowed training argument",
        "lora_rank": "must be at least 1",
        "output_dir": f"cannot be set: {RESERVED_ARGS['output_dir']}",
    }


def test_the_error_message_joins_every_reason() -> None:
    with pytest.raises(TrainingArgsError) as caught:
        validate_training_args({"foo": 1, "lora_rank": 0})
    assert str(caught.value) == "foo: is not an allowed training argument; lora_rank: must be at least 1"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"max_steps": "abc"}, "'abc' is not a number"),
        ({"learning_rate": [1e-4]}, "must be a number, not list"),
        ({"max_steps": True}, "must be a number, not bool"),
        ({"learning_rate": {"value": 1}}, "must be a number, not dict"),
        ({"max_steps": "-5"}, "must not start with '-'"),
    ],
)
def test_a_value_of_the_wrong_type_for_a_number_is_refused(raw: dict[str, Any], message: str) -> None:
    assert errors_for(raw) == {next(iter(raw)): message}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"gradient_checkpointing": 1}, "must be true or false"),
        ({"gradient_checkpointing": "yes"}, "must be true or false"),
        ({"torch_dtype": "int8"}, "must be one of: bfloat16, float16, float32"),
        ({"deepspeed": ["zero2"]}, "must be one of: zero2, zero3"),
        ({"system": 42}, "must be a string, not int"),
        ({"system": "x" * 4001}, "must be at most 4000 characters"),
        ({"system": "a\x00b"}, "must not contain NUL characters"),
        ({"model_type": "qwen 2"}, "may contain only letters, digits, '_', '.', and '-'"),
        ({"template": "../qwen"}, "may contain only letters, digits, '_', '.', and '-'"),
        ({"model_type": "q" * 101}, "must be at most 100 characters"),
        ({"target_modules": []}, "must be a name or a non-empty list of names"),
        ({"target_modules": ""}, "must be a name or a non-empty list of names"),
        ({"target_modules": {"q_proj": 1}}, "must be a name or a non-empty list of names"),
        ({"target_modules": ["q_proj", 3]}, "must be a string, not int"),
        ({"target_modules": ["q_proj", "v proj/x"]}, "may contain only letters, digits, '_', '.', and '-'"),
        ({"target_modules": [f"m{i}" for i in range(65)]}, "at most 64 names"),
    ],
)
def test_a_bad_value_for_a_non_number_is_refused(raw: dict[str, Any], message: str) -> None:
    assert errors_for(raw) == {next(iter(raw)): message}


# --- ranges and numbers ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"learning_rate": 5}, "must be at most 1"),
        ({"learning_rate": 0}, "must be at least 1e-10"),
        ({"lora_rank": 0}, "must be at least 1"),
        ({"warmup_ratio": -0.1}, "must be at least 0"),
        ({"split_dataset_ratio": 0.6}, "must be at most 0.5"),
        ({"per_device_train_batch_size": 4097}, "must be at most 4096"),
        ({"seed": 2**31}, "must be at most 2.14748e+09"),
    ],
)
def test_a_number_out_of_range_is_refused(raw: dict[str, Any], message: str) -> None:
    assert errors_for(raw) == {next(iter(raw)): message}


def test_the_bounds_themselves_are_allowed() -> None:
    assert validate_training_args({"learning_rate": 1.0, "warmup_ratio": 0.0, "lora_rank": 1, "seed": 2**31 - 1}) == {
        "learning_rate": 1.0,
        "warmup_ratio": 0.0,
        "lora_rank": 1,
        "seed": 2**31 - 1,
    }


@pytest.mark.parametrize("value", [2.5, "2.5"])
def test_a_fraction_for_a_whole_number_argument_is_refused(value: Any) -> None:
    assert errors_for({"max_steps": value}) == {"max_steps": f"must be a whole number, not {value!r}"}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", "inf", "Infinity", "1e400"])
def test_nan_and_infinity_are_refused(value: Any) -> None:
    assert errors_for({"learning_rate": value}) == {"learning_rate": "must be a finite number"}


def test_a_huge_whole_number_is_refused_as_out_of_range_not_crashed_on() -> None:
    # JSON integers have no size limit; one too big for a float must still give a clean error.
    assert errors_for({"max_steps": 10**400}) == {"max_steps": "must be at most 1e+07"}


def test_a_negative_zero_is_accepted_only_if_it_renders_without_a_dash() -> None:
    # JSON ``-0.0`` parses to a negative zero; it is not below the minimum 0, so validation must not
    # hand back something that renders as "-0.0" (which argv rendering then refuses as a flag).
    try:
        clean = validate_training_args({"warmup_ratio": -0.0})
    except TrainingArgsError as exc:
        assert list(exc.errors) == ["warmup_ratio"]
        return
    assert training_args_to_argv(clean) == ["--warmup_ratio", "0.0"]


# --- flag smuggling and reserved keys -------------------------------------------------------------
def test_a_text_value_that_looks_like_a_flag_is_refused() -> None:
    assert errors_for({"system": "--output_dir x"}) == {
        "system": "must not start with '-' (it would be read as a flag)"
    }


def test_a_target_module_that_looks_like_a_flag_is_refused() -> None:
    assert errors_for({"target_modules": ["q_proj", "-x"]}) == {
        "target_modules": "must not start with '-' (it would be read as a flag)"
    }


def test_a_name_value_that_looks_like_a_flag_is_refused() -> None:
    assert errors_for({"template": "-qwen"}) == {"template": "must not start with '-' (it would be read as a flag)"}


@pytest.mark.parametrize(("key", "name"), [("--learning_rate", "learning_rate"), ("-seed", "seed")])
def test_a_key_written_with_dashes_is_refused(key: str, name: str) -> None:
    assert errors_for({key: 1e-4}) == {key: f"write argument names without dashes (use {name!r})"}


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("output_dir", "the output directory is chosen by the server; use output_name for a label"),
        ("model", "set the base model with the base_model field"),
        ("dataset", "set datasets with the datasets field"),
        ("resume_from_checkpoint", "resume a stopped task instead"),
        ("check_model", "the platform sets it from FINETUNE_OFFLINE"),
        ("tuner_type", "set it with the train_type field"),
        ("train_type", "set it with the train_type field"),
        ("rlhf_type", "set it with the task_type field"),
        ("add_version", "the platform manages output folders"),
    ],
)
def test_a_reserved_key_is_refused_with_the_reason(key: str, reason: str) -> None:
    assert errors_for({key: "x"}) == {key: f"cannot be set: {reason}"}


def test_a_reserved_key_is_refused_even_with_a_none_value() -> None:
    assert errors_for({"output_dir": None}) == {"output_dir": f"cannot be set: {RESERVED_ARGS['output_dir']}"}


# --- aliases ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("alias", "canonical"), [("max_seq_length", "max_length"), ("lora_r", "lora_rank")])
def test_a_seed_spelling_is_normalised_to_the_swift_name(alias: str, canonical: str) -> None:
    assert validate_training_args({alias: 64}) == {canonical: 64}


def test_an_error_on_an_alias_is_keyed_by_the_spelling_the_user_wrote() -> None:
    assert errors_for({"lora_r": 0}) == {"lora_r": "must be at least 1"}


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"max_length": 512, "max_seq_length": 1024}, "max_seq_length"),
        ({"max_seq_length": 512, "max_length": 1024}, "max_length"),
        ({"lora_rank": 8, "lora_r": 16}, "lora_r"),
    ],
)
def test_both_spellings_at_once_are_an_error(raw: dict[str, Any], key: str) -> None:
    canonical = "lora_rank" if key.startswith("lora") else "max_length"
    assert errors_for(raw) == {key: f"given twice (also as {canonical!r})"}


def test_both_spellings_with_one_of_them_none_is_not_an_error() -> None:
    assert validate_training_args({"max_seq_length": None, "max_length": 512}) == {"max_length": 512}


# --- argv ---------------------------------------------------------------------------------------------
def test_argv_lists_flags_in_allow_list_order_with_each_value_its_own_element() -> None:
    clean = validate_training_args(
        {
            "seed": 7,
            "target_modules": ["q_proj", "v_proj"],
            "gradient_checkpointing": False,
            "learning_rate": 0.0002,
            "num_train_epochs": 2,
            "system": "Answer in French, please.",
            "lora_r": 16,
            "torch_dtype": "bfloat16",
        }
    )
    assert training_args_to_argv(clean) == [
        "--num_train_epochs", "2",
        "--learning_rate", "0.0002",
        "--lora_rank", "16",
        "--target_modules", "q_proj", "v_proj",
        "--gradient_checkpointing", "false",
        "--torch_dtype", "bfloat16",
        "--system", "Answer in French, please.",
        "--seed", "7",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "argv"),
    [
        ({"gradient_checkpointing": True}, ["--gradient_checkpointing", "true"]),
        ({"gradient_checkpointing": False}, ["--gradient_checkpointing", "false"]),
        ({"learning_rate": 1e-05}, ["--learning_rate", "1e-05"]),
        ({"learning_rate": 0.1}, ["--learning_rate", "0.1"]),
        ({"num_train_epochs": 3.0}, ["--num_train_epochs", "3.0"]),
        ({"lora_alpha": 32}, ["--lora_alpha", "32"]),
        ({"target_modules": ["all-linear"]}, ["--target_modules", "all-linear"]),
        ({}, []),
    ],
)
def test_values_are_rendered_as_swift_reads_them(args: dict[str, Any], argv: list[str]) -> None:
    assert training_args_to_argv(args) == argv


def test_keys_outside_the_allow_list_never_reach_argv() -> None:
    assert training_args_to_argv({"output_dir": "/tmp/evil", "seed": 1}) == ["--seed", "1"]


@pytest.mark.parametrize(
    ("args", "key"),
    [
        ({"system": "--output_dir /tmp/x"}, "system"),
        ({"target_modules": ["q_proj", "-x"]}, "target_modules"),
        ({"model_type": "-h"}, "model_type"),
        ({"warmup_ratio": -0.5}, "warmup_ratio"),
        ({"system": "a\x00b"}, "system"),
    ],
)
def test_argv_refuses_a_value_starting_with_a_dash_even_if_validation_was_bypassed(
    args: dict[str, Any], key: str
) -> None:
    with pytest.raises(TrainingArgsError) as caught:
        training_args_to_argv(args)
    assert caught.value.errors == {key: "must not start with '-'"}


# --- catalogue ------------------------------------------------------------------------------------
def test_the_catalogue_lists_every_key_in_allow_list_order_with_type_and_group() -> None:
    catalogue = training_args_catalogue()
    assert [entry["name"] for entry in catalogue] == list(TRAINING_ARGS)
    for entry in catalogue:
        spec = TRAINING_ARGS[entry["name"]]
        assert entry["type"] == spec.kind
        assert entry["group"] == spec.group
        assert entry["type"] in {"int", "float", "bool", "choice", "text", "name", "names"}
        assert entry["group"] in {"common", "advanced"}
        assert set(entry) == {
            "name", "type", "minimum", "maximum", "choices", "default", "unit", "group", "aliases", "help"
        }  # fmt: skip


def test_the_catalogue_describes_an_argument_completely() -> None:
    by_name = {entry["name"]: entry for entry in training_args_catalogue()}
    assert by_name["max_length"] == {
        "name": "max_length",
        "type": "int",
        "minimum": 16,
        "maximum": 1_048_576,
        "choices": [],
        "default": None,
        "unit": "tokens",
        "group": "common",
        "aliases": ["max_seq_length"],
        "help": "Longest sample in tokens; longer ones are truncated.",
    }
    assert by_name["torch_dtype"]["choices"] == ["bfloat16", "float16", "float32"]
    assert by_name["torch_dtype"]["group"] == "advanced"
    assert by_name["lora_rank"]["aliases"] == ["lora_r"]
    assert by_name["learning_rate"]["default"] == 1e-4


def test_no_reserved_key_is_also_allowed() -> None:
    assert not set(RESERVED_ARGS) & set(TRAINING_ARGS)
    aliases = {alias for entry in training_args_catalogue() for alias in entry["aliases"]}
    assert not aliases & set(RESERVED_ARGS)


def test_a_system_prompt_that_swift_would_open_as_a_file_is_refused_with_why() -> None:
    with pytest.raises(TrainingArgsError) as refused:
        validate_training_args({"system": "/srv/platform/secret_key.txt"})
    assert "system" in refused.value.errors and ".txt" in str(refused.value.errors["system"])
    # A prompt that merely mentions a file is text, and stays as it is.
    assert validate_training_args({"system": "Answer from notes.txt and be brief."}) == {
        "system": "Answer from notes.txt and be brief."}
