"""GPU discovery (fake and NVML without a driver), memory estimates and placement rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.swift_cli.estimate import estimate_memory_gb, parameters_from_config
from gpus.inventory import discover, discover_nvml, parse_fake_gpus
from gpus.placement import GpuSlot, HostState, Placement, Request, impossible_reason, place, take


def test_the_fake_backend_reports_the_configured_cards_with_stable_uuids(settings: Any) -> None:
    settings.FINETUNE_GPU_BACKEND = "fake"
    settings.FINETUNE_FAKE_GPUS = "2x80,24"
    first, second = discover(), discover()
    assert first.backend == "fake" and first.error == ""
    assert [(g.index, g.memory_total_mb) for g in first.gpus] == [(0, 80 * 1024), (1, 80 * 1024), (2, 24 * 1024)]
    assert [g.uuid for g in first.gpus] == [g.uuid for g in second.gpus]
    assert len({g.uuid for g in first.gpus}) == 3 and all(g.uuid.startswith("GPU-") for g in first.gpus)


def test_fake_uuids_differ_between_hosts() -> None:
    assert parse_fake_gpus("1x80", "host-a")[0].uuid != parse_fake_gpus("1x80", "host-b")[0].uuid


def test_a_json_fake_inventory_names_the_cards() -> None:
    gpus = parse_fake_gpus(json.dumps([{"name": "H200", "memory_gb": 141}]), "h")
    assert gpus[0].name == "H200 141GB" and gpus[0].memory_total_mb == 141 * 1024


def test_a_malformed_fake_inventory_is_reported_not_raised(settings: Any) -> None:
    settings.FINETUNE_GPU_BACKEND = "fake"
    settings.FINETUNE_FAKE_GPUS = "lots"
    result = discover()
    assert result.gpus == [] and "FINETUNE_FAKE_GPUS is malformed" in result.error


def test_a_host_without_an_nvidia_driver_shows_no_gpus_and_the_reason() -> None:
    # This machine (and CI) has no NVIDIA driver; on a GPU host this test documents the other path.
    result = discover_nvml()
    if result.gpus:
        pytest.skip("an NVIDIA GPU is present; the no-driver path cannot be observed here")
    assert result.backend == "nvml" and "NVML" in result.error


@pytest.mark.gpu
def test_nvml_lists_real_gpus_with_uuids() -> None:
    result = discover_nvml()
    if not result.gpus:
        pytest.skip(f"no NVIDIA GPU here ({result.error})")
    assert all(g.uuid.startswith("GPU-") and g.memory_total_mb > 0 for g in result.gpus)


# --- memory estimates -------------------------------------------------------------------------
@pytest.mark.parametrize(("train_type", "low", "high"), [("lora", 17, 22), ("qlora", 8, 12), ("full", 70, 82)])
def test_a_7b_hub_model_matches_ms_swifts_own_figures(train_type: str, low: float, high: float) -> None:
    gb = estimate_memory_gb(
        model_source="hub",
        model_path="Qwen/Qwen2.5-7B-Instruct",
        base_model="Qwen/Qwen2.5-7B-Instruct",
        train_type=train_type,
        training_args={},
    )
    assert gb is not None and low <= gb <= high


def test_the_estimate_scales_with_size_and_doubles_weights_in_float32() -> None:
    def est(name: str, **args: Any) -> float:
        value = estimate_memory_gb(
            model_source="hub", model_path=name, base_model=name, train_type="lora", training_args=args
        )
        assert value is not None
        return value

    assert est("Qwen/Qwen2.5-72B-Instruct") > 8 * est("Qwen/Qwen2.5-7B-Instruct")
    assert est("Qwen/Qwen2.5-0.5B-Instruct") < 5
    assert est("Qwen/Qwen2.5-7B-Instruct", torch_dtype="float32") > est("Qwen/Qwen2.5-7B-Instruct") + 15


def test_an_unknown_size_gives_no_estimate() -> None:
    assert (
        estimate_memory_gb(
            model_source="hub", model_path="org/mystery", base_model="org/mystery", train_type="lora", training_args={}
        )
        is None
    )


def test_a_local_models_size_comes_from_its_config(tmp_path: Path) -> None:
    config = {
        "hidden_size": 3584,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "intermediate_size": 18944,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    }
    assert 7.0e9 < parameters_from_config(config) < 8.0e9  # Qwen2.5-7B has 7.6 B
    (tmp_path / "config.json").write_text(json.dumps(config))
    gb = estimate_memory_gb(
        model_source="local", model_path=str(tmp_path), base_model="x", train_type="lora", training_args={}
    )
    assert gb is not None and 17 <= gb <= 23


# --- placement -----------------------------------------------------------------------------------
def host(
    name: str, memories_gb: list[int], *, free: list[int] | None = None, cpu: int = 0, start: int = 0
) -> HostState:
    gpus = [
        GpuSlot(id=start + i, host=name, index=i, uuid=f"GPU-{name}-{i}", memory_total_mb=m * 1024)
        for i, m in enumerate(memories_gb)
    ]
    free_ids = {g.id for g in gpus} if free is None else {start + i for i in free}
    return HostState(name=name, gpus=gpus, free_gpu_ids=free_ids, cpu_slots=cpu, free_cpu_slots=list(range(cpu)))


def test_a_request_is_parsed_from_gpu_config_and_the_estimate() -> None:
    assert Request.from_task({"cpu": True}, 20) == Request(kind="cpu")
    assert Request.from_task({"devices": "0,1"}, 20) == Request(
        kind="gpu", count=2, devices=("0", "1"), min_memory_mb=20 * 1024
    )
    assert Request.from_task({"count": 2, "min_memory_gb": 40}, 20).min_memory_mb == 40 * 1024
    assert Request.from_task({}, None) == Request(kind="auto")


def test_best_fit_picks_the_host_with_the_fewest_free_gpus_that_fits() -> None:
    hosts = [host("big", [80] * 8), host("small", [80] * 2, start=100)]
    assert place(Request(kind="gpu", count=2), hosts) == Placement(host="small", gpu_ids=(100, 101))
    assert place(Request(kind="gpu", count=4), hosts).host == "big"


def test_all_gpus_of_a_task_are_on_one_host() -> None:
    hosts = [host("a", [80, 80], free=[0]), host("b", [80, 80], free=[1], start=10)]
    assert place(Request(kind="gpu", count=2), hosts) is None


def test_specific_devices_are_honoured_and_busy_ones_wait() -> None:
    hosts = [host("a", [80, 80, 80], free=[0, 2])]
    assert place(Request(kind="gpu", count=2, devices=("0", "2")), hosts) == Placement(host="a", gpu_ids=(0, 2))
    assert place(Request(kind="gpu", count=2, devices=("0", "1")), hosts) is None
    by_uuid = Request(kind="gpu", count=1, devices=("GPU-a-2",))
    assert place(by_uuid, hosts) == Placement(host="a", gpu_ids=(2,))


def test_memory_needs_skip_small_cards_and_prefer_the_smallest_that_fits() -> None:
    hosts = [host("a", [24, 80, 48])]
    assert place(Request(kind="gpu", count=1, min_memory_mb=40 * 1024), hosts) == Placement(host="a", gpu_ids=(2,))


def test_cpu_requests_take_a_cpu_slot_and_auto_prefers_gpus() -> None:
    hosts = [host("laptop", [], cpu=2), host("gpu", [80], start=10)]
    assert place(Request(kind="cpu"), hosts) == Placement(host="laptop", cpu_slot=0)
    assert place(Request(kind="auto"), hosts) == Placement(host="gpu", gpu_ids=(10,))
    only_cpu = [host("laptop", [], cpu=1)]
    assert place(Request(kind="auto"), only_cpu) == Placement(host="laptop", cpu_slot=0)


def test_taking_a_placement_removes_it_from_the_snapshot() -> None:
    hosts = [host("a", [80, 80], cpu=1)]
    first = place(Request(kind="gpu", count=2), hosts)
    take(first, hosts)
    assert place(Request(kind="gpu", count=1), hosts) is None
    take(place(Request(kind="cpu"), hosts), hosts)
    assert place(Request(kind="cpu"), hosts) is None


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        (Request(kind="gpu", count=9), "asks for 9 GPUs but the largest host has 8"),
        (Request(kind="gpu", count=1, min_memory_mb=200 * 1024), "largest GPU has 80 GiB"),
        (Request(kind="gpu", count=1, devices=("12",)), "devices 12 do not exist"),
        (Request(kind="cpu"), "no host offers CPU slots"),
    ],
)
def test_impossible_requests_say_why(request_: Request, fragment: str) -> None:
    reason = impossible_reason(request_, [host("a", [80] * 8)])
    assert reason is not None and fragment in reason


def test_possible_or_undecidable_requests_have_no_reason() -> None:
    assert impossible_reason(Request(kind="gpu", count=8), [host("a", [80] * 8, free=[])]) is None  # busy ≠ impossible
    assert impossible_reason(Request(kind="gpu", count=99), []) is None  # no host known yet
