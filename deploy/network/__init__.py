"""Network load between instances: the emulated background model, the real
shuffle agents, and the namespace testbed that gives every host a shaped link."""
