"""End to end on the testbed: frontend, 2 data + 1 parity instance, load generator, a shuffle.

The model is linear (``y = W x + b``) and its parity model is ``W x + 2b``,
so with the sum encoder a reconstruction is exact: every answer, whichever
instance or decoder produced it, must equal the base model's argmax.
"""

import asyncio
import json
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploy.network.netns import NetnsLauncher, Testbed, TestbedSpec
from deploy.network.shuffle import ShuffleCoordinator
from services.common.manifest import Manifest

INPUT_SHAPE = (784,)  # MNIST-sized float32 query: 3136 bytes
NUM_CLASSES = 10
FRONTEND, DATA, PARITY, CLIENT = 0, (1, 2), 3, 4
QUERIES, WARMUP, RATE = 60, 6, 30.0
SHUFFLE_BYTES = 2_000_000


def write_linear_model(directory, name, weight, bias, role="base", k=None, encoder=None):
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "W", "b"], ["output"])],
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *INPUT_SHAPE])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", NUM_CLASSES])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(directory / f"{name}.onnx"))
    manifest = Manifest(
        name=name, role=role, arch="linear", dataset="synthetic", split_seed=0, split={},
        input_shape=INPUT_SHAPE, input_dtype="float32", output_shape=(NUM_CLASSES,),
        onnx_file=f"{name}.onnx", k=k, encoder=encoder,
    )
    path = directory / f"{name}.json"
    manifest.save(path)
    return path


@pytest.fixture
def models(tmp_path):
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((784, NUM_CLASSES)).astype(np.float32)
    bias = rng.standard_normal(NUM_CLASSES).astype(np.float32)
    base = write_linear_model(tmp_path, "lin", weight, bias)
    parity = write_linear_model(tmp_path, "lin-parity-k2-sum", weight, 2 * bias, role="parity", k=2, encoder="sum")
    x = rng.standard_normal((40, *INPUT_SHAPE)).astype(np.float32)
    labels = np.argmax(x @ weight + bias, axis=1)
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, X=x, y=labels)
    return base, parity, inputs


@pytest.mark.slow
def test_queries_are_answered_correctly_across_the_testbed_during_a_shuffle(netns, models, tmp_path):
    base, parity, inputs = models
    with Testbed(TestbedSpec(5)) as tb, NetnsLauncher(tb) as launcher:
        logs = tmp_path / "logs"
        instances, agents = [], []
        for role, host in (("data", DATA[0]), ("data", DATA[1]), ("parity", PARITY)):
            model = parity if role == "parity" else base
            started = launcher.start(
                "services.model_server", ["--model", model, "--role", role, "--host", launcher.bind_address(host)],
                name=f"{role}{host}", host=host, log_path=logs / f"{role}{host}.log",
            )
            instances.append(f"{role}={started.address}")
            agents.append(launcher.start(
                "deploy.network.shuffle", ["agent", "--host", launcher.bind_address(host)],
                name=f"agent{host}", host=host, log_path=logs / f"agent{host}.log",
            ).address)
        frontend = launcher.start(
            "services.frontend",
            # The paper's groups (every two queries, one sum), so the parity host's bytes are known:
            # padding would send a sum only for a query still unanswered when its group stops
            # waiting, which with this 1 ms model is rare (padding: tests/frontend/test_padding.py).
            ["--mode", "coded", "--k", "2", "--encoder", "sum", "--model", base, "--parity-model", parity,
             "--partial-groups", "uncoded",
             "--instances", ",".join(instances), "--host", launcher.bind_address(FRONTEND)],
            name="frontend", host=FRONTEND, log_path=logs / "frontend.log",
        )
        before = tb.link_stats()
        out = tmp_path / "run"

        async def run():
            loadgen = await asyncio.create_subprocess_exec(*tb.exec_argv(CLIENT, [
                sys.executable, "-m", "loadgen", "--target", frontend.address, "--rate", RATE,
                "--num-queries", QUERIES, "--warmup-queries", WARMUP, "--inputs", inputs,
                "--out", out, "--no-progress", "--seed", 3,
            ]), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            await asyncio.sleep(0.5)
            # One shuffle data instance 0 -> data instance 1 and back, while the load runs.
            moved = await ShuffleCoordinator(agents, n=0).shuffle_once(0, 1, SHUFFLE_BYTES)
            output, _ = await loadgen.communicate()
            return moved, loadgen.returncode, output.decode()

        moved, code, output = asyncio.run(run())
        after = tb.link_stats()
        assert code == 0, output
        summary = json.loads((out / "summary.json").read_text())
        # Every measured query answered, every answer the base model's.
        assert (summary["num_sent"], summary["num_warmup"]) == (QUERIES, WARMUP)
        assert summary["overall"]["num"] == QUERIES and summary["errors"] == {}, summary
        assert summary["overall"]["accuracy"] == 1.0, summary
        by_source = summary["by_source"]
        assert by_source["original"]["num"] + by_source["reconstructed"]["num"] == QUERIES, by_source
        assert summary["meta"]["redundancy_mode"] == "coded"

        grew = {(i, d): getattr(after[i], d).bytes - getattr(before[i], d).bytes for i in range(5) for d in ("up", "down")}
        query_bytes = (QUERIES + WARMUP) * 784 * 4  # payload only; frames and gRPC add more
        # Queries left the client's host and reached the frontend over shaped links...
        assert grew[(CLIENT, "up")] >= query_bytes and grew[(FRONTEND, "down")] >= query_bytes, grew
        # ...which sent them on to the data instances and their sums to the parity instance.
        assert grew[(FRONTEND, "up")] >= 1.4 * query_bytes, grew
        assert grew[(PARITY, "down")] >= 0.4 * query_bytes, grew
        # The shuffle went over the two data hosts' links, and only theirs.
        assert moved == 2 * SHUFFLE_BYTES
        for host in DATA:
            assert grew[(host, "up")] >= SHUFFLE_BYTES and grew[(host, "down")] >= SHUFFLE_BYTES, grew
        assert grew[(PARITY, "up")] < SHUFFLE_BYTES / 4, grew
        assert tb.describe()["network"] == "netns"
