"""One live worker per host name (M6): a second worker announcing a name that a live worker holds
is refused with a clear message; a clean stop, a crash on the same machine or a silent holder frees
the name."""

from __future__ import annotations

import subprocess
from datetime import timedelta

import pytest
from django.db.models.functions import Now

from gpus.inventory import Discovery, parse_fake_gpus
from gpus.models import Gpu, Host
from gpus.placement import Request, impossible_reason
from gpus.selectors import inventory_snapshot
from gpus.services import HostNameInUse, WorkerIdentity, host_announce, host_claim, host_release
from tasks.services import finetuning_task_create

pytestmark = pytest.mark.django_db

ELSEWHERE = "another-boot-id/pid:[4026531836]"


def worker_on(machine: str, pid: int) -> WorkerIdentity:
    """A worker on another machine (its own kernel boot)."""
    return WorkerIdentity(pid=pid, machine=machine, boot=f"boot-of-{machine}/pid:[4026531836]")


def go_silent(name: str, seconds: float = 31) -> None:
    """The holder and its agent last wrote ``seconds`` ago by the database's clock (the window is 30 s)."""
    ago = Now() - timedelta(seconds=seconds)
    Host.objects.filter(name=name).update(last_seen_at=ago, agent_started_at=ago)


def test_a_second_live_worker_with_the_same_name_is_refused_with_a_clear_message() -> None:
    first = worker_on("box-a", 123)
    host_claim(name="vm", me=first)
    host_announce(name="vm", discovery=Discovery("none", []), cpu_slots=1, instance=first.instance)
    with pytest.raises(HostNameInUse) as refused:
        host_claim(name="vm", me=worker_on("box-b", 456))
    assert str(refused.value) == (
        "Host name 'vm' is already in use by a live worker (pid 123 on box-a, last seen 0 s ago). "
        "Set FINETUNE_HOST to a unique name for this host, or stop the other worker."
    )
    assert Host.objects.get(name="vm").agent_pid == 123


def test_a_worker_that_just_took_the_name_holds_it_before_its_agent_reports() -> None:
    """Two workers starting at once: the name was free (its last holder is long gone) and the first
    one's agent has not announced yet; the second is still refused, and the host takes no work yet."""
    host_claim(name="vm", me=worker_on("box-old", 99))
    go_silent("vm", seconds=3600)
    host_claim(name="vm", me=worker_on("box-a", 123))
    with pytest.raises(HostNameInUse, match=r"\(pid 123 on box-a, started 0 s ago\)"):
        host_claim(name="vm", me=worker_on("box-b", 456))
    assert not Host.objects.live().filter(name="vm").exists()


def test_a_worker_that_stopped_cleanly_gives_its_name_to_the_next_one() -> None:
    first = worker_on("box-a", 123)
    host_claim(name="vm", me=first)
    assert host_release(name="vm", instance=first.instance)
    second = worker_on("box-b", 456)
    host_claim(name="vm", me=second)
    host = Host.objects.get(name="vm")
    assert (host.agent_instance, host.agent_pid, host.agent_machine) == (second.instance, 456, "box-b")
    assert not host_release(name="vm", instance=first.instance)  # a late release takes nothing from it


def test_a_holder_silent_for_the_liveness_window_loses_the_name() -> None:
    host_claim(name="vm", me=worker_on("box-a", 123))
    go_silent("vm")
    host_claim(name="vm", me=worker_on("box-b", 456))
    assert Host.objects.get(name="vm").agent_machine == "box-b"


def test_a_restart_on_the_same_machine_after_a_crash_is_accepted_at_once() -> None:
    here = WorkerIdentity()
    dead = subprocess.Popen(["true"])
    dead.wait()
    host_claim(name="vm", me=WorkerIdentity(pid=dead.pid, machine=here.machine, boot=here.boot))
    host_claim(name="vm", me=here)  # the predecessor's pid is gone on this machine
    assert Host.objects.get(name="vm").agent_instance == here.instance


def test_a_clone_with_the_same_machine_name_but_another_boot_is_refused() -> None:
    """Cloned VMs or containers share a host name; a pid seen from another kernel proves nothing."""
    here = WorkerIdentity()
    dead = subprocess.Popen(["true"])
    dead.wait()
    host_claim(name="vm", me=WorkerIdentity(pid=dead.pid, machine=here.machine, boot=ELSEWHERE))
    with pytest.raises(HostNameInUse):
        host_claim(name="vm", me=here)


def test_the_agent_of_a_worker_that_lost_its_name_writes_nothing() -> None:
    first, second = worker_on("box-a", 123), worker_on("box-b", 456)
    host_claim(name="vm", me=first)
    assert host_announce(name="vm", discovery=Discovery("fake", parse_fake_gpus("1x80", "a")), cpu_slots=0,
                         instance=first.instance)
    go_silent("vm")
    host_claim(name="vm", me=second)
    host_announce(name="vm", discovery=Discovery("fake", parse_fake_gpus("1x80", "b")), cpu_slots=0,
                  instance=second.instance)
    with pytest.raises(HostNameInUse, match="pid 456 on box-b"):
        host_announce(name="vm", discovery=Discovery("fake", parse_fake_gpus("1x80", "a")), cpu_slots=0,
                      instance=first.instance)
    # The first worker's GPU stays absent: the two agents do not flap the inventory.
    assert list(Gpu.objects.filter(host__name="vm", present=True).values_list("uuid", flat=True)) == [
        parse_fake_gpus("1x80", "b")[0].uuid
    ]



def test_a_host_only_claimed_by_its_starting_worker_makes_no_request_impossible(alice: object) -> None:
    """Between a worker's name claim and its agent's first announcement the host's inventory is
    unknown, not empty: a task created in that second is accepted (it used to be refused with "no
    host offers GPUs or CPU slots", a 400 on the new-task page right after `make run`)."""
    me = worker_on("box-a", 123)
    host_claim(name="starting", me=me)
    assert impossible_reason(Request(kind="auto"), inventory_snapshot(everything=True)) is None
    task = finetuning_task_create(owner=alice, name="early", base_model="Qwen/Qwen2.5-0.5B-Instruct",
                                  datasets=["builtin:smoke_sft"], gpu_config={})
    assert task.pk is not None
    host_announce(name="starting", discovery=Discovery("none", []), cpu_slots=0, instance=me.instance)
    reason = impossible_reason(Request(kind="auto"), inventory_snapshot(everything=True))
    assert reason == "no host offers GPUs or CPU slots"  # once it has reported, what it has counts
