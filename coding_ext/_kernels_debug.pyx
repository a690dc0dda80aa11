# Bounds-checked build of the same kernels, for the tests (directives: setup.py).
include "_kernels_impl.pxi"

BUILD = "debug"
