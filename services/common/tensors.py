"""Tensor <-> protobuf conversion, in one place.

A ``parm.v1.Tensor`` is dtype + shape + raw little-endian row-major bytes.
``from_proto`` returns a read-only view over the message's bytes (no copy);
callers that need to write must copy.
"""

import numpy as np

from parm.v1 import tensor_pb2
from services.common.errors import InvalidInput

DataType = tensor_pb2.DataType

_TO_NUMPY = {
    DataType.FLOAT32: np.dtype("<f4"),
    DataType.FLOAT16: np.dtype("<f2"),
    DataType.UINT8: np.dtype("u1"),
    DataType.INT64: np.dtype("<i8"),
}
_FROM_NUMPY = {dtype: code for code, dtype in _TO_NUMPY.items()}
_MAX_BYTES = np.iinfo(np.intp).max
_BY_NAME = {"float32": DataType.FLOAT32, "float16": DataType.FLOAT16,
            "uint8": DataType.UINT8, "int64": DataType.INT64}


def numpy_dtype(code):
    """The numpy dtype of a ``DataType`` value; InvalidInput if unsupported."""
    try:
        return _TO_NUMPY[code]
    except KeyError:
        raise InvalidInput(f"unsupported tensor dtype {_code_name(code)}") from None


def dtype_code(dtype):
    """The ``DataType`` of a numpy dtype or dtype name ("float32", ...)."""
    if isinstance(dtype, str) and dtype in _BY_NAME:
        return _BY_NAME[dtype]
    dtype = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).itemsize > 1 else np.dtype(dtype)
    try:
        return _FROM_NUMPY[dtype]
    except KeyError:
        raise InvalidInput(f"unsupported tensor dtype {dtype}") from None


def _code_name(code):
    try:
        return DataType.Name(code)
    except ValueError:
        return str(code)


def to_proto(array, out=None):
    """Serialises an ndarray into a ``Tensor`` (little-endian, C order).

    Args:
        array: ndarray of any shape with a supported dtype.
        out: optional ``Tensor`` message to fill (e.g. a field of a reply).

    Returns:
        The filled ``Tensor``.
    """
    array = np.asarray(array)
    code = dtype_code(array.dtype)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    tensor = tensor_pb2.Tensor() if out is None else out
    tensor.dtype = code
    del tensor.shape[:]
    tensor.shape.extend(array.shape)
    tensor.data = np.ascontiguousarray(array).tobytes()
    return tensor


def from_proto(tensor, what="tensor"):
    """Parses a ``Tensor`` into a read-only ndarray view of its bytes.

    Raises:
        InvalidInput: unknown dtype, negative dimension, a shape no array can
            have (even with zero elements), or a byte length that does not
            match shape x itemsize. ``what`` names the field.
    """
    dtype = numpy_dtype(tensor.dtype) if tensor.dtype else None
    if dtype is None:
        raise InvalidInput(f"{what}: dtype is unspecified")
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{what}: negative dimension in shape {list(shape)}")
    count = 1
    nonzero = 1     # what numpy needs addressable even when a zero dimension empties the array
    for d in shape:
        count *= d
        nonzero *= d or 1
    if nonzero * dtype.itemsize > _MAX_BYTES:
        raise InvalidInput(f"{what}: shape {list(shape)} is too large")
    expected = count * dtype.itemsize
    if len(tensor.data) != expected:
        raise InvalidInput(
            f"{what}: {len(tensor.data)} data bytes, but shape {list(shape)} of "
            f"{dtype.name} needs {expected}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
