"""Distributions and the perturbation controller (core, no grpc), with an injected clock."""

import asyncio

import numpy as np
import pytest

from services.common.clock import ManualClock
from services.common.errors import InstanceFailed, InvalidInput
from services.model_server.distributions import DistSpec, Sampler, parse_params
from services.model_server.perturbation import PerturbationController, PerturbationSpec


@pytest.mark.parametrize(
    "kind, params, check",
    [
        ("none", {}, lambda xs: np.all(xs == 0)),
        ("constant", {"value_ms": 7}, lambda xs: np.all(xs == 7)),
        ("uniform", {"low_ms": 2, "high_ms": 4}, lambda xs: xs.min() >= 2 and xs.max() <= 4 and 2.9 < xs.mean() < 3.1),
        ("exponential", {"mean_ms": 5}, lambda xs: xs.min() >= 0 and 4.6 < xs.mean() < 5.4),
        ("lognormal", {"median_ms": 10, "sigma": 0.5}, lambda xs: 9.3 < np.median(xs) < 10.7),
        ("normal", {"mean_ms": 1, "std_ms": 2}, lambda xs: xs.min() == 0 and 1.3 < xs.mean() < 2.0),
    ],
)
def test_sampler_kinds(kind, params, check):
    spec = DistSpec.make(kind, params, seed=3)
    xs = np.array(_draw(spec, 4000))
    assert check(xs)


def _draw(spec, n):
    sampler = Sampler(spec)
    return [sampler.sample_ms() for _ in range(n)]


def test_same_seed_same_draws_different_seed_different():
    a = DistSpec.make("exponential", {"mean_ms": 3}, seed=1)
    assert _draw(a, 5) == _draw(a, 5)
    assert _draw(a, 5) != _draw(DistSpec.make("exponential", {"mean_ms": 3}, seed=2), 5)


@pytest.mark.parametrize(
    "kind, params, message",
    [
        ("gamma", {}, "distribution kind 'gamma' not in"),
        ("constant", {}, "takes parameters ['value_ms'], got []"),
        ("constant", {"value_ms": 1, "x": 2}, "got ['value_ms', 'x']"),
        ("constant", {"value_ms": -1}, "value_ms = -1.0 must be finite and >= 0"),
        ("uniform", {"low_ms": 5, "high_ms": 1}, "low_ms 5.0 > high_ms 1.0"),
    ],
)
def test_bad_distribution(kind, params, message):
    with pytest.raises(InvalidInput) as info:
        DistSpec.make(kind, params)
    assert message in str(info.value)


def test_parse_params():
    assert parse_params("median_ms=5, sigma=0.25") == {"median_ms": 5.0, "sigma": 0.25}
    assert parse_params("") == {}
    with pytest.raises(ValueError, match="'x' is not NAME=VALUE"):
        parse_params("x")
    with pytest.raises(ValueError, match="'abc' is not a number"):
        parse_params("v=abc")


def test_bad_perturbation():
    with pytest.raises(InvalidInput, match=r"stall_probability = 1.5 not in \[0, 1\]"):
        PerturbationSpec(stall_probability=1.5)
    with pytest.raises(InvalidInput, match="duration_s = -1"):
        PerturbationSpec(duration_s=-1)


def test_auto_clear_by_clock_and_stop_callback():
    clock = ManualClock()
    stopped = []
    controller = PerturbationController(seed=1, clock=clock, on_stop=lambda: stopped.append(True))

    async def body():
        controller.set(PerturbationSpec(fail_probability=1.0, duration_s=2.0))
        with pytest.raises(InstanceFailed):
            await controller.before_inference()
        clock.advance(1.9)
        assert controller.current.fail_probability == 1.0
        clock.advance(0.2)  # fires the auto-clear timer
        assert controller.spec == PerturbationSpec()
        await controller.before_inference()  # cleared: no failure
        controller.set(PerturbationSpec(stop=True))
        return clock.pending()

    assert asyncio.run(body()) == 0
    assert stopped == [True]


def test_delay_and_stall_are_awaited_on_the_injected_clock():
    clock = ManualClock(start_s=0.0)
    controller = PerturbationController(seed=1, clock=clock)

    async def body():
        controller.set(PerturbationSpec(delay=DistSpec.make("constant", {"value_ms": 30}),
                                        stall_probability=1.0, stall_ms=20))
        delayed = asyncio.create_task(controller.after_inference())
        await clock.run_for(0.049)
        early = delayed.done()
        await clock.run_for(0.002)
        return early, delayed.done(), await delayed

    early, done, added = asyncio.run(body())
    assert (early, done, added) == (False, True, 50.0)


def test_hang_holds_until_cleared_and_delay_is_awaited():
    controller = PerturbationController(seed=1)

    async def body():
        controller.set(PerturbationSpec(hang=True))
        held = asyncio.ensure_future(controller.before_inference())
        await asyncio.sleep(0.05)
        was_done = held.done()
        controller.set(PerturbationSpec(delay=DistSpec.make("constant", {"value_ms": 30}),
                                        stall_probability=1.0, stall_ms=20))
        await asyncio.wait_for(held, 1)
        loop = asyncio.get_running_loop()
        start = loop.time()
        added = await controller.after_inference()
        return was_done, added, (loop.time() - start) * 1000

    was_done, added, elapsed_ms = asyncio.run(body())
    assert not was_done and added == 50.0 and elapsed_ms >= 49


def test_fail_probability_rate_is_seeded():
    def failures(seed):
        controller = PerturbationController(seed=seed)

        async def body():
            controller.set(PerturbationSpec(fail_probability=0.3))
            out = []
            for _ in range(400):
                try:
                    await controller.before_inference()
                    out.append(0)
                except InstanceFailed:
                    out.append(1)
            return out

        return asyncio.run(body())

    a = failures(7)
    assert a == failures(7) and 0.22 < np.mean(a) < 0.38
