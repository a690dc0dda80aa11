"""The serving coder (``coding_ext``) as numpy callables for evaluation.

Evaluation encodes and decodes with exactly what the frontend and the coder
service run: the ``coding_ext`` kernels, or, where they are not built, the
plain-numpy ``coding_ext.reference`` they are tested against.
"""


class CoderUnavailable(ImportError):
    """coding_ext is missing or has neither kernels nor a reference."""


def serving_coder():
    """Returns (name, encode(encoder, inputs), decode(parity_output, available)).

    ``inputs`` is an ndarray (k, B, *S); ``available`` an ndarray (k-1, B, *O).
    """
    try:
        import coding_ext
    except ImportError as exc:
        raise CoderUnavailable(f"cannot import coding_ext ({exc}); run `make build`") from None
    impl, name = coding_ext, "coding_ext"
    if not hasattr(impl, "subtract_decode"):
        try:
            from coding_ext import reference as impl
        except ImportError:
            raise CoderUnavailable("coding_ext has neither kernels nor a reference; "
                                   "run `make build`") from None
        name = "coding_ext.reference"

    def encode(encoder, inputs):
        if encoder == "sum":
            return impl.sum_encode(inputs)
        if encoder == "concat":
            return impl.concat_encode(inputs)
        raise ValueError(f"unknown encoder {encoder!r}")

    def decode(parity_output, available):
        return impl.subtract_decode(parity_output, available)

    return name, encode, decode
