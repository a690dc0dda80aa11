"""The model server as a real process: inference, validation, health, registry, perturbations."""

import asyncio
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from parm.v1 import model_server_pb2 as pb
from parm.v1 import model_server_pb2_grpc as pb_grpc
from services.common import tensors
from services.common.procs import ServiceProcess
from services.common.registry import RedisRegistry
from services.common.server import insecure_channel
from tests.services.conftest import INPUT_SHAPE, OUTPUT_SHAPE

SERVICE = "parm.v1.ModelServer"


def start_server(model, *args, name="model_server"):
    return ServiceProcess.python_module(
        "services.model_server", ["--model", model, "--port", "0", *args], name=name)


def run(coro):
    return asyncio.run(coro)


async def _rpc(address, fn):
    async with insecure_channel(address) as channel:
        return await fn(pb_grpc.ModelServerStub(channel), channel)


def infer(address, batch, timeout_s=10.0, batch_id=7):
    async def fn(stub, _):
        return await stub.Infer(pb.InferRequest(input=tensors.to_proto(batch), batch_id=batch_id), timeout=timeout_s)

    return run(_rpc(address, fn))


def infer_error(address, request, timeout_s=10.0):
    async def fn(stub, _):
        try:
            await stub.Infer(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details()
        return None

    return run(_rpc(address, fn))


def set_perturbation(address, clear=False, **fields):
    async def fn(stub, _):
        if clear:
            req = pb.SetPerturbationRequest(clear=True)
        else:
            req = pb.SetPerturbationRequest(perturbation=pb.Perturbation(**fields))
        return await stub.SetPerturbation(req, timeout=5)

    return run(_rpc(address, fn))


def get_info(address):
    return run(_rpc(address, lambda stub, _: stub.GetInfo(pb.GetInfoRequest(), timeout=5)))


def health(address, service=SERVICE):
    async def fn(_, channel):
        stub = health_pb2_grpc.HealthStub(channel)
        return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status

    return run(_rpc(address, fn))


def batch_of(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *INPUT_SHAPE)).astype(np.float32)


def reference_output(model_json, batch):
    session = ort.InferenceSession(str(model_json).replace(".json", ".onnx"), providers=["CPUExecutionProvider"])
    return session.run(["output"], {"input": batch})[0]


@pytest.fixture(scope="module")
def server(tiny_model):
    proc = start_server(tiny_model, "--instance-id", "ms-test", "--seed", "11", "--max-batch", "64")
    yield proc
    proc.stop()


@pytest.fixture
def clean_perturbation(server):
    yield server
    set_perturbation(server.address, clear=True)


# --- inference and validation -----------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 64])
def test_inference_equals_onnx_runtime(server, tiny_model, n):
    batch = batch_of(n, seed=n)
    reply = infer(server.address, batch)
    got = tensors.from_proto(reply.output)
    assert got.shape == (n, *OUTPUT_SHAPE)
    np.testing.assert_allclose(got, reference_output(tiny_model, batch), rtol=1e-6, atol=1e-6)
    assert reply.batch_id == 7 and reply.instance_id == "ms-test"
    assert reply.inference_ms > 0 and reply.emulated_ms == 0 and reply.perturbation_ms == 0


@pytest.mark.parametrize(
    "request_, message",
    [
        (pb.InferRequest(input=tensors.to_proto(np.zeros((2, *INPUT_SHAPE), np.int64))),
         "input: dtype int64 does not match the model's float32"),
        (pb.InferRequest(input=tensors.to_proto(np.zeros((2, 3, 2), np.float32))),
         "input: shape [2, 3, 2] does not match the model's (B, 2, 3)"),
        (pb.InferRequest(input=tensors.to_proto(np.zeros(INPUT_SHAPE, np.float32))),
         "input: shape [2, 3] does not match the model's (B, 2, 3)"),
        (pb.InferRequest(input=tensors.to_proto(np.zeros((0, *INPUT_SHAPE), np.float32))),
         "input: empty batch"),
        (pb.InferRequest(input=tensors.to_proto(np.zeros((65, *INPUT_SHAPE), np.float32))),
         "input: batch of 65 exceeds --max-batch 64"),
        (pb.InferRequest(input=pb.InferRequest().input.__class__(dtype=1, shape=[1, 2, 3], data=b"\0" * 20)),
         "input: 20 data bytes, but shape [1, 2, 3] of float32 needs 24"),
        (pb.InferRequest(), "input: dtype is unspecified"),
    ],
)
def test_bad_input_is_invalid_argument_and_server_keeps_serving(server, tiny_model, request_, message):
    code, details = infer_error(server.address, request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(message)
    batch = batch_of(3)
    np.testing.assert_allclose(tensors.from_proto(infer(server.address, batch).output),
                               reference_output(tiny_model, batch), rtol=1e-6, atol=1e-6)


def test_health_serving_and_info(server):
    assert health(server.address) == health_pb2.HealthCheckResponse.SERVING
    assert health(server.address, "") == health_pb2.HealthCheckResponse.SERVING
    info = get_info(server.address)
    assert info.instance_id == "ms-test" and info.role == "data" and info.model_name == "tiny-mlp"
    assert info.provider == "CPUExecutionProvider" and server.info["provider"] == "CPUExecutionProvider"
    assert list(info.available_providers) == ort.get_available_providers()
    assert '"name": "tiny-mlp"' in info.manifest_json
    assert info.served >= 1 and info.failed >= 0


def test_counters_count_served_and_failed(server):
    before = get_info(server.address)
    infer(server.address, batch_of(2))
    infer_error(server.address, pb.InferRequest(input=tensors.to_proto(np.zeros((1, 6), np.float32))))
    after = get_info(server.address)
    assert (after.served - before.served, after.failed - before.failed) == (1, 1)


# --- perturbations ------------------------------------------------------------------


def test_delay_and_stall_take_effect_and_clear(clean_perturbation):
    address = clean_perturbation.address
    reply = set_perturbation(address, delay=pb.Distribution(kind="constant", params={"value_ms": 150}),
                             stall_probability=1.0, stall_ms=100)
    assert reply.perturbation.delay.kind == "constant" and reply.perturbation.stall_ms == 100
    start = time.monotonic()
    slow = infer(address, batch_of(1))
    elapsed_ms = (time.monotonic() - start) * 1000
    assert slow.perturbation_ms == 250.0 and elapsed_ms >= 250
    assert get_info(address).perturbation.delay.params["value_ms"] == 150
    set_perturbation(address, clear=True)
    assert infer(address, batch_of(1)).perturbation_ms == 0
    assert get_info(address).perturbation.delay.kind == "none"


def test_fail_probability_answers_unavailable_then_clears(clean_perturbation, tiny_model):
    address = clean_perturbation.address
    set_perturbation(address, fail_probability=1.0)
    request = pb.InferRequest(input=tensors.to_proto(batch_of(2)))
    assert infer_error(address, request) == (grpc.StatusCode.UNAVAILABLE,
                                              "injected failure (perturbation fail_probability)")
    set_perturbation(address, clear=True)
    assert infer_error(address, request) is None


def test_hang_accepts_and_never_answers_until_cleared(clean_perturbation):
    address = clean_perturbation.address
    set_perturbation(address, hang=True)
    request = pb.InferRequest(input=tensors.to_proto(batch_of(1)))
    start = time.monotonic()
    assert infer_error(address, request, timeout_s=0.5)[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start >= 0.5
    # The server still answers admin RPCs while hanging.
    assert get_info(address).perturbation.hang

    async def held_then_released():
        async with insecure_channel(address) as channel:
            stub = pb_grpc.ModelServerStub(channel)
            held = asyncio.ensure_future(stub.Infer(request, timeout=10))
            await asyncio.sleep(0.3)
            was_done = held.done()
            await stub.SetPerturbation(pb.SetPerturbationRequest(clear=True), timeout=5)
            reply = await held
            return was_done, reply.output.shape

    was_done, shape = run(held_then_released())
    assert not was_done and list(shape) == [1, *OUTPUT_SHAPE]


def test_duration_auto_clears(clean_perturbation):
    address = clean_perturbation.address
    set_perturbation(address, fail_probability=1.0, duration_s=1.5)
    request = pb.InferRequest(input=tensors.to_proto(batch_of(1)))
    assert infer_error(address, request)[0] == grpc.StatusCode.UNAVAILABLE
    time.sleep(1.8)
    assert infer_error(address, request) is None
    assert get_info(address).perturbation.fail_probability == 0


def test_invalid_perturbation_is_rejected(clean_perturbation):
    address = clean_perturbation.address

    async def fn(stub, _):
        try:
            await stub.SetPerturbation(pb.SetPerturbationRequest(perturbation=pb.Perturbation(
                delay=pb.Distribution(kind="lognormal", params={"median_ms": 5}))), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details()

    assert run(_rpc(address, fn)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "distribution 'lognormal' takes parameters ['median_ms', 'sigma'], got ['median_ms']")
    assert infer(address, batch_of(1)).perturbation_ms == 0


def test_startup_flags_emulated_compute_and_delay(tiny_model):
    with start_server(tiny_model, "--compute-dist", "constant", "--compute-params", "value_ms=40",
                      "--delay-dist", "uniform", "--delay-params", "low_ms=10,high_ms=20",
                      "--perturb-duration-s", "60", "--seed", "5") as proc:
        first = infer(proc.address, batch_of(2))
        info = get_info(proc.address)
    assert first.emulated_ms == 40.0 and 10 <= first.perturbation_ms <= 20
    assert info.emulated_compute.kind == "constant" and info.emulated_compute.seed == 5
    assert info.perturbation.delay.kind == "uniform" and info.perturbation.duration_s == 60


def test_seeded_delays_are_reproducible(tiny_model):
    def draws():
        with start_server(tiny_model, "--delay-dist", "exponential", "--delay-params", "mean_ms=2",
                          "--seed", "42") as proc:
            return [infer(proc.address, batch_of(1)).perturbation_ms for _ in range(3)]

    first, second = draws(), draws()
    assert first == second and len(set(first)) == 3


def test_stop_perturbation_exits_at_once(tiny_model):
    proc = start_server(tiny_model)
    try:
        set_perturbation(proc.address, stop=True)
        proc.proc.wait(timeout=10)
        assert proc.proc.returncode == -signal.SIGKILL
    finally:
        proc.stop()


# --- registry -----------------------------------------------------------------------


def _list(url, deployment, role=None):
    async def body():
        r = RedisRegistry(url, deployment)
        try:
            return await r.list(role)
        finally:
            await r.close()

    return run(body())


def _wait_until(predicate, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_registers_heartbeats_and_expires_after_kill_9(redis_server, tiny_parity_model):
    proc = start_server(tiny_parity_model, "--registry-url", redis_server.url, "--deployment", "ms-kill",
                        "--instance-id", "p-1", "--heartbeat-s", "0.3", "--ttl-s", "1.5")
    try:
        [inst] = _list(redis_server.url, "ms-kill")
        assert (inst.instance_id, inst.address, inst.role, inst.model, inst.k) == (
            "p-1", proc.address, "parity", "tiny-mlp-parity-k2-sum", 2)
        assert inst.meta["provider"] == "cpu" and inst.meta["pid"] == proc.pid
        time.sleep(2.0)  # longer than the TTL: heartbeats keep it
        assert [i.instance_id for i in _list(redis_server.url, "ms-kill", "parity")] == ["p-1"]
        proc.kill(signal.SIGKILL)
        killed_at = time.monotonic()
        assert _wait_until(lambda: _list(redis_server.url, "ms-kill") == [], timeout_s=5)
        assert time.monotonic() - killed_at <= 3.0
    finally:
        proc.stop()


def test_sigterm_deregisters_and_exits_cleanly(redis_server, tiny_model):
    proc = start_server(tiny_model, "--registry-url", redis_server.url, "--deployment", "ms-term",
                        "--role", "backup", "--ttl-s", "30")
    assert [i.role for i in _list(redis_server.url, "ms-term")] == ["backup"]
    assert proc.stop() == 0
    assert _list(redis_server.url, "ms-term") == []  # removed at once, not by the 30 s TTL
    assert "shutting down" in proc.tail_log()


# --- health before the model is loaded (in-process) ------------------------------------


def test_health_not_serving_until_loaded(tiny_model):
    from services.model_server.app import build_server
    from services.model_server.config import parse_config

    async def body():
        app = build_server(parse_config(["--model", str(tiny_model), "--port", "0", "--startup-delay-s", "0.5"]))
        await app.start()
        address = f"127.0.0.1:{app.port}"
        try:
            async with insecure_channel(address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                ms = pb_grpc.ModelServerStub(channel)
                before = (await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)).status
                try:
                    await ms.Infer(pb.InferRequest(input=tensors.to_proto(batch_of(1))), timeout=5)
                    early = None
                except grpc.aio.AioRpcError as exc:
                    early = exc.code()
                await app.load()
                after = (await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)).status
                reply = await ms.Infer(pb.InferRequest(input=tensors.to_proto(batch_of(1))), timeout=5)
                await app.built.set_serving(False)  # first step of the SIGTERM path
                stopping = (await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)).status
            return before, early, after, list(reply.output.shape), stopping
        finally:
            await app.server.stop(0)
            await app.shutdown()

    before, early, after, shape, stopping = run(body())
    assert before == health_pb2.HealthCheckResponse.NOT_SERVING
    assert early == grpc.StatusCode.UNAVAILABLE
    assert after == health_pb2.HealthCheckResponse.SERVING and shape == [1, *OUTPUT_SHAPE]
    assert stopping == health_pb2.HealthCheckResponse.NOT_SERVING


# --- command line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, code, text",
    [
        (["--model", "x.json", "--bogus"], 2, "unrecognized arguments: --bogus"),
        (["--model", "x.json", "--compute-dist", "lognormal", "--compute-params", "median_ms=5"], 2,
         "distribution 'lognormal' takes parameters"),
        (["--model", "x.json", "--compute-params", "value_ms"], 2, "--compute-params: parameter 'value_ms'"),
        (["--model", "x.json", "--heartbeat-s", "5"], 2, "--heartbeat-s"),
        (["--model", "x.json", "--fail-probability", "1.5"], 2, "fail_probability = 1.5 not in [0, 1]"),
        (["--model", "/nonexistent/m.json"], 1, "cannot read manifest /nonexistent/m.json"),
    ],
)
def test_cli_mistakes_are_one_line(args, code, text):
    out = subprocess.run([sys.executable, "-m", "services.model_server", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == code
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0] and "Traceback" not in out.stderr


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available")
def test_cli_cuda_without_cuda_is_one_line(tiny_model):
    out = subprocess.run([sys.executable, "-m", "services.model_server", "--model", str(tiny_model),
                          "--provider", "cuda"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        out.stderr.strip()] and "--provider cuda: CUDAExecutionProvider is not available" in out.stderr


def test_onnx_path_is_accepted(tiny_model):
    onnx_path = str(tiny_model).replace(".json", ".onnx")
    with start_server(onnx_path, "--role", "parity", "--k", "3") as proc:
        info = get_info(proc.address)
        np.testing.assert_allclose(tensors.from_proto(infer(proc.address, batch_of(4)).output),
                                   reference_output(tiny_model, batch_of(4)), rtol=1e-6, atol=1e-6)
    assert (info.role, info.k) == ("parity", 3)


def test_admin_cli_set_info_clear(server):
    def admin(*args):
        return subprocess.run([sys.executable, "-m", "services.model_server.admin", server.address, *args],
                              capture_output=True, text=True, timeout=60)

    try:
        out = admin("set", "--delay-dist", "constant", "--delay-params", "value_ms=30")
        assert out.returncode == 0 and '"value_ms": 30.0' in out.stdout
        assert infer(server.address, batch_of(1)).perturbation_ms == 30.0
        assert '"instanceId": "ms-test"' in admin("info").stdout
        bad = admin("set", "--stall-probability", "-1")
        assert bad.returncode == 1 and bad.stderr.startswith(
            "python -m services.model_server.admin: error: INVALID_ARGUMENT: perturbation stall_probability")
    finally:
        assert admin("clear").returncode == 0
    assert infer(server.address, batch_of(1)).perturbation_ms == 0


@pytest.mark.parametrize("args, code, text", [
    (["127.0.0.1:1", "set", "--delay-params", "value_ms"], 2, "--delay-params: parameter 'value_ms'"),
    (["127.0.0.1:1", "bogus"], 2, "invalid choice: 'bogus'"),
    (["127.0.0.1:1", "--timeout-s", "0.5", "info"], 1, "UNAVAILABLE"),
])
def test_admin_cli_mistakes_are_one_line(args, code, text, capsys):
    from services.model_server import admin

    assert admin.main(args) == code
    err = capsys.readouterr().err
    assert err.startswith("python -m services.model_server.admin: error: ") and text in err
    assert len(err.strip().splitlines()) == 1


def test_cli_unloadable_model_is_one_line(tiny_model, tmp_path):
    import shutil

    manifest = tmp_path / tiny_model.name
    shutil.copy(tiny_model, manifest)
    (tmp_path / tiny_model.name.replace(".json", ".onnx")).write_bytes(b"not an onnx model")
    out = subprocess.run([sys.executable, "-m", "services.model_server", "--model", str(manifest)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]  # after the log lines of the start
    assert last.startswith("python -m services.model_server: error: cannot load ") and "Protobuf" in last
    assert "Traceback" not in out.stderr
