"""User-named models and datasets: hub ids pass, paths must stay inside allowed roots; GPU config."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User

from tasks.command import normalize_gpu_config, validate_dataset_specs
from tasks.models import Dataset
from tasks.paths import PathError, ResolvedModel, is_hub_dataset_id, is_hub_id, is_within, resolve_model


@pytest.fixture
def root(tmp_path: Path, settings: Any) -> Path:
    """A fresh model root, set as the only ``FINETUNE_MODEL_ROOTS`` entry."""
    path = tmp_path / "models"
    path.mkdir()
    settings.FINETUNE_MODEL_ROOTS = [path]
    return path


def make_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "qwen2"}')
    return folder


def refusal(value: str, roots: list[Path] | None = None) -> str:
    with pytest.raises(PathError) as caught:
        resolve_model(value, roots)
    return str(caught.value)


# --- resolve_model ---------------------------------------------------------------------------------
def test_a_hub_id_passes_through_to_swift(root: Path) -> None:
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == ResolvedModel(
        source="hub", argument="Qwen/Qwen2.5-0.5B-Instruct"
    )


def test_surrounding_whitespace_is_ignored(root: Path) -> None:
    assert resolve_model("  Qwen/Qwen2.5-7B-Instruct\n") == ResolvedModel(
        source="hub", argument="Qwen/Qwen2.5-7B-Instruct"
    )


def test_an_absolute_path_inside_the_root_is_a_local_model(root: Path) -> None:
    model = make_model(root / "tiny-qwen2")
    assert resolve_model(str(model)) == ResolvedModel(source="local", argument=str(model.resolve()))


def test_a_relative_path_is_looked_up_inside_the_root(root: Path) -> None:
    model = make_model(root / "qwen" / "tiny")
    assert resolve_model("qwen/tiny") == ResolvedModel(source="local", argument=str(model.resolve()))


def test_a_folder_in_the_root_wins_over_the_hub_id_of_the_same_name(root: Path) -> None:
    model = make_model(root / "Qwen" / "Qwen2.5-0.5B-Instruct")
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == ResolvedModel(source="local", argument=str(model.resolve()))


def test_a_dot_slash_path_to_an_existing_folder_in_the_root_is_a_local_model(root: Path) -> None:
    model = make_model(root / "x")
    assert resolve_model("./x") == ResolvedModel(source="local", argument=str(model.resolve()))


def test_a_dot_slash_path_that_does_not_exist_is_refused_not_sent_to_the_hub(root: Path) -> None:
    assert refusal("./x") == f"'./x' is not a folder inside an allowed model root ({root})"


def test_explicit_roots_override_the_setting(root: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-root"
    model = make_model(other / "m")
    assert resolve_model("m", [other]) == ResolvedModel(source="local", argument=str(model.resolve()))
    assert refusal("m") == "'m' is neither a hub id (owner/name) nor a model folder inside an allowed model root"


def test_an_absolute_path_inside_the_second_root_is_a_local_model(tmp_path: Path) -> None:
    first, second = tmp_path / "r1", tmp_path / "r2"
    first.mkdir()
    model = make_model(second / "m")
    assert resolve_model(str(model), [first, second]) == ResolvedModel(source="local", argument=str(model.resolve()))


def test_a_relative_path_inside_the_second_root_is_a_local_model(tmp_path: Path) -> None:
    first, second = tmp_path / "r1", tmp_path / "r2"
    first.mkdir()
    model = make_model(second / "m")
    assert resolve_model("m", [first, second]) == ResolvedModel(source="local", argument=str(model.resolve()))


def test_an_existing_folder_outside_every_root_is_refused(root: Path, tmp_path: Path) -> None:
    outside = make_model(tmp_path / "elsewhere" / "model")
    message = refusal(str(outside))
    assert str(outside) in message
    assert "is not a folder inside an allowed model root" in message


def test_a_missing_absolute_path_is_refused_naming_the_roots(root: Path) -> None:
    assert refusal("/no/such/model") == f"'/no/such/model' is not a folder inside an allowed model root ({root})"


def test_a_missing_absolute_path_says_when_no_root_is_configured(settings: Any) -> None:
    settings.FINETUNE_MODEL_ROOTS = []
    assert refusal("/no/such/model") == (
        "'/no/such/model' is not a folder inside an allowed model root (none configured (set FINETUNE_MODEL_ROOTS))"
    )


@pytest.mark.parametrize("value", ["../x", "a/../../x", "models/../../etc"])
def test_a_path_with_dot_dot_is_refused(root: Path, value: str) -> None:
    (root.parent / "x").mkdir()
    assert refusal(value) == "the model path must not contain '..'"


def test_an_absolute_path_with_dot_dot_back_into_the_root_is_refused(root: Path) -> None:
    model = make_model(root / "m")
    assert refusal(f"{root}/../models/{model.name}") == "the model path must not contain '..'"


def test_a_symlink_inside_the_root_that_points_outside_is_refused(root: Path, tmp_path: Path) -> None:
    outside = make_model(tmp_path / "secret-model")
    (root / "link").symlink_to(outside, target_is_directory=True)
    assert refusal("link") == "the model folder 'link' resolves outside the allowed model roots"
    assert (
        refusal(str(root / "link"))
        == f"the model folder {str(root / 'link')!r} resolves outside the allowed model roots"
    )


def test_a_symlink_inside_the_root_that_stays_inside_is_followed(root: Path) -> None:
    model = make_model(root / "real")
    (root / "alias").symlink_to(model, target_is_directory=True)
    assert resolve_model("alias") == ResolvedModel(source="local", argument=str(model.resolve()))


def test_a_file_instead_of_a_folder_is_refused(root: Path) -> None:
    (root / "weights.bin").write_bytes(b"\0" * 8)
    assert refusal("weights.bin") == "'weights.bin' is not a model folder"
    assert refusal(str(root / "weights.bin")) == f"{str(root / 'weights.bin')!r} is not a model folder"


def test_a_name_that_is_neither_a_hub_id_nor_a_folder_is_refused(root: Path) -> None:
    assert refusal("just-a-name") == (
        "'just-a-name' is neither a hub id (owner/name) nor a model folder inside an allowed model root"
    )


@pytest.mark.parametrize("value", ["", "   ", None])
def test_an_empty_model_name_is_refused(root: Path, value: Any) -> None:
    assert refusal(value) == ("name a base model: a hub id such as Qwen/Qwen2.5-7B-Instruct or a local model folder")


@pytest.mark.parametrize("value", ["Qwen/Qwen\x002.5", "Qwen/\tQwen", "a\nb/c", "Qwen/Qwen\x7f"])
def test_control_characters_are_refused(root: Path, value: str) -> None:
    assert refusal(value) == "the model name contains control characters"


@pytest.mark.parametrize("value", ["-rf", "--model", " -h"])
def test_a_leading_dash_is_refused(root: Path, value: str) -> None:
    assert refusal(value) == "the model name must not start with '-'"


@pytest.mark.parametrize(
    "value", ["https://modelscope.cn/Qwen/Qwen2.5", "Qwen/Qwen2.5/extra", "Qwen", "Qwen/..", "Qwen/Qwen 2.5"]
)
def test_strings_that_are_not_hub_ids_are_refused(root: Path, value: str) -> None:
    with pytest.raises(PathError):
        resolve_model(value)


def test_an_overlong_name_is_refused_with_a_path_error(root: Path) -> None:
    # Longer than a file name may be: the lookup in the root must not crash with OSError.
    assert refusal("a" * 300) == "the model name is too long"


# --- built-in models -------------------------------------------------------------------------------
def test_a_builtin_model_resolves_to_its_folder_in_the_data_folder_before_it_is_built(
    root: Path, settings: Any, tmp_path: Path
) -> None:
    settings.BUILTIN_MODELS_DIR = tmp_path / "builtin-models"
    assert resolve_model(" builtin:tiny-qwen2 ") == ResolvedModel(
        source="local", argument=str(tmp_path / "builtin-models" / "tiny-qwen2")
    )
    assert not (tmp_path / "builtin-models").exists()  # built at launch, not when a task is created


@pytest.mark.parametrize(
    "value", ["builtin:../x", "builtin:nope", "builtin:", "builtin:Tiny-Qwen2", "builtin:tiny-qwen2/../x",
              "builtin:/etc"]
)
def test_an_unknown_builtin_model_is_refused_naming_the_known_ones(root: Path, value: str) -> None:
    assert refusal(value) == f"{value!r} is not a built-in model (built-in models: builtin:tiny-qwen2)"


def test_a_folder_named_like_a_builtin_model_in_a_root_does_not_shadow_it(root: Path, settings: Any) -> None:
    make_model(root / "builtin:tiny-qwen2")
    assert resolve_model("builtin:tiny-qwen2").argument == str(settings.BUILTIN_MODELS_DIR / "tiny-qwen2")


# --- hub ids ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    [
        "AI-ModelScope/alpaca-gpt4-data-zh#500",
        "AI-ModelScope/alpaca-gpt4-data-zh",
        "owner/name:subset#10",
        "owner/name:subset",
        "swift/self-cognition:default/train#1000",
    ],
)
def test_a_hub_dataset_id_is_recognised(value: str) -> None:
    assert is_hub_dataset_id(value) is True


@pytest.mark.parametrize(
    "value",
    [
        "https://x/y",
        "../a/b",
        "a/b#0",
        "a/b#-1",
        "a/b#",
        "/abs/path",
        "a/b/c",
        "a",
        "a/b:../../etc",
        "a/b:x/../../y",
        "a/b c",
        "-a/b",
        "",
    ],
)
def test_a_string_that_is_not_a_hub_dataset_id_is_rejected(value: str) -> None:
    assert is_hub_dataset_id(value) is False


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Qwen/Qwen2.5-0.5B-Instruct", True),
        ("Qwen/Qwen2.5-0.5B-Instruct#5", False),
        ("a..b/c", False),
        ("a/" + "b" * 96, True),
        ("a/" + "b" * 97, False),
    ],
)
def test_a_hub_model_id_is_owner_slash_name_only(value: str, expected: bool) -> None:
    assert is_hub_id(value) is expected


def test_is_within_follows_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    (root / "escape").symlink_to(tmp_path / "outside")
    assert is_within(root / "inside" / "file", root) is True
    assert is_within(root / "escape" / "file", root) is False
    assert is_within(root / ".." / "outside", root) is False


# --- validate_dataset_specs --------------------------------------------------------------------------
def make_dataset(owner: User, name: str = "chat") -> Dataset:
    return Dataset.objects.create(
        owner=owner,
        name=name,
        original_filename=f"{name}.jsonl",
        path=f"/data/workspaces/{owner.pk}/datasets/{name}.jsonl",
        file_type="jsonl",
        format="messages",
        rows=10,
        size_bytes=1234,
    )


def dataset_refusal(owner_id: int, specs: Any) -> str:
    with pytest.raises(PathError) as caught:
        validate_dataset_specs(owner_id, specs)
    return str(caught.value)


def test_an_own_dataset_id_is_accepted_as_an_int_or_a_digit_string(alice: User) -> None:
    first, second = make_dataset(alice, "one"), make_dataset(alice, "two")
    assert validate_dataset_specs(alice.pk, [first.pk, str(second.pk), f" {first.pk} "]) == [
        first.pk,
        second.pk,
        first.pk,
    ]


def test_a_single_spec_is_wrapped_in_a_list(alice: User) -> None:
    dataset = make_dataset(alice)
    assert validate_dataset_specs(alice.pk, dataset.pk) == [dataset.pk]
    assert validate_dataset_specs(alice.pk, "AI-ModelScope/alpaca-gpt4-data-zh#500") == [
        "AI-ModelScope/alpaca-gpt4-data-zh#500"
    ]


def test_another_users_dataset_does_not_exist_for_you(alice: User, bob: User) -> None:
    bobs = make_dataset(bob)
    assert dataset_refusal(alice.pk, [bobs.pk]) == f"dataset {bobs.pk} does not exist"
    assert dataset_refusal(alice.pk, [str(bobs.pk)]) == f"dataset {bobs.pk} does not exist"


def test_a_dataset_id_that_was_never_created_does_not_exist(alice: User) -> None:
    assert dataset_refusal(alice.pk, [999_999]) == "dataset 999999 does not exist"


def test_hub_dataset_ids_are_accepted_and_stripped(db: None) -> None:
    # The syntax, for a trusted owner; which repositories others may name: tests/tasks/test_hub_policy.py.
    specs = ["AI-ModelScope/alpaca-gpt4-data-zh#500", " owner/name:subset#10 "]
    assert validate_dataset_specs(1, specs, hub_trusted=True) == [
        "AI-ModelScope/alpaca-gpt4-data-zh#500",
        "owner/name:subset#10",
    ]


def test_a_builtin_dataset_is_accepted(db: None) -> None:
    assert validate_dataset_specs(1, ["builtin:smoke_sft"]) == ["builtin:smoke_sft"]


@pytest.mark.parametrize("value", ["builtin:nope", "builtin:../smoke_sft", "builtin:Smoke_SFT", "builtin:"])
def test_an_unknown_builtin_dataset_is_refused(db: None, value: str) -> None:
    assert dataset_refusal(1, [value]) == f"{value!r} is not a built-in dataset"


@pytest.mark.parametrize("value", ["/etc/passwd", "../x.jsonl", "~/x", "./data.jsonl", "a\\b", "owner/../x"])
def test_a_local_path_is_refused_in_favour_of_an_upload(db: None, value: str) -> None:
    assert dataset_refusal(1, [value]) == (
        f"{value!r}: local files cannot be named by path; upload the file and use its dataset id"
    )


@pytest.mark.parametrize("value", ["https://x/y", "a/b#0", "just-a-name"])
def test_a_string_that_is_not_a_hub_id_is_refused(db: None, value: str) -> None:
    assert dataset_refusal(1, [value]) == (
        f"{value!r} is not a hub dataset id (owner/name, optionally #N for N samples)"
    )


@pytest.mark.parametrize("value", [True, False])
def test_a_bool_is_not_a_dataset(db: None, value: bool) -> None:
    assert dataset_refusal(1, [value]) == f"{value!r} is not a dataset"


@pytest.mark.parametrize("value", [1.5, None, {"id": 1}, ["a/b"]])
def test_other_json_values_are_not_dataset_ids(db: None, value: Any) -> None:
    assert dataset_refusal(1, [value]) == f"{value!r} is not a dataset id"


@pytest.mark.parametrize("specs", [[], None, True, {"id": 1}])
def test_no_datasets_at_all_is_refused(db: None, specs: Any) -> None:
    assert dataset_refusal(1, specs) == "give at least one dataset: an uploaded dataset id or a hub dataset id"


def test_more_than_32_datasets_are_refused(db: None) -> None:
    assert dataset_refusal(1, ["a/b"] * 33) == "at most 32 datasets per task"
    assert validate_dataset_specs(1, ["a/b"] * 32, hub_trusted=True) == ["a/b"] * 32


@pytest.mark.parametrize("value", ["\u00b2", "\u0663"])
def test_a_non_ascii_digit_string_is_refused_with_a_path_error(db: None, value: str) -> None:
    # "²".isdigit() is True but int("²") fails; callers only catch PathError.
    with pytest.raises(PathError):
        validate_dataset_specs(1, [value])


# --- normalize_gpu_config --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"cuda_visible_devices": "0,1"}, {"devices": "0,1"}),
        ({"gpu_id": "0"}, {"devices": "0"}),
        ({"gpu_id": 0}, {"devices": "0"}),
        ({"gpu_ids": [2, 3]}, {"devices": "2,3"}),
        ({"devices": [0, 1]}, {"devices": "0,1"}),
        ({"devices": "0, 1"}, {"devices": "0,1"}),
        ({"devices": "GPU-5d0c2f1a-1234-abcd"}, {"devices": "GPU-5d0c2f1a-1234-abcd"}),
        ({"count": 2}, {"count": 2}),
        ({"cpu": True}, {"cpu": True}),
        ({"cpu": False}, {}),
        ({"devices": "1", "min_memory_gb": 20}, {"devices": "1", "min_memory_gb": 20}),
        ({"count": 1, "min_memory_gb": 7.5}, {"count": 1, "min_memory_gb": 7.5}),
        ({"devices": ""}, {}),
        ({}, {}),
        (None, {}),
        ("", {}),
    ],
)
def test_gpu_config_spellings_are_normalised(raw: Any, expected: dict[str, Any]) -> None:
    assert normalize_gpu_config(raw) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"gpus": 2}, "unknown key(s): gpus"),
        ({"zz": 1, "aa": 2, "count": 1}, "unknown key(s): aa, zz"),
        ({"devices": "0;rm -rf"}, 'devices must look like "0" or "0,1" (GPU indices or UUIDs)'),
        ({"devices": "0,,1"}, 'devices must look like "0" or "0,1" (GPU indices or UUIDs)'),
        ({"devices": "-1"}, 'devices must look like "0" or "0,1" (GPU indices or UUIDs)'),
        ({"gpu_id": True}, 'devices must look like "0" or "0,1" (GPU indices or UUIDs)'),
        ({"devices": {"a": 1}}, 'devices must look like "0" or "0,1" (GPU indices or UUIDs)'),
        ({"count": 0}, "count must be a whole number from 1 to 64"),
        ({"count": 65}, "count must be a whole number from 1 to 64"),
        ({"count": "2"}, "count must be a whole number from 1 to 64"),
        ({"count": True}, "count must be a whole number from 1 to 64"),
        ({"count": 1.5}, "count must be a whole number from 1 to 64"),
        ({"count": 2, "devices": "0,1"}, "give either devices or count, not both"),
        ({"cpu": True, "devices": "0"}, "a CPU task cannot also ask for GPUs"),
        ({"cpu": True, "count": 1}, "a CPU task cannot also ask for GPUs"),
        ({"cpu": "yes"}, "cpu must be true or false"),
        ({"min_memory_gb": -1}, "min_memory_gb must be a number of GiB between 0 and 4096"),
        ({"min_memory_gb": 0}, "min_memory_gb must be a number of GiB between 0 and 4096"),
        ({"min_memory_gb": 5000}, "min_memory_gb must be a number of GiB between 0 and 4096"),
        ({"min_memory_gb": "8"}, "min_memory_gb must be a number of GiB between 0 and 4096"),
        ({"min_memory_gb": float("nan")}, "min_memory_gb must be a number of GiB between 0 and 4096"),
    ],
)
def test_a_bad_gpu_config_is_refused_with_a_reason(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        normalize_gpu_config(raw)


@pytest.mark.parametrize("raw", [["0", "1"], "0,1", 2])
def test_a_gpu_config_that_is_not_an_object_is_refused(raw: Any) -> None:
    with pytest.raises(ValueError, match=r"^must be an object such as"):
        normalize_gpu_config(raw)


def test_a_dataset_id_too_big_for_the_database_does_not_exist(alice: User) -> None:
    assert dataset_refusal(alice.pk, ["9" * 30]) == f"dataset {'9' * 30} does not exist"
