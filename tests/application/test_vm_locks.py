"""VmLocks: calls on one VM run one at a time, in arrival order; a call on a free VM
takes it without waiting; a call cancelled while it waits leaves the others in order;
nothing stays behind once every call has left."""

from __future__ import annotations

import asyncio

import pytest

from pagetrackd.application.slices import VmLocks


async def test_a_free_vm_is_taken_without_yielding_to_the_loop() -> None:
    locks = VmLocks()
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    task = asyncio.create_task(other())
    async with locks.hold("t", "a"):
        assert locks.busy("t", "a")
    assert ran == []  # no await point was reached: the other task has not run yet
    assert not locks.busy("t", "a")
    await task


async def test_calls_run_one_at_a_time_in_arrival_order() -> None:
    locks = VmLocks()
    events: list[str] = []
    inside = 0

    async def call(name: str) -> None:
        nonlocal inside
        async with locks.hold("t", "vm"):
            inside += 1
            assert inside == 1, "two calls inside at once"
            events.append(f"{name}+")
            for _ in range(3):
                await asyncio.sleep(0)
            events.append(f"{name}-")
            inside -= 1

    tasks = []
    for name in "abcde":
        tasks.append(asyncio.create_task(call(name)))
        await asyncio.sleep(0)  # each arrives while the earlier ones hold or wait
    await asyncio.gather(*tasks)
    assert events == [f"{n}{s}" for n in "abcde" for s in "+-"]
    assert not locks.busy("t", "vm")


async def test_a_waiter_cancelled_leaves_the_others_in_order() -> None:
    locks = VmLocks()
    order: list[str] = []
    release = asyncio.Event()

    async def call(name: str, wait: bool = False) -> None:
        async with locks.hold("t", "vm"):
            order.append(name)
            if wait:
                await release.wait()

    first = asyncio.create_task(call("a", wait=True))
    await asyncio.sleep(0)
    cancelled = asyncio.create_task(call("b"))
    await asyncio.sleep(0)
    last = asyncio.create_task(call("c"))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, last)
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert order == ["a", "c"]
    assert not locks.busy("t", "vm")
    async with locks.hold("t", "vm"):  # and the VM is free again
        order.append("d")
    assert order == ["a", "c", "d"]


async def test_the_holder_cancelled_hands_the_vm_to_the_next() -> None:
    locks = VmLocks()
    order: list[str] = []

    async def holder() -> None:
        async with locks.hold("t", "vm"):
            order.append("a")
            await asyncio.Event().wait()  # until cancelled

    async def call(name: str) -> None:
        async with locks.hold("t", "vm"):
            order.append(name)

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    rest = [asyncio.create_task(call(n)) for n in "bc"]
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.gather(*rest)
    assert order == ["a", "b", "c"]
    assert not locks.busy("t", "vm")


async def test_other_vms_and_tenants_do_not_wait() -> None:
    locks = VmLocks()
    release = asyncio.Event()

    async def holder() -> None:
        async with locks.hold("t", "vm"):
            await release.wait()

    task = asyncio.create_task(holder())
    await asyncio.sleep(0)
    async with locks.hold("t", "other"):
        pass
    async with locks.hold("u", "vm"):
        pass
    assert locks.busy("t", "vm")
    release.set()
    await task
    assert not locks.busy("t", "vm")
