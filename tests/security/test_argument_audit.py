"""The audit of the allow-listed swift arguments (review M1; docs/security.md, "Arguments that read
files"): for each argument a user may set, how swift 4.6 treats its value, and what the platform
does about it.

* **path**: swift opens the value as a file (``system`` ending in ``.txt``: ``TemplateArguments``;
  ``deepspeed``: ``json_parse_to_dict`` opens *any* existing path). Refused, or restricted to values
  that name no file.
* **name**: a key of one of swift's registries (``MODEL_MAPPING``, ``TEMPLATE_MAPPING``) or a module
  name; never opened. The name check refuses ``/`` and a leading ``.`` anyway.
* **text**: free text swift only substitutes into prompts or data; never opened.
* **choice** / **number** / **bool**: a closed set or a typed number; nothing to open.

A new argument in a catalogue fails :func:`test_every_allow_listed_argument_is_audited` until it is
classified here (and in the table of docs/security.md).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from core.swift_cli.training_args import (
    TRAINING_ARGS,
    ArgSpec,
    TrainingArgsError,
    training_args_to_argv,
    validate_training_args,
)
from deployments.command import DEPLOY_ARGS, deploy_args_to_argv, validate_deploy_args
from tasks.command import build_export_argv
from tests.conftest import REPO

#: The audit: argument → classification (see the module docstring).
TRAINING_AUDIT: dict[str, str] = {
    **{key: "number" for key, spec in TRAINING_ARGS.items() if spec.kind in ("int", "float")},
    "gradient_checkpointing": "bool",
    "torch_dtype": "choice",
    "target_modules": "name",
    "model_type": "name",
    "template": "name",
    "system": "path",
    "model_author": "text",
    "model_name": "text",
    "deepspeed": "path",
}
DEPLOY_AUDIT: dict[str, str] = {
    **{key: "number" for key, spec in DEPLOY_ARGS.items() if spec.kind in ("int", "float")},
    "vllm_enforce_eager": "bool",
    "torch_dtype": "choice",
    "model_type": "name",
    "template": "name",
    "system": "path",
}
CATALOGUES = {"training": (TRAINING_ARGS, TRAINING_AUDIT), "deploy": (DEPLOY_ARGS, DEPLOY_AUDIT)}

#: Values that look like (or are) paths of files on the worker.
PATH_VALUES = ["/etc/passwd", "/etc/hostname.txt", "../../data/secret_key", "secret.txt", "notes.TXT", " x.txt ",
               "ds_config.json", "/tmp/x.yaml", "config.yml", "data.jsonl", "./zero2", "~/.netrc"]


def validate(catalogue: str, raw: dict[str, Any]) -> dict[str, Any]:
    return validate_training_args(raw) if catalogue == "training" else validate_deploy_args(raw)


def refusal(catalogue: str, raw: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(TrainingArgsError) as caught:
        validate(catalogue, raw)
    return caught.value.errors


def argv(catalogue: str, args: dict[str, Any]) -> list[str]:
    return training_args_to_argv(args) if catalogue == "training" else deploy_args_to_argv(args)


def audited(classification: str) -> list[tuple[str, str]]:
    return [(catalogue, key) for catalogue, (_, audit) in CATALOGUES.items()
            for key, kind in audit.items() if kind == classification]


@pytest.mark.parametrize("catalogue", CATALOGUES)
def test_every_allow_listed_argument_is_audited(catalogue: str) -> None:
    specs, audit = CATALOGUES[catalogue]
    assert set(audit) == set(specs), "classify the new argument here and in docs/security.md"
    for key, kind in audit.items():
        spec = specs[key]
        if kind == "path":  # restricted: a suffix refused, or a closed set of values
            assert spec.file_suffix or spec.kind == "choice", key
        elif kind in ("name", "choice", "bool"):
            assert spec.kind in {"name": ("name", "names"), "choice": ("choice",), "bool": ("bool",)}[kind], key
        elif kind == "text":
            assert spec.kind == "text" and not spec.file_suffix, key


def test_an_export_takes_no_user_argument_at_all() -> None:
    assert list(inspect.signature(build_export_argv).parameters) == ["checkpoint", "output_dir"]


# --- path: refused ------------------------------------------------------------------------------------
SYSTEM_FILES = ["/etc/hostname.txt", "secret.txt", "../../x.txt", "notes.TXT", " x.txt ", "x.txt\n", "a b.Txt"]


@pytest.mark.parametrize("catalogue", CATALOGUES)
@pytest.mark.parametrize("value", SYSTEM_FILES)
def test_a_system_prompt_that_swift_would_read_as_a_file_is_refused_naming_system(catalogue: str, value: str) -> None:
    errors = refusal(catalogue, {"system": value})
    assert list(errors) == ["system"] and "path of a file" in errors["system"]


@pytest.mark.parametrize("catalogue", CATALOGUES)
@pytest.mark.parametrize("value", ["You are a helpful assistant.", "Answer yes/no, see notes.txt first.",
                                   "Reply in .txt format", "/etc/passwd", "C:\\prompt.md"])
def test_a_system_prompt_that_swift_keeps_as_text_is_accepted_verbatim(catalogue: str, value: str) -> None:
    """swift opens only a value that *ends* in ``.txt``; anything else is the prompt itself, slashes
    and all (``/etc/passwd`` is the text "/etc/passwd")."""
    assert validate(catalogue, {"system": value}) == {"system": value}
    assert argv(catalogue, {"system": value}) == ["--system", value]


@pytest.mark.parametrize("value", [*PATH_VALUES, "zero2.json", "/opt/swift/config/zero3.json",
                                   '{"zero_optimization": {}}', "zero2_offload", "ZERO2", ["zero2"], {"stage": 2}])
def test_deepspeed_is_only_one_of_swifts_own_configurations(value: Any) -> None:
    """swift turns ``zero2``/``zero3`` into its own JSON file and opens any other value that names an
    existing path (``json_parse_to_dict``)."""
    errors = refusal("training", {"deepspeed": value})
    assert list(errors) == ["deepspeed"] and "must be one of: zero2, zero3" in errors["deepspeed"]


@pytest.mark.parametrize("value", ["zero2", "zero3"])
def test_deepspeed_accepts_swifts_own_configurations(value: str) -> None:
    assert training_args_to_argv(validate_training_args({"deepspeed": value})) == ["--deepspeed", value]


# --- name: registry keys, with no path characters ------------------------------------------------------
@pytest.mark.parametrize(("catalogue", "key"), audited("name"))
@pytest.mark.parametrize("value", ["/etc/passwd", "../../data/secret_key", "a/b", "./zero2", "~/.netrc", ".hidden",
                                   "C:\\model", "a/b c"])
def test_a_registry_name_with_path_characters_is_refused_naming_the_argument(
    catalogue: str, key: str, value: str
) -> None:
    errors = refusal(catalogue, {key: value})
    assert list(errors) == [key] and "letters, digits" in errors[key]


@pytest.mark.parametrize(("catalogue", "key", "value"), [
    ("training", "model_type", "qwen2"), ("training", "template", "qwen2_5"),
    ("training", "target_modules", "all-linear"), ("training", "target_modules", ["q_proj", "v_proj"]),
    ("deploy", "model_type", "llama3_2"),
    ("deploy", "template", "qwen2_5"),
])
def test_a_registry_name_is_accepted(catalogue: str, key: str, value: Any) -> None:
    clean = validate(catalogue, {key: value})
    assert key in clean
    assert all(not item.startswith("-") for item in argv(catalogue, clean)[1:])


# --- text: never opened, kept verbatim --------------------------------------------------------------
@pytest.mark.parametrize(("catalogue", "key"), audited("text"))
@pytest.mark.parametrize("value", ["Xiao Huang", "/etc/passwd", "secret.txt", "模型"])
def test_self_cognition_text_is_substituted_never_opened_so_any_text_is_kept(
    catalogue: str, key: str, value: str
) -> None:
    assert validate(catalogue, {key: value}) == {key: value}
    assert argv(catalogue, {key: value}) == [f"--{key}", value]


# --- choice, number, bool: path-looking values are simply not of the type -----------------------------
@pytest.mark.parametrize(("catalogue", "key"), audited("choice") + audited("number") + audited("bool"))
@pytest.mark.parametrize("value", ["/etc/passwd", "x.txt", "../1"])
def test_a_typed_argument_refuses_a_path_naming_the_argument(catalogue: str, key: str, value: str) -> None:
    assert list(refusal(catalogue, {key: value})) == [key]


@pytest.mark.parametrize(("catalogue", "key"), [(c, k) for c, (specs, _) in CATALOGUES.items() for k in specs])
def test_every_argument_accepts_a_normal_value_and_renders_no_flag_like_value(catalogue: str, key: str) -> None:
    spec: ArgSpec = CATALOGUES[catalogue][0][key]
    value = {"int": spec.minimum, "float": spec.maximum, "bool": True, "choice": (spec.choices or (None,))[0],
             "text": "plain text", "name": "qwen2", "names": ["q_proj"]}[spec.kind]
    if spec.kind == "int":
        value = int(value)
    clean = validate(catalogue, {key: value})
    rendered = argv(catalogue, clean)
    assert rendered[0] == f"--{spec.flag or key}"
    assert all(not item.startswith("-") for item in rendered[1:])


# --- the argv swift's command line reads before its own parser ------------------------------------------
def test_the_word_after_the_subcommand_is_always_a_platform_flag(tmp_path: Path, settings: Any) -> None:
    """``swift <cmd> x.json|x.yaml`` loads that file as a whole configuration (``parse_yaml_args``
    in swift/cli/main.py): the argv's first word after the subcommand must be the platform's own flag."""
    from deployments.command import build_argv as deploy_argv
    from deployments.models import Deployment
    from tasks.command import build_argv as train_argv
    from tasks.models import FinetuningTask

    settings.FINETUNE_SWIFT_BIN = "swift"
    model = tmp_path / "model"
    model.mkdir()
    for task_type in ("sft", "pt", "dpo"):
        task = FinetuningTask(owner_id=1, name="t", task_type=task_type, base_model=str(model), model_source="local",
                              model_path=str(model), datasets=["builtin:smoke_sft"],
                              training_args={"system": "x.json", "model_type": "qwen2"})
        words = train_argv(task, output_dir=tmp_path / "out")
        assert words[2].startswith("--"), words  # --model, or --rlhf_type for preference training
    deployment = Deployment(owner_id=1, name="d", model_path=str(model), served_model_name="d",
                            deploy_args={"system": "x.yaml"})
    words = deploy_argv(deployment, port=8000, api_key="k", gpu_count=0)
    assert words[1] == "deploy" and words[2].startswith("--")
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    words = build_export_argv(checkpoint=checkpoint, output_dir=tmp_path / "merged")
    assert words[1] == "export" and words[2].startswith("--")


# --- the installed swift: which allow-listed arguments it opens -------------------------------------------
_OPENERS = re.compile(
    r"(?:open|os\.path\.(?:isfile|exists|isdir)|json_parse_to_dict|safe_load|json\.load|read_text|Path)"
    r"\(\s*(?:self|args)\.(\w+)"
)


def _swift_package() -> Path | None:
    found = sorted((REPO / ".venv-swift" / "lib").glob("python3*/site-packages/swift"))
    return found[0] if found else None


@pytest.mark.skipif(_swift_package() is None, reason="the swift venv is not installed")
def test_the_installed_swift_opens_no_allow_listed_argument_the_audit_calls_safe() -> None:
    """Scan swift's sources for ``open(self.<arg>``, ``json_parse_to_dict(self.<arg>`` and the like:
    every allow-listed argument found must be classified "path". (A swift upgrade that starts
    opening, say, ``template`` fails here.)"""
    package = _swift_package()
    assert package is not None
    opened: set[str] = set()
    for source in package.rglob("*.py"):
        opened |= set(_OPENERS.findall(source.read_text(encoding="utf-8", errors="replace")))
    allowed = set(TRAINING_AUDIT) | set(DEPLOY_AUDIT)
    paths = {key for audit in (TRAINING_AUDIT, DEPLOY_AUDIT) for key, kind in audit.items() if kind == "path"}
    assert opened & allowed == paths
