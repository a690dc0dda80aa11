# Kernel bodies, included by _kernels.pyx (release) and _kernels_debug.pyx
# (bounds-checked); compiler directives are set in setup.py.
