"""Reliability benchmarks (chaos, fuzz, overload, soak) over one shared rig
(``rig``): a local deployment they fault, flood and watch."""
