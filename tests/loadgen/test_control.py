"""The control service: ``python -m loadgen serve`` processes driven by
``loadgen.control.run_remote``."""

import asyncio
import json

import grpc
import numpy as np
import pytest

from loadgen import Spec
from loadgen.control import RemoteRunError, build_server, run_remote, run_remote_async, stop_remote
from parm.v1 import loadgen_pb2, loadgen_pb2_grpc
from services.common.procs import ServiceProcess
from services.common.server import insecure_channel
from tests.loadgen.fake_frontend import default_behaviour


@pytest.fixture
def generators():
    procs = [ServiceProcess.python_module("loadgen", ["serve", "--port", "0", "--log-level", "WARNING"],
                                          name=f"lg{i}") for i in range(2)]
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


def test_ready_file_and_remote_run_merges_records(generators, fake_frontend, inputs_npz):
    info = generators[0].info
    assert info["pid"] == generators[0].pid and info["port"] > 0
    progress = []
    spec = Spec(target=fake_frontend.address, rate=200, num_queries=61, warmup_queries=3,
                inputs_path=str(inputs_npz), run_id="r1", seed=9)
    result = run_remote([g.address for g in generators], spec,
                        on_progress=lambda i, p: progress.append((i, p.completed, p.total)))
    assert not result.stopped
    assert len(result.records) == 64
    assert result.meta["redundancy_mode"] == "coded" and result.meta["spec"]["rate"] == 200
    assert result.meta["inputs"] == f"inputs {inputs_npz}"
    assert [g["num_records"] for g in result.per_generator] == [33, 31]
    assert {r.request_id for r in result.records} == set(fake_frontend.seen)
    table = default_behaviour()
    for r in result.records:
        assert fake_frontend.seen[r.request_id] == r.label
        assert r.status == ("RESOURCE_EXHAUSTED" if table[r.label].error else "OK")
    # Progress was streamed by both generators and reached their totals.
    assert {i for i, *_ in progress} == {0, 1}
    assert (0, 33, 33) in progress and (1, 31, 31) in progress
    # The same generators run again (the run ids are free again).
    again = run_remote([g.address for g in generators], spec)
    assert len(again.records) == 64


def test_stop_ends_a_long_run_with_the_records_so_far(generators, fake_frontend, inputs_npz):
    spec = Spec(target=fake_frontend.address, rate=50, duration_s=600, inputs_path=str(inputs_npz),
                run_id="long")
    addresses = [g.address for g in generators]

    async def main():
        task = asyncio.create_task(run_remote_async(addresses, spec))
        while len(fake_frontend.seen) < 20:
            await asyncio.sleep(0.05)
        assert await stop_remote(addresses, "long") == 2
        return await asyncio.wait_for(task, 30)

    result = asyncio.run(main())
    assert result.stopped
    assert 20 <= len(result.records) < 2000
    assert {r.status for r in result.records} <= {"OK", "RESOURCE_EXHAUSTED", "CANCELLED"}


def test_no_frontend_is_unavailable_with_the_address(generators, inputs_npz):
    spec = Spec(target="127.0.0.1:1", rate=10, num_queries=5, inputs_path=str(inputs_npz))
    with pytest.raises(RemoteRunError) as err:
        run_remote([generators[0].address], spec)
    assert "UNAVAILABLE" in str(err.value) and "127.0.0.1:1" in str(err.value)


def test_bad_spec_is_invalid_argument_and_stop_of_unknown_run_is_false():
    async def main():
        built = build_server("127.0.0.1:0")
        await built.server.start()
        channel = insecure_channel(f"127.0.0.1:{built.port}")
        stub = loadgen_pb2_grpc.LoadGeneratorStub(channel)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Run(loadgen_pb2.RunSpec(target="x:1", rate=0, num_queries=3,
                                                            deadline_s=1)):
                    pass
            stopped = await stub.Stop(loadgen_pb2.StopRequest(run_id="nope"))
            return err.value, stopped
        finally:
            await channel.close()
            await built.server.stop(0)

    err, stopped = asyncio.run(main())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "rate" in err.details()
    assert stopped.stopped is False


def test_inputs_from_the_frontend_manifest(tmp_path):
    """GetStatus's manifest_json names the dataset; its test split is sent."""
    from datasplits import load_split
    from tests.loadgen.fake_frontend import FakeFrontend
    import loadgen

    manifest = {"name": "digits-mlp", "role": "base", "arch": "mlp", "dataset": "digits",
                "split_seed": 0, "split": {}, "input_shape": [1, 8, 8], "input_dtype": "float32",
                "output_shape": [10], "onnx_file": "x.onnx"}
    x, y = load_split("digits", split="test", split_seed=0)
    with FakeFrontend(manifest_json=json.dumps(manifest)) as fe:
        # The fake reads label = round(10 * x.flat[0]); digits' first pixel
        # is always 0, so every query is answered as label 0 by the fake.
        result = loadgen.run(target=fe.address, rate=500, num_queries=30, seed=1)
    assert len(result.records) == 30 and result.meta["inputs"].startswith("digits test split")
    from loadgen.schedule import build_schedule
    schedule = build_schedule(500, num_examples=len(x), seed=1, num_queries=30)
    assert [r.label for r in result.records] == [int(y[i]) for i in schedule.examples]
    assert all(r.predicted == 0 for r in result.records)
    assert float(np.abs(x[:, 0, 0, 0]).max()) == 0.0


def test_serve_on_a_taken_port_is_one_line(generators):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "loadgen", "serve", "--port", str(generators[0].port)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"python -m loadgen: error: cannot serve on 127.0.0.1:{generators[0].port}: Address already in use"]
