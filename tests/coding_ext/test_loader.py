"""coding_ext.load_kernels: the one way to choose an implementation of the kernels."""

import subprocess
import sys

import numpy as np
import pytest

import coding_ext
import coding_ext.debug
from coding_ext import Kernels, load_kernels, reference


@pytest.mark.parametrize("name, module", [("native", coding_ext), ("debug", coding_ext.debug),
                                          ("reference", reference)])
def test_each_name_loads_its_module(name, module):
    k = load_kernels(name)
    assert isinstance(k, Kernels)
    assert (k.name, k.module) == (name, module.__name__)
    assert k.sum_encode is module.sum_encode
    assert k.concat_encode is module.concat_encode
    assert k.subtract_decode is module.subtract_decode


def test_default_is_native():
    assert load_kernels().sum_encode is coding_ext.sum_encode


@pytest.mark.parametrize("name", ["native", "debug", "reference"])
def test_encode_decode_dispatch(name):
    k = load_kernels(name)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((2, 3, 4, 4)).astype(np.float32) for _ in range(4)]
    np.testing.assert_array_equal(k.encode("sum", xs), reference.sum_encode(xs))
    np.testing.assert_array_equal(k.encode("concat", xs), reference.concat_encode(xs))
    scale, shift = np.float32([0.5, 2.0, 1.0]), np.float32([0.1, -0.2, 0.0])
    np.testing.assert_array_equal(k.encode("sum", xs, scale=scale, shift=shift),
                                  reference.sum_encode(xs, scale=scale, shift=shift))
    out = np.empty((2, 3, 4, 4), np.float32)
    assert k.decode(xs[0], xs[1:], out) is out
    np.testing.assert_array_equal(out, reference.subtract_decode(xs[0], xs[1:]))
    assert k.encode("sum", xs, out) is out
    np.testing.assert_array_equal(out, reference.sum_encode(xs))


def test_encoder_errors():
    k = load_kernels("native")
    assert k.encoder("sum") is coding_ext.sum_encode
    assert k.encoder("concat") is coding_ext.concat_encode
    with pytest.raises(ValueError, match="unknown encoder 'xor' \\(one of sum, concat\\)"):
        k.encoder("xor")
    xs = [np.zeros((1, 1, 2, 2), np.float32)] * 2
    with pytest.raises(ValueError, match="scale/shift apply to the sum encoder only"):
        k.encode("concat", xs, scale=np.float32([1.0]))


@pytest.mark.parametrize("name", ["numpy", "", None, "Native"])
def test_unknown_name_is_a_clear_error(name):
    with pytest.raises(ValueError, match=r"not in \(native, debug, reference\)"):
        load_kernels(name)


def test_unbuilt_module_says_make_build(monkeypatch):
    monkeypatch.setitem(sys.modules, "coding_ext.debug", None)  # import of it now fails
    with pytest.raises(ImportError, match=r"cannot load the debug coding kernels \(coding_ext.debug: .*"
                                          r"run `make build`"):
        load_kernels("debug")


def test_import_without_the_extension_says_make_build():
    code = ("import sys; sys.modules['coding_ext._kernels'] = None\n"
            "try:\n    import coding_ext\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("coding_ext._kernels is not built (")
    assert out.stdout.strip().endswith("run `make build`")
