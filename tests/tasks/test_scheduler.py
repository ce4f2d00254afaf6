"""The dispatcher: order, backfill and its anti-starvation fence, reservations and their release,
specific devices, several hosts, queue operations and the queue API."""

from __future__ import annotations

import random
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from deployments.services import deployment_create, deployment_stop
from gpus import supervisor
from gpus.models import Gpu, Lane, Reservation, Run, RunKind, RunStatus
from gpus.scheduler import dispatch, worker_queue
from gpus.services import gpu_set_enabled, reservations_release_orphans
from gpus.supervisor import Supervisor, requeue_stranded
from gpus.workloads import Outcome
from tasks import services
from tasks.models import ExportStatus, FinetuningTask, TaskStatus
from tests.conftest import announce_host
from tests.deployments.test_services_and_api import make_task as finished_lora_task

ARGS = {"max_steps": 2, "model_type": "qwen2", "template": "qwen2_5"}


@pytest.fixture(autouse=True)
def _every_priority_for_users(settings: Any) -> None:
    """The queue order over the whole 0-10 range; that only staff may go above
    FINETUNE_USER_MAX_PRIORITY is tested in tests/accounts/test_quotas.py."""
    settings.FINETUNE_USER_MAX_PRIORITY = 10


def create(owner: User, model: Path, *, gpu: dict[str, Any] | None = None, priority: int = 5,
           name: str = "t") -> FinetuningTask:
    return services.finetuning_task_create(
        owner=owner, name=name, base_model=str(model), datasets=["builtin:smoke_sft"], training_args=ARGS,
        gpu_config=gpu if gpu is not None else {"count": 1}, priority=priority,
    )


_RUN_STATUS = {TaskStatus.COMPLETED: RunStatus.SUCCEEDED, TaskStatus.FAILED: RunStatus.FAILED,
               TaskStatus.STOPPED: RunStatus.STOPPED}


def claim(task: FinetuningTask) -> bool:
    """What a worker's claim does, on whichever host the task's run was placed (``supervisor.claim``
    claims only on this process's host): the run is running under a supervisor, and so is the task."""
    if not Run.objects.filter(pk=task.run_id, status=RunStatus.QUEUED).update(
        status=RunStatus.RUNNING, runner_instance=f"test-{task.run_id}", started_at=timezone.now()
    ):
        return False
    FinetuningTask.objects.filter(pk=task.pk, status=TaskStatus.QUEUED).update(status=TaskStatus.RUNNING)
    return True


def run(task: FinetuningTask) -> None:
    assert claim(task)


def end(task: FinetuningTask, status: str = TaskStatus.COMPLETED) -> None:
    """What the supervisor does when the process exits: one transaction ends the run (releasing its
    own reservations) and gives the task its final status."""
    Supervisor(Run.objects.get(pk=task.run_id)).end(
        Outcome(_RUN_STATUS[status], exit_code=0 if status == TaskStatus.COMPLETED else 1)
    )


def held_gpus(task: FinetuningTask) -> list[int]:
    return sorted(Reservation.objects.filter(run=task.run_id, gpu__isnull=False).values_list("gpu__index", flat=True))


def status_of(task: FinetuningTask) -> str:
    task.refresh_from_db()
    return task.status


@pytest.fixture
def owner(alice: User) -> User:
    # A few earlier runs, so that run ids differ from task ids: dispatch() returns run ids.
    Run.objects.bulk_create([Run(kind="train", subject_id=0, owner=alice, status=RunStatus.SUCCEEDED)
                             for _ in range(3)])
    return alice


# --- order and backfill ------------------------------------------------------------------------
def test_tasks_start_by_priority_then_arrival_one_gpu_at_a_time(owner: User, local_model: Path) -> None:
    announce_host(spec="1x80")
    first = create(owner, local_model, priority=5, name="first")
    assert dispatch() == [first.run_id]
    b, c, d, e = (create(owner, local_model, priority=p, name=f"p{p}") for p in (1, 9, 5, 9))
    assert dispatch() == []  # the only GPU is taken
    order = []
    running = first
    for _ in range(4):
        run(running)
        end(running)
        started = dispatch()
        assert len(started) == 1
        order += started
        running = FinetuningTask.objects.get(run_id=started[0])
    assert order == [c.run_id, e.run_id, d.run_id, b.run_id]
    assert [FinetuningTask.objects.get(run_id=pk).priority for pk in order] == [9, 9, 5, 1]


def test_a_small_task_backfills_past_a_blocked_big_one_which_still_starts(
    owner: User, local_model: Path
) -> None:
    announce_host(spec="2x80")
    a = create(owner, local_model, gpu={"count": 1}, name="a")
    assert dispatch() == [a.run_id]
    big = create(owner, local_model, gpu={"count": 2}, priority=9, name="big")
    small = create(owner, local_model, gpu={"count": 1}, priority=1, name="small")
    assert dispatch() == [small.run_id]  # big cannot fit; small backfills onto the free GPU
    assert status_of(big) == TaskStatus.PENDING and held_gpus(small) in ([0], [1])
    run(a)
    run(small)
    end(a)
    end(small)
    assert dispatch() == [big.run_id]
    assert held_gpus(big) == [0, 1]


def test_a_blocked_task_that_waited_too_long_gets_its_gpus_fenced(
    owner: User, local_model: Path, settings: Any
) -> None:
    settings.FINETUNE_BACKFILL_MAX_WAIT_SECONDS = 60
    announce_host(spec="2x80", cpu=1)
    a = create(owner, local_model, gpu={"count": 1}, name="a")
    assert dispatch() == [a.run_id]
    run(a)
    big = create(owner, local_model, gpu={"count": 2}, priority=9, name="big")
    FinetuningTask.objects.filter(pk=big.pk).update(created_at=timezone.now() - timedelta(seconds=61))
    Run.objects.filter(pk=big.run_id).update(created_at=timezone.now() - timedelta(seconds=61))
    small = create(owner, local_model, gpu={"count": 1}, priority=1, name="small")
    on_cpu = create(owner, local_model, gpu={"cpu": True}, priority=1, name="cpu")
    # The free GPU is kept for big; what big can never use (the CPU slot) is still handed out.
    assert dispatch() == [on_cpu.run_id]
    assert status_of(small) == TaskStatus.PENDING
    end(a)
    assert dispatch() == [big.run_id]
    assert held_gpus(big) == [0, 1] and status_of(small) == TaskStatus.PENDING
    run(big)
    end(big)
    assert dispatch() == [small.run_id]


# --- lanes: deployments first, then training, then exports on a CPU slot ---------------------------
def test_a_waiting_deployment_is_placed_before_a_waiting_task_of_higher_priority(
    owner: User, local_model: Path
) -> None:
    announce_host(spec="1x80")
    urgent = create(owner, local_model, priority=10, name="urgent")  # first come, and the highest priority
    deployment = deployment_create(owner=owner, name="chat", model="fake-model", gpu_config={"count": 1})
    assert Run.objects.get(pk=deployment.run_id).lane == Lane.DEPLOY
    assert Run.objects.get(pk=urgent.run_id).lane == Lane.TRAIN
    assert dispatch() == [deployment.run_id]  # the deployment lane is served first
    deployment.refresh_from_db()
    assert deployment.host == settings.FINETUNE_HOST and deployment.run.status == RunStatus.QUEUED
    assert list(Reservation.objects.filter(gpu__isnull=False).values_list("run_id", flat=True)) == [
        deployment.run_id]
    assert status_of(urgent) == TaskStatus.PENDING and held_gpus(urgent) == []
    deployment_stop(deployment=deployment)  # not started yet: stops at once, its GPU is free
    assert dispatch() == [urgent.run_id] and held_gpus(urgent) == [0]


def test_an_export_books_a_cpu_slot_and_waits_while_none_is_free(owner: User, local_model: Path) -> None:
    host = announce_host(spec="1x80", cpu=1)
    trained = finished_lora_task(owner, checkpoints=(6,))
    (Path(trained.last_checkpoint) / "trainer_state.json").write_text("{}")
    on_cpu = create(owner, local_model, gpu={"cpu": True}, name="on the cpu")
    assert dispatch() == [on_cpu.run_id]  # the host's only CPU slot is taken
    export = services.task_export_create(task=trained)
    run_row = Run.objects.get(pk=export.run_id)
    assert (run_row.kind, run_row.subject_id, run_row.lane) == (RunKind.EXPORT, export.pk, Lane.CPU)
    on_gpu = create(owner, local_model, gpu={"count": 1}, name="on the gpu")
    # The export never takes a GPU: it waits for a CPU slot while the GPU goes to the training run.
    assert dispatch() == [on_gpu.run_id]
    export.refresh_from_db()
    assert export.status == ExportStatus.PENDING and export.run.status == RunStatus.PENDING
    assert not Reservation.objects.filter(run=export.run_id).exists()

    later = create(owner, local_model, gpu={"cpu": True}, priority=0, name="later on the cpu")
    run(on_cpu)
    end(on_cpu)
    # The freed slot goes to training first (its lane comes before exports), though it came later.
    assert dispatch() == [later.run_id]
    run(later)
    end(later)
    assert dispatch() == [export.run_id]
    reservation = Reservation.objects.select_related("run").get(run=export.run_id)
    assert reservation.host_id == host.pk and reservation.cpu_slot == 0 and reservation.gpu_id is None
    assert reservation.run.kind == RunKind.EXPORT and reservation.run.subject_id == export.pk
    export.refresh_from_db()
    assert export.run.status == RunStatus.QUEUED and export.host == host.name


def test_with_no_backfill_allowed_the_order_is_strict(owner: User, local_model: Path, settings: Any) -> None:
    settings.FINETUNE_BACKFILL_MAX_WAIT_SECONDS = 0
    announce_host(spec="2x80")
    a = create(owner, local_model, gpu={"count": 1})
    dispatch()
    create(owner, local_model, gpu={"count": 2}, priority=9)
    create(owner, local_model, gpu={"count": 1}, priority=1)
    assert dispatch() == []
    assert Reservation.objects.count() == 1 and held_gpus(a)


def test_held_tasks_keep_their_place_but_do_not_start(owner: User, local_model: Path) -> None:
    announce_host(spec="1x80")
    first = create(owner, local_model, priority=9)
    second = create(owner, local_model, priority=1)
    services.finetuning_task_hold(task=first)
    assert dispatch() == [second.run_id]
    run(second)
    end(second)
    services.finetuning_task_release(task=first)
    assert dispatch() == [first.run_id]


def test_holding_a_queued_task_gives_back_its_gpu_and_its_stale_job_claims_nothing(
    owner: User, local_model: Path
) -> None:
    announce_host(spec="1x80")
    first = create(owner, local_model)
    assert dispatch() == [first.run_id]
    services.finetuning_task_hold(task=first)
    first.refresh_from_db()
    assert first.status == TaskStatus.PENDING and first.held and not Reservation.objects.exists()
    assert supervisor.claim(first.run_id) is None  # the job already in the worker's queue finds nothing to do
    other = create(owner, local_model)
    assert dispatch() == [other.run_id]


def test_raising_a_priority_moves_the_task_ahead(owner: User, local_model: Path) -> None:
    announce_host(spec="1x80")
    running = create(owner, local_model)
    dispatch()
    early = create(owner, local_model, priority=5)
    late = create(owner, local_model, priority=5)
    services.finetuning_task_set_priority(task=late, priority=8, by=owner)
    run(running)
    end(running)
    assert dispatch() == [late.run_id]
    assert status_of(early) == TaskStatus.PENDING


# --- what a task asks for ----------------------------------------------------------------------
def test_specific_devices_get_exactly_those_gpus_and_wait_for_them(owner: User, local_model: Path) -> None:
    announce_host(spec="3x80")
    one = create(owner, local_model, gpu={"devices": "1"})
    assert dispatch() == [one.run_id] and held_gpus(one) == [1]
    also_one = create(owner, local_model, gpu={"devices": "1,2"})
    any_two = create(owner, local_model, gpu={"count": 2})
    anything = create(owner, local_model, gpu={"count": 1})
    # GPU 1 is busy: the device request waits; "any 2" cannot fit on the two others... it can: 0 and 2.
    assert dispatch() == [any_two.run_id]
    assert held_gpus(any_two) == [0, 2]
    assert status_of(also_one) == TaskStatus.PENDING and status_of(anything) == TaskStatus.PENDING


def test_any_n_takes_n_gpus_on_one_host_and_cpu_tasks_take_a_slot(owner: User, local_model: Path) -> None:
    announce_host("host-a", "2x80")
    announce_host("host-b", "4x80")
    announce_host("laptop", cpu=2)
    four = create(owner, local_model, gpu={"count": 4})
    two = create(owner, local_model, gpu={"count": 2})
    cpu = create(owner, local_model, gpu={"cpu": True})
    default = create(owner, local_model, gpu={})
    assert dispatch() == [four.run_id, two.run_id, cpu.run_id]
    for task, host, gpus in ((four, "host-b", [0, 1, 2, 3]), (two, "host-a", [0, 1])):
        task.refresh_from_db()
        assert task.host == host and held_gpus(task) == gpus
    cpu.refresh_from_db()
    assert cpu.host == "laptop" and Reservation.objects.get(run=cpu.run_id).cpu_slot == 0
    # {} means one GPU where the host has GPUs: all are taken, so it waits (it is not put on a CPU).
    assert status_of(default) == TaskStatus.PENDING


def test_memory_needs_choose_the_host_with_cards_big_enough(owner: User, local_model: Path) -> None:
    announce_host("small-cards", "4x24")
    announce_host("big-card", "1x80")
    task = create(owner, local_model, gpu={"count": 1, "min_memory_gb": 40})
    assert dispatch() == [task.run_id]
    task.refresh_from_db()
    assert task.host == "big-card"


def test_a_draining_gpu_takes_no_new_task_until_enabled_again(owner: User, local_model: Path) -> None:
    host = announce_host(spec="1x80")
    gpu = Gpu.objects.get(host=host, index=0)
    gpu_set_enabled(gpu=gpu, enabled=False)
    task = create(owner, local_model)
    assert dispatch() == []
    gpu_set_enabled(gpu=gpu, enabled=True)
    assert dispatch() == [task.run_id]


def test_a_silent_host_gets_no_work_and_its_unclaimed_tasks_go_back_to_the_queue(
    owner: User, local_model: Path
) -> None:
    announce_host("far", "1x80")
    task = create(owner, local_model)
    assert dispatch() == [task.run_id]
    from gpus.models import Host

    Host.objects.filter(name="far").update(last_seen_at=timezone.now() - timedelta(hours=1))
    assert requeue_stranded() == [task.run_id]
    task.refresh_from_db()
    assert task.status == TaskStatus.PENDING and task.host == "" and not Reservation.objects.exists()
    assert dispatch() == []  # no live host
    announce_host("near", "1x80")
    assert dispatch() == [task.run_id]
    task.refresh_from_db()
    assert task.host == "near"


def test_a_queued_run_whose_job_the_broker_lost_is_handed_to_the_worker_again_at_its_start(
    owner: User, local_model: Path
) -> None:
    from django_q.models import OrmQ

    announce_host(spec="1x80")
    task = create(owner, local_model)
    assert dispatch() == [task.run_id]
    OrmQ.objects.all().delete()  # the job is gone (a queue emptied by hand, a restored database)
    assert supervisor.reenqueue_queued() == [task.run_id]
    jobs = [job for job in OrmQ.objects.all() if job.func() == "gpus.jobs.run"]
    assert [(job.key, tuple(job.args())) for job in jobs] == [(worker_queue(settings.FINETUNE_HOST),
                                                                      (task.run_id,))]
    task.refresh_from_db()
    assert task.status == TaskStatus.QUEUED  # nothing else changed: the worker claims it as usual


def test_each_active_task_on_a_host_gets_its_own_master_port(owner: User, local_model: Path) -> None:
    announce_host(spec="4x80")
    tasks = [create(owner, local_model, gpu={"count": 2}) for _ in range(2)]
    dispatch()
    ports = [FinetuningTask.objects.get(pk=t.pk).master_port for t in tasks]
    assert ports == [settings.FINETUNE_MASTER_PORT_BASE, settings.FINETUNE_MASTER_PORT_BASE + 1]
    run(tasks[0])
    end(tasks[0])
    again = create(owner, local_model, gpu={"count": 2})
    dispatch()
    again.refresh_from_db()
    assert again.master_port == settings.FINETUNE_MASTER_PORT_BASE  # freed, reused


# --- reservations are released on every ending -------------------------------------------------
@pytest.mark.parametrize("ending", ["completed", "failed", "stopped-running", "stopped-queued", "deleted",
                                    "deleted-running", "worker-killed"])
def test_reservations_are_released_on_every_ending(owner: User, local_model: Path, ending: str) -> None:
    announce_host(spec="2x80")
    task = create(owner, local_model, gpu={"count": 2})
    assert dispatch() == [task.run_id] and Reservation.objects.filter(run=task.run_id).count() == 2
    if ending in ("completed", "failed"):
        run(task)
        end(task, ending)
    elif ending == "stopped-running":
        run(task)
        services.finetuning_task_stop(task=task)
        assert Reservation.objects.count() == 2  # still held while the process stops
        end(task, TaskStatus.STOPPED)
    elif ending == "stopped-queued":
        services.finetuning_task_stop(task=task)
    elif ending == "deleted":
        services.finetuning_task_delete(task=task)
    elif ending == "deleted-running":
        run(task)
        services.finetuning_task_delete(task=task)
        end(task, TaskStatus.STOPPED)
    else:
        # The worker supervising it died: its runner pid is gone and the heartbeat is old.
        run(task)
        Run.objects.filter(pk=task.run_id).update(
            host=settings.FINETUNE_HOST, runner_pid=2**22 + 17, heartbeat_at=timezone.now() - timedelta(hours=1),
        )
        assert supervisor.reconcile() == [task.run_id]
    assert not Reservation.objects.exists()
    nxt = create(owner, local_model, gpu={"count": 2})
    assert dispatch() == [nxt.run_id]


def test_the_sweep_frees_reservations_whose_holder_ended(owner: User, local_model: Path) -> None:
    announce_host(spec="1x80")
    task = create(owner, local_model)
    dispatch()
    # A code path that forgot to release (simulated by a raw update) cannot block the GPU forever.
    Run.objects.filter(pk=task.run_id).update(status=RunStatus.FAILED)
    assert reservations_release_orphans() == 1
    assert not Reservation.objects.exists()


# --- no double booking under concurrency (PostgreSQL) ------------------------------------------
@pytest.mark.skipif("connection.vendor != 'postgresql'", reason="the concurrency guarantee is PostgreSQL's")
@pytest.mark.parametrize("round_", range(3))
def test_concurrent_submissions_and_finishes_never_double_book(
    transactional_db: None, local_model: Path, round_: int
) -> None:
    owner = User.objects.create_user(f"load{round_}")
    host = announce_host(spec="3x80", cpu=1)
    inventory = {g.pk for g in host.gpus.all()}
    per_submitter, submitters, finishers = 6, 4, 3
    total = per_submitter * submitters
    intervals: dict[int, list[tuple[float, float, int]]] = {gid: [] for gid in inventory}
    errors: list[BaseException] = []
    lock = threading.Lock()
    overbooked: list[int] = []

    def submit(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(per_submitter):
                gpu = rng.choice([{"count": 1}, {"count": 2}, {"cpu": True}, {"devices": str(rng.randrange(3))}])
                create(owner, local_model, gpu=gpu, priority=rng.randrange(11))
                dispatch()
                time.sleep(rng.random() * 0.01)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            connection.close()

    def finish() -> None:
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if FinetuningTask.objects.filter(owner=owner, status=TaskStatus.COMPLETED).count() == total:
                    return
                queued = list(FinetuningTask.objects.filter(owner=owner, status=TaskStatus.QUEUED)[:1])
                if not queued:
                    dispatch()
                    time.sleep(0.005)
                    continue
                task = queued[0]
                if not claim(task):
                    continue  # another finisher claimed it
                gpus = set(Reservation.objects.filter(run=task.run_id, gpu__isnull=False)
                           .values_list("gpu_id", flat=True))
                began = time.monotonic()
                if Reservation.objects.filter(gpu__isnull=False).count() > len(inventory):
                    overbooked.append(task.pk)
                time.sleep(0.002)
                ended = time.monotonic()
                with lock:
                    for gid in gpus:
                        intervals[gid].append((began, ended, task.pk))
                end(task)
                dispatch()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=submit, args=(round_ * 100 + i,)) for i in range(submitters)]
    threads += [threading.Thread(target=finish) for _ in range(finishers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    assert FinetuningTask.objects.filter(owner=owner, status=TaskStatus.COMPLETED).count() == total
    assert not Reservation.objects.exists(), "reservations leaked"
    assert not overbooked
    for gid, spans in intervals.items():
        spans.sort()
        for (_, end_a, task_a), (start_b, _, task_b) in zip(spans, spans[1:], strict=False):
            assert start_b >= end_a, f"GPU {gid} held by tasks {task_a} and {task_b} at once"


# --- the queue API and its operations ------------------------------------------------------------
def test_the_queue_lists_waiting_tasks_in_order_with_an_estimated_start(
    alice: User, bob: User, alice_api: APIClient, local_model: Path
) -> None:
    announce_host(spec="1x80")
    running = create(alice, local_model, name="running")
    dispatch()
    run(running)
    FinetuningTask.objects.filter(pk=running.pk).update(eta_seconds=600)
    mine = create(alice, local_model, priority=3, name="mine")
    theirs = create(bob, local_model, priority=7, name="bobs secret")
    announce_host("laptop", cpu=1)
    cpu = create(alice, local_model, gpu={"cpu": True}, priority=0, name="cpu")
    from gpus.models import Host

    Host.objects.filter(name="laptop").update(last_seen_at=timezone.now() - timedelta(hours=1))  # went away
    entries = alice_api.get("/api/finetuning/queue/").json()["results"]
    assert [e["position"] for e in entries] == [1, 2, 3]
    first, second, third = entries
    assert first["id"] is None and first["name"] == "another user's task" and first["owner"] is None
    assert "bobs secret" not in str(entries) and first["priority"] == 7 and not first["mine"]
    # bob's task takes the GPU when the running task ends (ETA 600 s); mine waits for bob's, whose
    # own run time is unknown.
    start = timezone.datetime.fromisoformat(first["estimated_start"])
    assert 590 <= (start - timezone.now()).total_seconds() <= 610
    assert second["id"] == mine.pk and second["mine"] and second["estimated_start"] is None
    assert second["requested"] == {"kind": "gpu", "count": 1, "devices": [], "min_memory_gb": second["requested"][
        "min_memory_gb"]}
    assert third["id"] == cpu.pk and third["note"] == "does not fit on any online host"
    assert theirs.pk not in [e["id"] for e in entries]


def test_owner_and_staff_change_priority_hold_release_and_cancel_but_bob_cannot(
    alice: User, alice_api: APIClient, bob_api: APIClient, staff_api: APIClient, local_model: Path
) -> None:
    task = create(alice, local_model)  # no host: it waits
    url = f"/api/finetuning/tasks/{task.pk}"
    for client in (bob_api,):
        assert client.post(f"{url}/priority/", {"priority": 9}, format="json").status_code == 404
        assert client.post(f"{url}/hold/").status_code == 404
        assert client.post(f"{url}/cancel/").status_code == 404
    response = alice_api.post(f"{url}/priority/", {"priority": 11}, format="json")
    assert response.status_code == 400 and "priority" in response.json()
    assert alice_api.post(f"{url}/priority/", {"priority": 9}, format="json").json()["priority"] == 9
    assert staff_api.post(f"{url}/priority/", {"priority": 2}, format="json").json()["priority"] == 2
    assert alice_api.post(f"{url}/hold/").json()["held"] is True
    assert alice_api.get("/api/finetuning/queue/").json()["results"][0]["note"] == "on hold"
    assert staff_api.post(f"{url}/release/").json()["held"] is False
    assert alice_api.post(f"{url}/cancel/").json()["status"] == "stopped"
    response = alice_api.post(f"{url}/priority/", {"priority": 3}, format="json")
    assert response.status_code == 400 and "stopped" in response.json()["priority"][0]
    assert alice_api.get("/api/finetuning/queue/").json()["results"] == []


def test_the_task_detail_names_its_reserved_gpus(alice: User, alice_api: APIClient, local_model: Path) -> None:
    host = announce_host(spec="2x80")
    task = create(alice, local_model, gpu={"devices": "1"})
    dispatch()
    data = alice_api.get(f"/api/finetuning/tasks/{task.pk}/").json()
    uuid = host.gpus.get(index=1).uuid
    assert data["status"] == "queued" and data["host"] == host.name
    assert data["gpus"] == [{"host": host.name, "index": 1, "uuid": uuid, "name": "Fake GPU 80GB"}]


# --- two hosts, two worker clusters ---------------------------------------------------------------
def test_two_hosts_each_run_only_the_tasks_whose_gpus_they_hold(
    worker: Any, fake_swift: Any, alice: User, local_model: Path, tmp_path: Path
) -> None:
    import json

    from gpus.inventory import parse_fake_gpus
    from gpus.models import Host
    from tests.conftest import wait_for

    record = tmp_path / "launches.jsonl"
    fake_swift(record=record, step_seconds=0.2)
    specs = {"host-a": "2x40", "host-b": "1x100"}
    for name, spec in specs.items():
        worker(FINETUNE_HOST=name, FINETUNE_GPU_BACKEND="fake", FINETUNE_FAKE_GPUS=spec, FINETUNE_CPU_SLOTS="0",
               FINETUNE_GPU_REFRESH_SECONDS="0.5", FAKE_SWIFT_TAG=name)
    wait_for(lambda: Host.objects.live().count() == 2, timeout=60)
    pair = create(alice, local_model, gpu={"count": 2}, name="pair")  # only host-a has two GPUs
    big = create(alice, local_model, gpu={"count": 1, "min_memory_gb": 90}, name="big")  # only host-b
    after = create(alice, local_model, gpu={"devices": "1"}, name="after")  # only host-a has a GPU 1
    dispatch()
    wanted = {pair.pk: "host-a", big.pk: "host-b", after.pk: "host-a"}
    wait_for(lambda: FinetuningTask.objects.filter(pk__in=wanted, status=TaskStatus.COMPLETED).count() == 3,
             timeout=120)
    launches = {}
    for line in record.read_text().splitlines():
        launch = json.loads(line)
        launches[launch["cwd"]] = launch
    uuids = {name: {g.uuid for g in parse_fake_gpus(spec, name)} for name, spec in specs.items()}
    for pk, host in wanted.items():
        task = FinetuningTask.objects.get(pk=pk)
        assert task.host == host and task.status == TaskStatus.COMPLETED, (task.host, task.error_message)
        launch = launches[str(Path(task.log_file_path).parent)]
        assert launch["env"]["FAKE_SWIFT_TAG"] == host  # launched by that host's worker
        assert set(launch["env"]["CUDA_VISIBLE_DEVICES"].split(",")) <= uuids[host]
    assert FinetuningTask.objects.get(pk=pair.pk).master_port is not None
    assert launches[str(Path(FinetuningTask.objects.get(pk=pair.pk).log_file_path).parent)]["env"][
        "NPROC_PER_NODE"] == "2"
    assert not Reservation.objects.exists()
