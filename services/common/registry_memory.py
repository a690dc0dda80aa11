"""An in-memory ``Registry`` for unit tests of services and the frontend.

Same interface and semantics as ``RedisRegistry`` (see
``services.common.registry``): a key per instance with a TTL on the injected
clock, ``list()`` sorted by instance id and without expired keys, config as
JSON values. No server, no network, no sleeping: with a ``ManualClock``, TTL
expiry, heartbeats and watch polls happen when the test advances time.

``set_reachable(False)`` makes every call raise ``RegistryError`` (a registry
outage); ``set_reachable(True)`` ends it. ``restart()`` forgets every key, as
a restarted server does (it persists nothing).
"""

import json

from services.common.clock import REAL
from services.common.registry import DEFAULT_TTL_S, Registry, RegistryError

__all__ = ["MemoryRegistry"]


class MemoryRegistry(Registry):
    """``Registry`` over a dict; ``clock`` (default the real one) runs the TTLs."""

    def __init__(self, *, clock=None):
        self.clock = clock or REAL
        self._instances = {}  # instance_id -> (Instance, expires_at)
        self._config = {}  # name -> JSON text
        self._reachable = True
        self.calls = 0
        self.closed = False

    def set_reachable(self, reachable):
        self._reachable = bool(reachable)

    def restart(self):
        self._instances.clear()
        self._config.clear()

    def _check(self):
        self.calls += 1
        if self.closed:
            raise RegistryError("memory registry: closed")
        if not self._reachable:
            raise RegistryError("memory registry: unreachable")

    async def register(self, instance, ttl_s=DEFAULT_TTL_S):
        self._check()
        if not ttl_s > 0:
            raise ValueError(f"ttl_s {ttl_s} must be > 0")
        self._instances[instance.instance_id] = (instance, self.clock.now() + ttl_s)

    async def deregister(self, instance_id):
        self._check()
        self._instances.pop(instance_id, None)

    async def list(self, role=None):
        self._check()
        now = self.clock.now()
        for iid in [i for i, (_, at) in self._instances.items() if at <= now]:
            del self._instances[iid]
        return sorted((inst for inst, _ in self._instances.values() if role is None or inst.role == role),
                      key=lambda i: i.instance_id)

    async def get_config(self, name, default=None):
        self._check()
        value = self._config.get(name)
        return default if value is None else json.loads(value)

    async def set_config(self, name, value):
        self._check()
        self._config[name] = json.dumps(value)

    async def all_config(self):
        self._check()
        return {k: json.loads(v) for k, v in self._config.items()}

    async def close(self):
        self.closed = True
