"""End to end: real registry, real model-server processes, a real frontend process.

Coded mode, k = 2. One data instance is delayed heavily mid-run, then killed
with SIGKILL. Every query must be answered; reconstructed answers are flagged
and equal ``Fp(P) - F(other)`` computed independently with ONNX Runtime from
the model files; originals equal ``F(x)``; the frontend keeps serving.
"""

import asyncio
import json

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from parm.v1 import frontend_pb2, frontend_pb2_grpc, model_server_pb2, model_server_pb2_grpc
from services.common import manifest as manifest_mod
from services.common import tensors
from services.common.procs import ServiceProcess
from services.common.registry import EmbeddedRedis
from services.common.server import insecure_channel
from tests.frontend.models import write_deployment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

N_QUERIES = 120
RATE_QPS = 40.0
DELAY_AT, KILL_AT = 30, 70


def session(manifest_path):
    m = manifest_mod.load(manifest_path)
    return ort.InferenceSession(m.onnx_path, providers=["CPUExecutionProvider"])


def run_model(sess, x):
    return sess.run(["output"], {"input": np.asarray(x, np.float32)[None]})[0][0]


async def set_delay(address, ms):
    async with insecure_channel(address) as ch:
        stub = model_server_pb2_grpc.ModelServerStub(ch)
        await stub.SetPerturbation(model_server_pb2.SetPerturbationRequest(perturbation=model_server_pb2.Perturbation(
            delay=model_server_pb2.Distribution(kind="constant", params={"value_ms": ms}))), timeout=5)


def test_coded_survives_slow_then_killed_data_instance(tmp_path):
    models = write_deployment(tmp_path)
    records = tmp_path / "records"
    procs = []
    with EmbeddedRedis() as redis_server:
        try:
            common = ["--registry-url", redis_server.url, "--deployment", "e2e", "--heartbeat-s", "0.2",
                      "--ttl-s", "1.0"]
            data = [ServiceProcess.python_module("services.model_server", [
                "--model", models["base"], "--role", "data", "--instance-id", f"data-{i}", "--port", "0",
                *common], name=f"data-{i}") for i in range(2)]
            procs += data
            procs.append(ServiceProcess.python_module("services.model_server", [
                "--model", models["parity"], "--role", "parity", "--instance-id", "parity-0", "--port", "0",
                *common], name="parity-0"))
            frontend = ServiceProcess.python_module("services.frontend", [
                "--mode", "coded", "--model", models["base"], "--parity-model", models["parity"],
                "--registry-url", redis_server.url, "--deployment", "e2e", "--registry-poll-ms", "100",
                "--instance-timeout-ms", "1500", "--host", "127.0.0.1", "--port", "0",
                "--records-dir", records], name="frontend")
            procs.append(frontend)
            replies, inputs, status = asyncio.run(_drive(frontend.address, data))
            assert frontend.alive()
            assert frontend.stop() == 0      # SIGTERM: graceful, records flushed
        finally:
            for p in reversed(procs):
                p.stop()

    # --- every query answered, none lost
    assert len(replies) == N_QUERIES
    errors = {rid: r for rid, r in replies.items() if isinstance(r, str)}
    assert not errors, errors
    sources = [r.source for r in replies.values()]
    n_rec = sources.count(frontend_pb2.RECONSTRUCTED)
    print(f"reconstructed {n_rec} of {N_QUERIES}; counters {dict(status.counters)}")
    assert n_rec >= 2, f"expected reconstructions, sources={sources}"
    assert set(sources) <= {frontend_pb2.ORIGINAL, frontend_pb2.RECONSTRUCTED}

    # --- values, computed independently with ONNX Runtime from the model files
    f, fp = session(models["base"]), session(models["parity"])
    by_batch = {r.batch_id: rid for rid, r in replies.items()}
    for rid, r in replies.items():
        out = tensors.from_proto(r.output)
        if r.source == frontend_pb2.ORIGINAL:
            np.testing.assert_allclose(out, run_model(f, inputs[rid]), rtol=1e-5, atol=1e-5)
            continue
        g = r.group_id
        index = r.batch_id - 3 * g
        other = by_batch.get(3 * g + (1 - index))
        # A padded group (its sibling never came): the sibling is a batch of zeros.
        sibling = inputs[other] if other is not None else np.zeros_like(inputs[rid])
        expected = run_model(fp, inputs[rid] + sibling) - run_model(f, sibling)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(out, run_model(f, inputs[rid]), rtol=1e-4, atol=1e-3)

    # --- the frontend saw the kill: the dead instance left, nothing is pending
    assert status.counters["in_system"] == 0
    assert "data-0" not in [i.instance_id for i in status.instances]
    assert status.counters["instances_left"] >= 1

    # --- records: one OK line per query, sources agree with the replies
    lines = [json.loads(s) for s in (records / "queries.jsonl").read_text().splitlines()]
    recs = {r["request_id"]: r for r in lines if r["type"] == "query"}
    assert len(recs) == N_QUERIES and all(r["status"] == "OK" for r in recs.values())
    assert sum(r["source"] == "RECONSTRUCTED" for r in recs.values()) == n_rec
    groups = [json.loads(s) for s in (records / "groups.jsonl").read_text().splitlines()]
    assert sum(g["missing_index"] is not None for g in groups) >= n_rec
    # the stall monitor wrote its file beside them (each line a stall of the frontend's own process)
    stalls = [json.loads(s) for s in (records / "stalls.jsonl").read_text().splitlines()]
    assert all(s["type"] == "stall" and s["kind"] in ("gc", "loop", "cpu") and s["ms"] > 0 for s in stalls)
    assert all(s["span_ms"] > 0 for s in stalls if s["kind"] == "cpu")


async def _drive(address, data):
    rng = np.random.default_rng(0)
    inputs = {f"q{i}": rng.standard_normal(4).astype(np.float32) for i in range(N_QUERIES)}
    replies = {}
    async with insecure_channel(address) as ch:
        stub = frontend_pb2_grpc.FrontendStub(ch)

        async def one(rid):
            try:
                replies[rid] = await stub.Predict(frontend_pb2.PredictRequest(
                    input=tensors.to_proto(inputs[rid]), request_id=rid), timeout=15)
            except grpc.aio.AioRpcError as exc:
                replies[rid] = f"{exc.code().name}: {exc.details()}"

        tasks = []
        for i in range(N_QUERIES):
            if i == DELAY_AT:
                await set_delay(data[0].address, 800)
            if i == KILL_AT:
                data[0].kill()            # SIGKILL, reaped
            tasks.append(asyncio.ensure_future(one(f"q{i}")))
            await asyncio.sleep(1.0 / RATE_QPS)
        await asyncio.gather(*tasks)
        await asyncio.sleep(2.0)         # the dead instance's key expires and it leaves
        status = await stub.GetStatus(frontend_pb2.GetStatusRequest(), timeout=5)
    return replies, inputs, status
