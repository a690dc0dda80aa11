"""Property-based fuzzing of ``Predict`` and ``ModelInfer`` against a real frontend.

``python -m deploy.reliability.fuzz --cases 10000`` starts a local deployment (registry,
one data instance, the frontend with ``--max-message-bytes``; real processes
over real gRPC), then sends hypothesis-generated requests, split over four
kinds:

- ``predict``: ``parm.v1.PredictRequest`` with malformed tensors: any dtype
  value (valid, unspecified, unknown enum numbers), any shape (empty, wrong
  rank, zero, negative, huge dimensions), data of any byte length, and
  well-formed float tensors full of NaN/Inf/extremes;
- ``infer``: KServe v2 ``ModelInferRequest`` with wrong model names and
  versions, 0-3 inputs, any datatype string, any shape, raw contents of any
  length, typed contents with NaN/Inf, unknown requested outputs;
- ``raw``: random bytes sent to either method through a generic
  ``unary_unary`` with identity serializers;
- ``big``: a message over the frontend's limit.

Every case must end, within its deadline, in OK (with an output of the
right shape) or a status in ``ALLOWED`` with a non-empty message; never
INTERNAL/UNKNOWN/UNAVAILABLE/DEADLINE_EXCEEDED. After the run the frontend
process must still be alive and answer a valid query. Prints the counts per
kind and status.
"""

import collections
import json
import pathlib
import sys
import tempfile
import time

import grpc
import numpy as np

from deploy.reliability.rig import missing_models, rig_errors, run_spec, start_rig
from services.common import cli

ALLOWED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"}
PREDICT = "/parm.v1.Frontend/Predict"
INFER = "/inference.GRPCInferenceService/ModelInfer"
CASE_DEADLINE_S = 10.0


class FuzzFailure(AssertionError):
    """A case broke the contract (the message names the case and the answer)."""


class Target:
    """Sync gRPC client of one frontend; ``call(kind, request)`` checks one case."""

    def __init__(self, address, input_shape, output_shape, model_name, *, max_message_bytes, tls=None):
        from parm.inference import grpc_service_pb2_grpc
        from parm.v1 import frontend_pb2_grpc
        from services.common.server import grpc_options

        opts = grpc_options(4 * max_message_bytes)  # the client may send more than the server takes
        if tls is not None and tls.client_enabled:
            self.channel = grpc.secure_channel(address, tls.channel_credentials(), options=opts)
        else:
            self.channel = grpc.insecure_channel(address, options=opts)
        self.predict = frontend_pb2_grpc.FrontendStub(self.channel).Predict
        self.infer = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel).ModelInfer
        self.raw = {m: self.channel.unary_unary(m, request_serializer=None, response_deserializer=None)
                    for m in (PREDICT, INFER)}
        self.input_shape = tuple(input_shape)
        self.output_shape = tuple(output_shape)
        self.model_name = model_name
        self.max_message_bytes = max_message_bytes
        self.counts = collections.Counter()

    def call(self, kind, fn, request, describe):
        start = time.monotonic()
        try:
            reply = fn(request, timeout=CASE_DEADLINE_S)
            code, details = "OK", ""
        except grpc.RpcError as exc:
            reply, code, details = None, exc.code().name, exc.details() or ""
        took = time.monotonic() - start
        self.counts[(kind, code)] += 1
        if code not in ALLOWED:
            raise FuzzFailure(f"{kind}: {describe()} -> {code} {details!r} after {took:.2f} s")
        if code != "OK" and not details.strip():
            raise FuzzFailure(f"{kind}: {describe()} -> {code} without a message")
        return code, reply, details

    def close(self):
        self.channel.close()


def _strategies(target):
    """Hypothesis strategies for the three request kinds."""
    from hypothesis import strategies as st

    from parm.inference import grpc_service_pb2 as ipb
    from parm.v1 import frontend_pb2, tensor_pb2

    n_in = int(np.prod(target.input_shape))
    finite_or_not = st.floats(width=32, allow_nan=True, allow_infinity=True)
    dims = st.one_of(st.integers(0, 8), st.integers(-5, -1), st.sampled_from([2**31, 2**40, 2**62, 2**63 - 1]),
                     st.integers(0, 2**63 - 1))
    shapes = st.one_of(st.lists(dims, max_size=6), st.just([1, *target.input_shape]),
                       st.just(list(target.input_shape)), st.integers(1, 4).map(lambda n: [n, *target.input_shape]))
    dtypes = st.one_of(st.sampled_from([0, 1, 2, 3, 4]), st.integers(-3, 300))

    @st.composite
    def predict(draw):
        t = tensor_pb2.Tensor()
        mode = draw(st.sampled_from(["random", "valid-shape", "nan"]))
        if mode == "random":
            t.dtype = draw(dtypes)
            t.shape.extend(draw(shapes))
            t.data = draw(st.binary(max_size=4 * n_in + 64))
        else:
            batch = draw(st.integers(1, 3))
            shape = [batch, *target.input_shape] if draw(st.booleans()) else list(target.input_shape)
            count = int(np.prod(shape))
            if mode == "nan":
                vals = draw(st.lists(finite_or_not, min_size=1, max_size=8))
                arr = np.resize(np.asarray(vals, dtype="<f4"), count)
            else:
                arr = np.frombuffer(draw(st.binary(min_size=count * 4, max_size=count * 4)), dtype="<f4")
            t.dtype = tensor_pb2.FLOAT32
            t.shape.extend(shape)
            t.data = arr.astype("<f4").tobytes()
            if draw(st.integers(0, 9)) == 0:  # off-by-some byte length
                t.data = t.data[: max(0, len(t.data) - draw(st.integers(1, 8)))]
        return frontend_pb2.PredictRequest(input=t, request_id=draw(st.text(max_size=20)))

    @st.composite
    def infer(draw):
        # mostly the right model, so that the tensor checks behind the name check are exercised
        name = target.model_name if draw(st.integers(0, 9)) else draw(st.sampled_from(["", "nope", "\x00"]))
        version = draw(st.sampled_from(["", "1"])) if draw(st.integers(0, 9)) else draw(st.sampled_from(["2", "x"]))
        req = ipb.ModelInferRequest(model_name=name, model_version=version, id=draw(st.text(max_size=10)))
        for _ in range(draw(st.sampled_from([1, 1, 1, 0, 2, 3]))):
            inp = req.inputs.add(name=draw(st.sampled_from(["input", "x", ""])),
                                 datatype=draw(st.sampled_from(["FP32", "FP32", "FP16", "INT64", "UINT8",
                                                                "BYTES", "", "fp32"])))
            shape = draw(st.one_of(shapes, st.integers(1, 3).map(lambda n: [n, *target.input_shape])))
            inp.shape.extend(shape)
            how = draw(st.sampled_from(["raw", "raw-exact", "typed", "none"]))
            count = int(np.prod(shape, dtype=object)) if shape and all(0 <= d < 2**20 for d in shape) else 1
            count = min(count, 4 * n_in)
            if how == "raw":
                req.raw_input_contents.append(draw(st.binary(max_size=4 * n_in + 16)))
            elif how == "raw-exact":
                vals = draw(st.lists(finite_or_not, min_size=1, max_size=8))
                req.raw_input_contents.append(np.resize(np.asarray(vals, dtype="<f4"), count).tobytes())
            elif how == "typed":
                vals = draw(st.lists(finite_or_not, min_size=1, max_size=8))
                inp.contents.fp32_contents.extend(np.resize(np.asarray(vals, dtype="<f4"), count).tolist())
        for name in draw(st.lists(st.sampled_from(["output", "logits"]), max_size=2)):
            req.outputs.add(name=name)
        return req

    raw = st.tuples(st.sampled_from([PREDICT, INFER]),
                    st.one_of(st.binary(max_size=256), st.binary(min_size=1000, max_size=5000)))
    return predict(), infer(), raw


def check_ok(target, kind, reply):
    """An OK reply must carry an output of the right shape."""
    from services.common.tensors import from_proto

    if kind == "predict":
        out = from_proto(reply.output, "output")
        if tuple(out.shape[-len(target.output_shape):]) != target.output_shape:
            raise FuzzFailure(f"predict: OK with output shape {out.shape}")
    elif kind == "infer":
        shape = tuple(reply.outputs[0].shape)
        if shape[1:] != target.output_shape or len(reply.raw_output_contents[0]) != 4 * int(np.prod(shape)):
            raise FuzzFailure(f"infer: OK with output shape {shape}")


def run_cases(target, cases, *, seed=0):
    """Runs ``cases`` hypothesis cases (predict/infer/raw: 45/45/10 %) plus a few ``big`` ones."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    predict_s, infer_s, raw_s = _strategies(target)
    n_raw = max(1, cases // 10)
    n_predict = (cases - n_raw) // 2
    n_infer = cases - n_raw - n_predict
    cfg = settings(max_examples=1, deadline=None, database=None, derandomize=True,
                   suppress_health_check=list(HealthCheck), phases=("generate",))

    def run(kind, strategy, n, body):
        test = settings(cfg, max_examples=n)(given(strategy)(body))
        test()

    def one_predict(req):
        code, reply, _ = target.call("predict", target.predict, req, lambda: _short(req))
        if code == "OK":
            check_ok(target, "predict", reply)

    def one_infer(req):
        code, reply, _ = target.call("infer", target.infer, req, lambda: _short(req))
        if code == "OK":
            check_ok(target, "infer", reply)

    def one_raw(pair):
        method, data = pair
        target.call("raw", target.raw[method], data, lambda: f"{method} {data[:40]!r}... ({len(data)} bytes)")

    # hypothesis stops at max_examples unique examples; loop until the counts are reached
    for kind, strategy, n, body in (("predict", predict_s, n_predict, one_predict),
                                    ("infer", infer_s, n_infer, one_infer),
                                    ("raw", raw_s, n_raw, one_raw)):
        for _ in range(50):
            done = sum(v for (k, _), v in target.counts.items() if k == kind)
            if done >= n:
                break
            run(kind, strategy, n - done, body)
    for size in (target.max_message_bytes + 1, 2 * target.max_message_bytes):
        code, _, details = target.call("big", target.raw[PREDICT], b"\x0a" + b"\x00" * (size - 1),
                                       lambda: f"{size} bytes")
        if code != "RESOURCE_EXHAUSTED":
            raise FuzzFailure(f"big: {size} bytes over a {target.max_message_bytes}-byte limit -> {code}")
    return target.counts


def _short(msg):
    text = str(msg).replace("\n", " ")
    return text[:300] + ("..." if len(text) > 300 else "")


def valid_query(target):
    """A well-formed Predict must still be answered OK."""
    from parm.v1 import frontend_pb2
    from services.common.tensors import to_proto

    x = np.zeros(target.input_shape, dtype=np.float32)
    reply = target.predict(frontend_pb2.PredictRequest(input=to_proto(x), request_id="after-fuzz"),
                           timeout=CASE_DEADLINE_S)
    check_ok(target, "predict", reply)
    return reply


PROG = "python -m deploy.reliability.fuzz"


def _main(argv):
    p = cli.ArgumentParser(prog=PROG, description="Fuzz Predict and ModelInfer.")
    p.add_argument("--artifacts", default="artifacts", help="model artifacts (make models)")
    p.add_argument("--cases", type=int, default=10000, help="hypothesis cases in all")
    p.add_argument("--max-message-bytes", type=int, default=1 << 20, help="the frontend's message limit")
    p.add_argument("--out", default="results/fuzz", help="logs and fuzz.json go here")
    a = p.parse_args(argv)
    if a.cases < 10:
        raise cli.UsageError("--cases must be >= 10")
    if missing_models(a.artifacts):
        raise cli.Failure(missing_models(a.artifacts))
    from services.common import manifest as manifest_mod

    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rig = start_rig(a.artifacts, run_spec(mode="none", num_models=1, compute_ms=0),
                    tempfile.mkdtemp(prefix="fuzz-", dir=out),
                    frontend_extra_args=["--max-message-bytes", str(a.max_message_bytes)])
    base = manifest_mod.load(rig.models.base)
    target = Target(rig.dep.frontend_address, base.input_shape, base.output_shape, base.name,
                    max_message_bytes=a.max_message_bytes)
    import psutil

    proc = psutil.Process(rig.dep.frontend.pid)
    t0 = time.monotonic()
    try:
        counts = run_cases(target, a.cases)
        valid_query(target)
        alive = rig.dep.frontend.alive()
        rss = proc.memory_info().rss
    except FuzzFailure as exc:
        raise cli.Failure(f"FAILED: {exc}") from None
    finally:
        target.close()
        rig.stop()
    took = time.monotonic() - t0
    total = sum(counts.values())
    print(f"{total} cases in {took:.0f} s; frontend alive after: {alive}; frontend RSS {rss / 2**20:.0f} MiB")
    for (kind, code), n in sorted(counts.items()):
        print(f"  {kind:<8} {code:<20} {n}")
    (out / "fuzz.json").write_text(json.dumps({"cases": total, "seconds": round(took, 1), "alive": alive,
                                               "counts": {f"{k}/{c}": n for (k, c), n in counts.items()}},
                                              indent=2))
    return 0 if alive else 1


def main(argv=None):
    return cli.run_main(_main, argv, prog=PROG, runtime_errors=rig_errors())


if __name__ == "__main__":
    sys.exit(main())
