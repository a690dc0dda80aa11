"""Padded partial groups: a group that stops waiting with fewer than k members is
coded with zero batches in the missing places, and waits only as long as its
parity can still return before its first member is late.

The fakes here are affine (F(x) = xW + c, so F(0) = c is not zero) and the
parity model is exact for the sum encoder: Fp(a + b + ...) = (a + b + ...)W + k c.
Injected clock throughout.
"""

import numpy as np
import pytest

from services.frontend.records import ORIGINAL, RECONSTRUCTED
from services.frontend.redundancy import Lateness
from tests.frontend.fakes import W, settle
from tests.frontend.test_engine import make_engine, x

pytestmark = pytest.mark.timeout(60)

C = np.array([0.5, -2.0, 1.25], dtype=np.float32)      # F(0)
GROUP_TIMEOUT = 1.0


def affine(batch):
    return (np.asarray(batch, dtype=np.float32).reshape(len(batch), -1) @ W + C).astype(np.float32)


def parity_fn(k):
    return lambda batch: (np.asarray(batch, dtype=np.float32).reshape(len(batch), -1) @ W + k * C).astype(
        np.float32)


def lateness(policy="late"):
    """Two samples, 10 and 30 ms: threshold (p95) 29 ms, median 20 ms, so a group waits 9 ms."""
    lat = Lateness(policy, min_samples=2, every=1)
    lat.window.add(0.010)
    lat.window.add(0.030)
    return lat


WAIT = 0.029 - 0.020


def engine(k=2, data=2, zero_output=C, lat=None, **kw):
    fns = {f"d{i}:1": affine for i in range(data)}
    fns["p0:1"] = parity_fn(k)
    return make_engine("coded", data=data, parity=1, k=k, fns=fns, zero_output=zero_output,
                       lateness=lat or lateness(), group_timeout_s=GROUP_TIMEOUT, **kw)


def test_the_group_wait_is_the_threshold_minus_the_median():
    assert lateness().group_wait_s() == pytest.approx(WAIT)
    assert Lateness("late").group_wait_s() is None          # no latencies yet: no basis
    fast_tail = Lateness("late", min_samples=2, every=1, quantile=0.5)
    fast_tail.window.add(0.01)
    fast_tail.window.add(0.01)
    assert fast_tail.group_wait_s() == 0.0                  # never negative


async def test_a_lone_straggler_is_reconstructed_from_its_padded_parity():
    e, clock, fleet = engine()
    t0 = clock.now()
    q = e.submit(x(0), timeout_s=5.0)
    await settle()
    assert fleet["d0:1"].pending_ids() == [0] and e.counters["encodes"] == 0
    clock.advance(WAIT - 1e-6)
    await settle()
    assert e.counters["padded_groups"] == 0                 # still waiting for a second member
    clock.advance(2e-6)
    await settle()
    assert e.counters["partial_groups"] == 1 and e.counters["padded_groups"] == 1
    assert e.groups[0].padded and e.groups[0].sealed_s == pytest.approx(t0 + WAIT)
    parity = fleet["p0:1"].release(2)                       # id 2 = g(k+1) + k
    np.testing.assert_array_equal(parity.inputs, x(0)[None])   # x0 + a zero batch
    await settle()
    assert e.counters["decodes"] == 1 and not q.done        # held until late (29 ms)
    clock.advance(0.029)
    await settle()
    a = q.future.result()
    assert a.source == RECONSTRUCTED
    np.testing.assert_allclose(a.output, affine(x(0)[None])[0], rtol=1e-5, atol=1e-5)   # P - F(0) = F(x0)
    fleet["d0:1"].release(0)
    await settle()
    assert not e.groups and e.counters["late_originals"] == 1
    await e.close()


async def test_a_group_that_fills_in_time_is_not_padded():
    e, clock, fleet = engine()
    qs = [e.submit(x(0), timeout_s=5.0)]
    clock.advance(WAIT / 2)
    qs.append(e.submit(x(1), timeout_s=5.0))
    await settle()
    assert e.counters["padded_groups"] == 0 and e.counters["partial_groups"] == 0
    parity = fleet["p0:1"].release(2)
    np.testing.assert_array_equal(parity.inputs, (x(0) + x(1))[None])
    for i in range(2):
        fleet[f"d{i}:1"].release(i)
    await settle()
    assert [q.future.result().source for q in qs] == [ORIGINAL, ORIGINAL]
    await e.close()


async def test_no_parity_for_a_member_answered_before_the_wait_ends():
    e, clock, fleet = engine()
    q = e.submit(x(0), timeout_s=5.0)
    await settle()
    fleet["d0:1"].release(0)
    await settle()
    assert q.future.result().source == ORIGINAL
    clock.advance(WAIT)
    await settle()
    assert e.counters["partial_groups"] == 1 and e.counters["padded_groups"] == 0
    assert fleet["p0:1"].calls == [] and not e.groups
    await e.close()


async def test_without_padding_a_partial_group_waits_the_group_timeout_and_gets_no_parity():
    e, clock, fleet = engine(zero_output=None)
    q = e.submit(x(0), timeout_s=5.0)
    await settle()
    clock.advance(WAIT)
    await settle()
    assert e.counters["partial_groups"] == 0                # still forming: the paper's wait
    clock.advance(GROUP_TIMEOUT)
    await settle()
    assert e.counters["partial_groups"] == 1 and e.counters["padded_groups"] == 0
    assert fleet["p0:1"].calls == []
    fleet["d0:1"].release(0)
    await settle()
    assert q.future.result().source == ORIGINAL
    await e.close()


async def test_before_any_latency_is_known_a_group_waits_the_group_timeout():
    e, clock, fleet = engine(lat=Lateness("late"))
    e.submit(x(0), timeout_s=5.0)
    await settle()
    clock.advance(GROUP_TIMEOUT - 1e-6)
    await settle()
    assert e.counters["partial_groups"] == 0
    clock.advance(2e-6)
    await settle()
    assert e.counters["padded_groups"] == 1 and fleet["p0:1"].pending_ids() == [2]
    fleet["d0:1"].release(0)
    await settle()
    assert fleet["p0:1"].pending_ids() == [2] and not e.groups[0].parity.queue  # in flight: runs out
    fleet["p0:1"].release(2)
    await settle()
    assert not e.groups
    await e.close()


async def test_k3_padded_group_decodes_from_a_real_output_and_a_zero_output():
    e, clock, fleet = engine(k=3, data=2, lat=lateness("immediate"))
    qs = [e.submit(x(0), timeout_s=5.0), e.submit(x(1), timeout_s=5.0)]
    await settle()
    clock.advance(WAIT)
    await settle()
    assert e.counters["padded_groups"] == 1
    parity = fleet["p0:1"].release(3)                       # id 3 = g(k+1) + k, k = 3
    np.testing.assert_array_equal(parity.inputs, (x(0) + x(1))[None])
    fleet["d1:1"].release(1)
    await settle()
    a = qs[0].future.result()                               # immediate: at once
    assert a.source == RECONSTRUCTED
    # P - F(x1) - F(0) = (x0 + x1)W + 3c - (x1 W + c) - c = F(x0)
    np.testing.assert_allclose(a.output, affine(x(0)[None])[0], rtol=1e-5, atol=1e-4)
    fleet["d0:1"].release(0)
    await settle()
    assert not e.groups
    await e.close()


async def test_the_group_wait_is_a_gauge():
    e, _, _ = engine()
    assert e.policy.gauges()["group_wait_s"] == pytest.approx(WAIT)
    e2, _, _ = engine(zero_output=None)
    assert "group_wait_s" not in e2.policy.gauges()
    await e.close()
    await e2.close()


async def test_a_padded_member_whose_call_failed_waits_for_its_decode():
    e, clock, fleet = engine(max_attempts=1)
    q = e.submit(x(0), timeout_s=5.0)
    await settle()
    clock.advance(WAIT)
    await settle()
    fleet["d0:1"].fail(0)                   # its only attempt: an erasure, not an error to the client
    await settle()
    assert not q.done and e.counters["awaiting_decode"] == 1
    fleet["p0:1"].release(2)
    await settle()
    a = q.future.result()                   # the original cannot come: the reconstruction answers at once
    assert a.source == RECONSTRUCTED
    np.testing.assert_allclose(a.output, affine(x(0)[None])[0], rtol=1e-5, atol=1e-5)
    await e.close()


def test_zero_output_is_the_models_own_output_for_a_zero_input(tiny_artifacts):
    import json

    import onnxruntime as ort

    from services.common import manifest as manifest_mod
    from services.frontend.app import zero_output

    index = json.loads((tiny_artifacts / "index.json").read_text())
    base = next(a["name"] for a in index["artifacts"] if a["role"] == "base")
    m = manifest_mod.load(tiny_artifacts / f"{base}.json")
    z = zero_output(m)
    session = ort.InferenceSession(str(m.onnx_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: np.zeros((1, *m.input_shape), np.float32)})[0][0]
    assert z.shape == tuple(m.output_shape) and z.dtype == np.float32
    np.testing.assert_allclose(z, expected, rtol=1e-6, atol=1e-6)
    assert np.abs(z).max() > 1e-3           # a real model's F(0) is not zero: padding must subtract it


def test_padding_is_off_with_one_log_line_when_the_model_cannot_run_here(tmp_path, caplog):
    from tests.frontend.fakes import base_manifest
    from services.frontend.app import zero_output

    m = base_manifest(onnx_file="missing.onnx")
    with caplog.at_level("WARNING"):
        assert zero_output(m) is None
    assert "partial coding groups stay uncoded" in caplog.text and "missing.onnx" in caplog.text


def test_the_frontend_pads_by_default_and_says_so_in_its_flags(models):
    from services.frontend import config

    common = ["--mode", "coded", "--model", str(models["base"]), "--parity-model", str(models["parity"]),
              "--instances", "data=127.0.0.1:1,parity=127.0.0.1:2"]
    assert config.parse_config(common).partial_groups == "pad"
    assert config.parse_config([*common, "--partial-groups", "uncoded"]).partial_groups == "uncoded"


async def test_a_group_whose_parity_could_not_start_keeps_waiting_for_members():
    e, clock, fleet = engine()
    lone = e.submit(x(0), timeout_s=5.0)
    await settle()
    clock.advance(WAIT)
    await settle()
    assert fleet["p0:1"].pending_ids() == [2]               # padded; the only parity instance is busy now
    first = e.submit(x(1), timeout_s=5.0)                   # group 1 opens
    await settle()
    clock.advance(WAIT)
    await settle()
    # A padded parity would queue behind parity 2: group 1 goes on waiting instead.
    assert e.counters["padding_deferred"] == 1 and e.counters["padded_groups"] == 1
    assert e.counters["partial_groups"] == 1 and not e.groups[1].sealed
    second = e.submit(x(2), timeout_s=5.0)                  # fills it: a full group, a full parity
    await settle()
    assert e.groups[1].sealed and not e.groups[1].padded and e.groups[1].parity is not None
    fleet["p0:1"].release(2)
    await settle()
    assert fleet["p0:1"].pending_ids() == [5]               # group 1's parity, id 1 * (k+1) + k
    fleet["p0:1"].release(5)
    fleet["d0:1"].release(0)                                # data batches 0 (group 0), 3 and 4 (group 1)
    fleet["d1:1"].release(3)
    await settle()
    fleet["d0:1"].release(4)
    await settle()
    assert {q.future.result().source for q in (lone, first, second)} == {ORIGINAL}
    await e.close()


async def test_a_deferred_group_seals_at_the_group_timeout_and_pads_if_a_parity_can_start_then():
    e, clock, fleet = engine(data=3)
    e.submit(x(0), timeout_s=5.0)
    await settle()
    clock.advance(WAIT)
    await settle()                                          # group 0 padded, p0 busy
    q = e.submit(x(1), timeout_s=5.0)
    await settle()
    clock.advance(WAIT)
    await settle()
    assert e.counters["padding_deferred"] == 1
    fleet["p0:1"].release(2)                                # p0 free again
    await settle()
    clock.advance(GROUP_TIMEOUT - WAIT)                     # group 1's timeout, from when it opened
    await settle()
    assert e.counters["padded_groups"] == 2 and e.groups[1].padded
    assert fleet["p0:1"].pending_ids() == [5]
    fleet["p0:1"].release(5)
    await settle()
    assert q.future.result().source == RECONSTRUCTED        # late by now: the reconstruction answers
    await e.close()
