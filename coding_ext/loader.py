"""Choosing an implementation of the coding kernels: the one way to load them.

    kernels = coding_ext.load_kernels("native")     # or "debug", "reference"
    parity = kernels.encode("sum", inputs, out=buf)
    lost = kernels.decode(parity_output, available, out=buf)

| name | module | what it is |
|---|---|---|
| ``native`` | ``coding_ext`` | the release Cython build (``coding_ext._kernels``) |
| ``debug`` | ``coding_ext.debug`` | the same source with Cython's bounds/None checks on |
| ``reference`` | ``coding_ext.reference`` | the plain numpy definitions |

There is no silent fallback: the serving path asks for ``native`` and gets
it, or ``import coding_ext`` has already failed with "run `make build`". The
numpy reference is a choice (``--kernels reference`` of the coder), never
something a caller drops to without saying so.
"""

import importlib

__all__ = ["ENCODERS", "KERNELS", "Kernels", "load_kernels"]

KERNELS = {"native": "coding_ext", "debug": "coding_ext.debug", "reference": "coding_ext.reference"}
ENCODERS = ("sum", "concat")


class Kernels:
    """One implementation of the three coding functions.

    Attributes:
        name: "native" | "debug" | "reference" (or a caller's own, for fakes).
        module: the module the functions come from, e.g. "coding_ext".
        sum_encode, concat_encode, subtract_decode: the functions, with the
            signatures documented in docs/coding_ext.md (``out=None``
            allocates; the reference does not validate its inputs).
    """

    __slots__ = ("name", "module", "sum_encode", "concat_encode", "subtract_decode")

    def __init__(self, name, module, sum_encode, concat_encode, subtract_decode):
        self.name = name
        self.module = module
        self.sum_encode = sum_encode
        self.concat_encode = concat_encode
        self.subtract_decode = subtract_decode

    def encoder(self, encoder):
        """The encode function for "sum" or "concat"; ValueError otherwise."""
        if encoder == "sum":
            return self.sum_encode
        if encoder == "concat":
            return self.concat_encode
        raise ValueError(f"unknown encoder {encoder!r} (one of {', '.join(ENCODERS)})")

    def encode(self, encoder, inputs, out=None, *, scale=None, shift=None):
        """Encodes k batches (each (B, *S)) into one parity batch (B, *S), float32.

        ``scale``/``shift`` (float32 (C,)) apply to the sum encoder only.
        """
        fn = self.encoder(encoder)
        if scale is None and shift is None:
            return fn(inputs, out)
        if encoder != "sum":
            raise ValueError("scale/shift apply to the sum encoder only")
        return fn(inputs, out, scale=scale, shift=shift)

    def decode(self, parity_output, available, out=None):
        """parity_output (B, *O) minus the sum of the k-1 available outputs, float32."""
        return self.subtract_decode(parity_output, available, out)

    def __repr__(self):
        return f"Kernels({self.name!r}, module={self.module!r})"


def load_kernels(name="native"):
    """Returns the ``Kernels`` of one implementation.

    Args:
        name: "native" (release build), "debug" (bounds-checked build) or
            "reference" (numpy).

    Raises:
        ValueError: unknown name.
        ImportError: the module is not built; the message says to run
            `make build`.
    """
    try:
        module_name = KERNELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"kernels {name!r} not in ({', '.join(KERNELS)})") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot load the {name} coding kernels ({module_name}: {exc}); "
                          "run `make build`") from exc
    return Kernels(name, module_name, module.sum_encode, module.concat_encode, module.subtract_decode)
