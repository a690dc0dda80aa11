"""Drives a frontend with ``tritonclient.grpc``; run as a separate process.

(tritonclient registers the same ``inference.*`` protobuf symbols as
``parm.inference``; one process cannot import both, so the test's frontend and
this client live in different processes.) Prints one JSON object.

Usage: python -m tests.frontend.triton_client_check HOST:PORT MODEL
"""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def main(address, model):
    client = grpcclient.InferenceServerClient(url=address)
    out = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
    }
    meta = client.get_model_metadata(model, as_json=True)
    out["metadata"] = {"name": meta["name"], "inputs": meta["inputs"], "outputs": meta["outputs"],
                       "versions": meta.get("versions", [])}
    x = (np.arange(12, dtype=np.float32).reshape(3, 4) - 5.0)
    inp = grpcclient.InferInput("input", [3, 4], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("output")],
                          request_id="kserve-1")
    out["input"] = x.tolist()
    out["output"] = result.as_numpy("output").tolist()
    out["sources"] = result.get_response().parameters["parm_sources"].string_param
    bad = grpcclient.InferInput("input", [2, 5], "FP32")
    bad.set_data_from_numpy(np.zeros((2, 5), np.float32))
    try:
        client.infer(model, [bad])
        out["bad_shape"] = None
    except InferenceServerException as exc:
        out["bad_shape"] = [exc.status(), exc.message()]
    try:
        client.is_model_ready("no-such-model")
        out["unknown_model"] = None
    except InferenceServerException as exc:
        out["unknown_model"] = [exc.status(), exc.message()]
    client.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:3])
