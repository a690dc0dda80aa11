"""The frontend over real gRPC, in-process, with fake ModelServer servicers.

One test per status mapping row, GetStatus, records, metrics, the registry
source, and the CLI's error handling.
"""

import asyncio
import json
import subprocess
import sys
import urllib.request

import grpc
import numpy as np
import pytest

from parm.v1 import frontend_pb2, frontend_pb2_grpc, tensor_pb2
from services.common import tensors
from services.common.server import insecure_channel
from services.frontend.app import build_server
from services.frontend.config import parse_config
from services.frontend.sources import StaticSource
from tests.frontend.fake_model_server import start_fake
from tests.frontend.models import W

pytestmark = pytest.mark.timeout(60)


def lin(x):
    return (np.asarray(x, np.float32).reshape(-1, 4) @ W).astype(np.float32)


class Deployment:
    """A frontend app plus fake instances, torn down in order."""

    def __init__(self):
        self.fakes = {}
        self.app = None
        self.channel = None
        self.stub = None

    async def start(self, models, spec, *flags, source=None, tmp_path=None):
        entries = []
        for name, (role, kw) in spec.items():
            servicer, built, address = await start_fake(**kw)
            self.fakes[name] = (servicer, built)
            entries.append(f"{role}={address}")
        argv = ["--model", str(models["base"]), "--host", "127.0.0.1",
                "--instances", ",".join(entries) or "data=127.0.0.1:1", *map(str, flags)]
        self.app = build_server(parse_config(argv), source=source)
        await self.app.start()
        self.channel = insecure_channel(f"127.0.0.1:{self.app.port}")
        self.stub = frontend_pb2_grpc.FrontendStub(self.channel)
        return self

    def fake(self, name):
        return self.fakes[name][0]

    async def predict(self, x, request_id="", timeout=10.0):
        req = frontend_pb2.PredictRequest(input=tensors.to_proto(np.asarray(x, np.float32)),
                                          request_id=request_id)
        return await self.stub.Predict(req, timeout=timeout)

    async def close(self):
        if self.channel is not None:
            await self.channel.close()
        if self.app is not None:
            await self.app.stop(grace_s=0)
        for _, built in self.fakes.values():
            await built.server.stop(0)


def x(i):
    return np.arange(4, dtype=np.float32) + 10 * i


async def test_predict_none_mode_answers_values(models):
    d = await Deployment().start(models, {"d0": ("data", {}), "d1": ("data", {})})
    try:
        replies = await asyncio.gather(*(d.predict(x(i), f"r{i}") for i in range(8)))
        for i, r in enumerate(replies):
            np.testing.assert_array_equal(tensors.from_proto(r.output), lin(x(i))[0])
            assert r.source == frontend_pb2.ORIGINAL and r.request_id == f"r{i}"
            assert r.frontend_latency_ms > 0
        assert sorted(r.batch_id for r in replies) == list(range(8))
    finally:
        await d.close()


@pytest.mark.parametrize("tensor, message", [
    (tensors.to_proto(np.zeros(5, np.float32)), "input shape is [5], but model 'lin' expects [4]"),
    (tensors.to_proto(np.zeros(4, np.int64)), "input dtype is int64, but model 'lin' expects float32"),
    (tensor_pb2.Tensor(shape=[4], data=b"\0" * 16), "input: dtype is unspecified"),
    (tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[4], data=b"\0" * 15), "input: 15 data bytes"),
])
async def test_bad_input_is_invalid_argument_and_frontend_keeps_serving(models, tensor, message):
    d = await Deployment().start(models, {"d0": ("data", {})})
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await d.stub.Predict(frontend_pb2.PredictRequest(input=tensor), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.details()
        r = await d.predict(x(1))
        np.testing.assert_array_equal(tensors.from_proto(r.output), lin(x(1))[0])
    finally:
        await d.close()


async def test_overload_is_resource_exhausted_at_once(models):
    d = await Deployment().start(models, {"d0": ("data", {})}, "--max-in-system", 2)
    d.fake("d0").hang = True
    try:
        pending = [asyncio.ensure_future(d.predict(x(i), timeout=3)) for i in range(2)]
        await asyncio.sleep(0.2)
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await d.predict(x(3))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit 2" in err.value.details()
        assert asyncio.get_running_loop().time() - t0 < 1.0
        for p in pending:
            with pytest.raises(grpc.aio.AioRpcError):
                await p
    finally:
        await d.close()


async def test_client_deadline_is_deadline_exceeded(models):
    d = await Deployment().start(models, {"d0": ("data", {})})
    d.fake("d0").hang = True
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await d.predict(x(0), timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.sleep(0.3)
        assert d.app.engine.in_system == 0
    finally:
        await d.close()


async def test_no_data_instance_is_unavailable(models):
    d = await Deployment().start(models, {}, source=StaticSource([], ["data"]))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await d.predict(x(0))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await d.close()


async def test_failing_instances_end_in_unavailable(models):
    d = await Deployment().start(models, {"d0": ("data", {})}, "--max-attempts", 2)
    d.fake("d0").fail = True
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await d.predict(x(0), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "failed on 2 instance calls" in err.value.details()
    finally:
        await d.close()


async def test_coded_over_grpc_records_metrics_and_status(models, tmp_path):
    records = tmp_path / "records"
    d = await Deployment().start(
        models, {"d0": ("data", {"delay_s": 1.5}), "d1": ("data", {}), "p0": ("parity", {})},
        "--mode", "coded", "--parity-model", models["parity"], "--records-dir", records,
        "--metrics-port", 0, "--queue-mode", "rr", "--instance-timeout-ms", 3000)
    try:
        first = asyncio.ensure_future(d.predict(x(0), "r0"))
        await asyncio.sleep(0.1)        # r0 is batch 0 (on the slow d0), r1 is batch 1
        replies = [await d.predict(x(1), "r1"), await first]
        by_id = {r.request_id: r for r in replies}
        slow = by_id["r0"]
        assert slow.source == frontend_pb2.RECONSTRUCTED and slow.batch_id == 0 and slow.group_id == 0
        expected = lin(x(0) + x(1))[0] - lin(x(1))[0]
        np.testing.assert_allclose(tensors.from_proto(slow.output), expected, rtol=1e-5, atol=1e-5)
        assert by_id["r1"].source == frontend_pb2.ORIGINAL
        status = await d.stub.GetStatus(frontend_pb2.GetStatusRequest(), timeout=5)
        assert (status.redundancy_mode, status.queue_mode, status.k, status.batch_size) == ("coded", "rr", 2, 1)
        assert status.model == "lin" and list(status.input_shape) == [4] and status.encoder == "sum"
        assert status.input_dtype == tensor_pb2.FLOAT32 and status.dataset == "synthetic"
        assert json.loads(status.manifest_json)["name"] == "lin"
        assert status.manifest_path.endswith("lin.json")
        assert sorted(i.role for i in status.instances) == ["data", "data", "parity"]
        assert status.counters["reconstructions"] == 1 and status.counters["encodes"] == 1
        assert status.counters["groups"] == 1 and status.counters["partial_groups"] == 0
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{d.app.metrics_port}/metrics").read().decode())
        assert 'parm_frontend_e2e_latency_seconds_count{source="RECONSTRUCTED"} 1.0' in body
        assert "parm_frontend_reconstructions_total 1.0" in body
        assert "parm_frontend_encoding_latency_seconds_count 1.0" in body
        assert "parm_frontend_partial_groups_total 0.0" in body and "parm_frontend_groups_total 1.0" in body
        assert 'parm_frontend_queue_depth{role="data"}' in body
        await asyncio.sleep(1.6)        # the late original arrives and the group finishes
    finally:
        await d.close()
    lines = [json.loads(s) for s in (records / "queries.jsonl").read_text().splitlines()]
    queries = {r["request_id"]: r for r in lines if r["type"] == "query"}
    assert queries["r0"]["source"] == "RECONSTRUCTED" and queries["r0"]["group_id"] == 0
    assert queries["r1"]["source"] == "ORIGINAL" and queries["r1"]["batch_id"] == 1
    assert queries["r0"]["answered_s"] > queries["r0"]["received_s"]
    late = [r for r in lines if r["type"] == "late_original"]
    assert len(late) == 1 and late[0]["batch_id"] == 0 and late[0]["max_abs_error"] < 1e-3
    groups = [json.loads(s) for s in (records / "groups.jsonl").read_text().splitlines()]
    assert len(groups) == 1
    g = groups[0]
    assert g["missing_index"] == 0 and g["parity_batch_id"] == 2 and g["reason"] == "complete"
    assert g["encoding_latency_us"] > 0 and g["decoding_latency_us"] > 0
    assert g["late_original"]["argmax_agreement"] == 1.0


async def test_registry_joins_and_leaves(models):
    from services.common.registry import EmbeddedRedis, Instance, RedisRegistry

    with EmbeddedRedis() as redis_server:
        reg = RedisRegistry(redis_server.url, "t")
        servicer, built, address = await start_fake()
        app = None
        try:
            await reg.register(Instance("d-a", address, "data", model="lin"), ttl_s=30)
            cfg = parse_config(["--model", str(models["base"]), "--host", "127.0.0.1",
                                "--registry-url", redis_server.url, "--deployment", "t",
                                "--registry-poll-ms", "100"])
            app = build_server(cfg)
            await app.start()
            assert list(app.engine.instances) == ["d-a"]
            async with insecure_channel(f"127.0.0.1:{app.port}") as ch:
                stub = frontend_pb2_grpc.FrontendStub(ch)
                r = await stub.Predict(frontend_pb2.PredictRequest(input=tensors.to_proto(x(2))), timeout=5)
                np.testing.assert_array_equal(tensors.from_proto(r.output), lin(x(2))[0])
                await reg.register(Instance("d-b", address, "data"), ttl_s=30)
                await reg.deregister("d-a")
                for _ in range(50):
                    await asyncio.sleep(0.05)
                    if list(app.engine.instances) == ["d-b"]:
                        break
                assert list(app.engine.instances) == ["d-b"]
                status = await stub.GetStatus(frontend_pb2.GetStatusRequest(), timeout=5)
                assert [i.instance_id for i in status.instances] == ["d-b"]
        finally:
            if app is not None:
                await app.stop(grace_s=0)
            await built.server.stop(0)
            await reg.close()


@pytest.mark.parametrize("argv, message", [
    (["--mode", "bogus"], "invalid choice: 'bogus'"),
    (["--model", "/nonexistent/m.json", "--instances", "data=h:1"], "cannot read manifest"),
    (None, "give --instances"),
    (["--instances", "gpu=h:1"], "role data|parity|backup"),
])
def test_cli_mistakes_are_one_line_and_nonzero(models, argv, message):
    if argv is None or argv[0] == "--instances":
        argv = ["--model", str(models["base"])] + (argv or [])
    proc = subprocess.run([sys.executable, "-m", "services.frontend", *argv], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


async def test_coded_through_the_coder_service(models):
    from services.common.procs import ServiceProcess

    coder = await asyncio.to_thread(ServiceProcess.python_module, "services.coder", ["--port", "0"], name="coder")
    d = None
    try:
        d = await Deployment().start(
            models, {"d0": ("data", {"delay_s": 2.0}), "d1": ("data", {}), "p0": ("parity", {})},
            "--mode", "coded", "--parity-model", models["parity"], "--coder", coder.address,
            "--queue-mode", "rr")
        first = asyncio.ensure_future(d.predict(x(3), "a"))
        await asyncio.sleep(0.1)
        other = await d.predict(x(4), "b")
        slow = await first
        assert slow.source == frontend_pb2.RECONSTRUCTED and other.source == frontend_pb2.ORIGINAL
        np.testing.assert_allclose(tensors.from_proto(slow.output), lin(x(3) + x(4))[0] - lin(x(4))[0],
                                   rtol=1e-5, atol=1e-5)
        assert d.app.engine.counters["encodes"] == 1 and d.app.engine.counters["decodes"] == 1
    finally:
        if d is not None:
            await d.close()
        await asyncio.to_thread(coder.stop)


@pytest.mark.parametrize("mode, spec, flags, source", [
    ("cheap", {"d0": ("data", {"delay_s": 1.0}), "b0": ("backup", {"scale": 0.5})},
     ("--backup-model",), frontend_pb2.BACKUP),
    ("hedged", {"d0": ("data", {"delay_s": 1.0}), "d1": ("data", {})}, ("--hedge-delay-ms", "50"),
     frontend_pb2.ORIGINAL),
])
async def test_cheap_and_hedged_answer_around_a_slow_instance(models, mode, spec, flags, source):
    extra = [flags[0], models["backup"]] if mode == "cheap" else list(flags)
    d = await Deployment().start(models, spec, "--mode", mode, *extra)
    try:
        t0 = asyncio.get_running_loop().time()
        r = await d.predict(x(5), timeout=5)
        assert asyncio.get_running_loop().time() - t0 < 0.8      # did not wait for the slow instance
        assert r.source == source
        scale = 0.5 if mode == "cheap" else 1.0
        np.testing.assert_allclose(tensors.from_proto(r.output), lin(x(5))[0] * scale, rtol=1e-6)
        if mode == "hedged":
            assert d.app.engine.counters["hedges"] == 1
    finally:
        await d.close()
