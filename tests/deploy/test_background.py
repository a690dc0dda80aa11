"""The emulated background model, with a fake setter and a fake clock."""

import asyncio

import pytest

from deploy.network.background import BackgroundModel, EmulatedBackground


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    async def sleep(self, seconds):
        # Advance virtual time; yield so other loops interleave.
        self.now += seconds
        await asyncio.sleep(0)


class RecordingSetter:
    def __init__(self):
        self.calls = []
        self.state = {}

    async def __call__(self, address, perturbation):
        self.calls.append((address, perturbation))
        self.state[address] = perturbation


def test_duration_follows_bandwidth():
    model = BackgroundModel(bandwidth_mbps=1000)
    assert model.duration_s(125) == pytest.approx(2.0)  # 125 MB = 1000 Mb, there and back


def run_background(n, seconds, seed=3, instances=4):
    clock, setter = FakeClock(), RecordingSetter()
    model = BackgroundModel(bandwidth_mbps=2000, size_mb=(128, 256), stall_probability=0.05, stall_ms=200)

    async def run():
        bg = EmulatedBackground([f"h{i}:1" for i in range(instances)], n, model, seed,
                                setter=setter, sleep=clock.sleep, clock=clock)
        bg.start()
        while clock.now < seconds:
            await asyncio.sleep(0)
        during = dict(setter.state)
        await bg.stop()
        return bg, during

    bg, during = asyncio.run(run())
    return bg, during, setter


def test_transfers_perturb_exactly_the_touched_instances_and_stop_clears():
    bg, during, setter = run_background(n=1, seconds=20)
    assert len(bg.timeline) >= 10
    for t in bg.timeline:
        assert t.src != t.dst
        assert 128 <= t.size_mb <= 256
        assert t.duration_s == pytest.approx(2 * t.size_mb * 8 / 2000)
    # With one shuffle, at most two instances are perturbed at any moment.
    perturbed = [a for a, p in during.items() if p is not None]
    assert 1 <= len(perturbed) <= 2
    first = next(p for _, p in setter.calls if p is not None)
    assert first.stall_probability == pytest.approx(0.05)
    assert first.stall_ms == 200
    assert first.delay.kind == "exponential"
    # stop() leaves nothing perturbed.
    assert all(p is None for p in setter.state.values())


def test_reference_counting_under_overlap():
    bg, during, setter = run_background(n=3, seconds=30, instances=3)
    # Every set is eventually matched by a clear, and no instance is cleared
    # while another transfer still touches it: replay the calls.
    for address in {a for a, _ in setter.calls}:
        states = [p is not None for a, p in setter.calls if a == address]
        assert all(x != y for x, y in zip(states, states[1:])), "set/clear must alternate"
        assert states[-1] is False


def test_seeded_runs_repeat():
    a = [(t.src, t.dst, round(t.size_mb, 6)) for t in run_background(2, 20, seed=11)[0].timeline]
    b = [(t.src, t.dst, round(t.size_mb, 6)) for t in run_background(2, 20, seed=11)[0].timeline]
    c = [(t.src, t.dst, round(t.size_mb, 6)) for t in run_background(2, 20, seed=12)[0].timeline]
    assert a == b
    assert a != c


def test_busy_fraction_is_a_fraction():
    bg, _, _ = run_background(n=1, seconds=40, instances=4)
    # One shuffle always touches 2 of 4 instances: about half the time.
    assert 0.35 <= bg.busy_fraction() <= 0.55
