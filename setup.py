"""Build steps that pyproject.toml cannot express.

1. Protobuf/gRPC code (with .pyi stubs) is generated from ``protos/`` into the
   ``parm`` package at the project root, by every build (wheel or editable).
   It runs before ``setup()`` so that package discovery (and the editable
   finder's package map) sees ``parm``; it takes well under a second.
   Generated code is never committed (``/parm/`` is git-ignored).
2. The Cython coding kernels. Compiler directives live here and nowhere else.
   ``coding_ext._kernels`` is the release build; ``coding_ext._kernels_debug``
   is the same source with bounds, wraparound and None checks on, always built
   so that the kernel tests can run against it. ``PARM_DEBUG_BUILD=1`` turns
   the checks on in the release module too.
"""

import os
import pathlib

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

ROOT = pathlib.Path(__file__).parent.resolve()
PROTO_ROOT = ROOT / "protos"

RELEASE_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "initializedcheck": False,
    "nonecheck": False,
    "cdivision": True,
    "embedsignature": True,
}
DEBUG_DIRECTIVES = dict(
    RELEASE_DIRECTIVES,
    boundscheck=True,
    wraparound=True,
    initializedcheck=True,
    nonecheck=True,
    cdivision=False,
)
# No -march=native: the C kernels pick the vector width at run time
# (function multi-versioning, see coding_ext/_simd.h), so a wheel built here
# runs on any x86-64 and still uses AVX-512 where the CPU has it.
# -ffp-contract=off: no fused multiply-add, so the kernels round exactly like
# the numpy reference (coding_ext/reference.py) and match it bit for bit.
COMPILE_ARGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-Wno-unused-function"]


def generate_protos():
    """Runs protoc over every .proto under protos/ into ROOT (package parm)."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p) for p in PROTO_ROOT.rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + " ".join(protos))
    for proto in protos:
        package_dir = ROOT / pathlib.Path(proto).relative_to(PROTO_ROOT).parent
        while package_dir != ROOT:
            (package_dir / "__init__.py").touch()
            package_dir = package_dir.parent


def kernel_extension(name, debug):
    return cythonize(
        [
            Extension(
                f"coding_ext.{name}",
                [f"coding_ext/{name}.pyx"],
                include_dirs=[numpy.get_include(), str(ROOT / "coding_ext")],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                extra_compile_args=COMPILE_ARGS,
            )
        ],
        compiler_directives=DEBUG_DIRECTIVES if debug else RELEASE_DIRECTIVES,
        build_dir="build/cython-debug" if debug else "build/cython",
    )


generate_protos()
setup(
    ext_modules=kernel_extension("_kernels", os.environ.get("PARM_DEBUG_BUILD") == "1")
    + kernel_extension("_kernels_debug", True),
)
