# Release build of the coding kernels (directives: setup.py).
include "_kernels_impl.pxi"

BUILD = "release"
