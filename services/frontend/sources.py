"""Where instances come from: a static list, or the registry (joins and leaves).

An ``InstanceSource`` feeds ``engine.add_instance`` / ``engine.remove_instance``.
``RegistrySource`` lists the registry once at start (so a frontend is ready
with its instances), then follows ``registry.watch()``; an instance whose key
expires (killed, ``kill -9``) leaves, and its calls become erasures. Only the
roles the redundancy mode uses are taken.
"""

import asyncio
import logging

log = logging.getLogger(__name__)


class StaticSource:
    """Instances from ``--instances role=host:port,...`` (ids ``role-i@address``)."""

    def __init__(self, entries, roles):
        self.entries = list(entries)
        self.roles = set(roles)

    async def start(self, engine):
        for i, (role, address) in enumerate(self.entries):
            if role in self.roles:
                engine.add_instance(f"{role}-{i}@{address}", address, role)

    async def close(self):
        pass


class RegistrySource:
    """Instances from a ``services.common.registry.Registry`` (owned: closed at close)."""

    def __init__(self, registry, roles, poll_s=0.5):
        self.registry = registry
        self.roles = set(roles)
        self.poll_s = poll_s
        self._task = None

    async def start(self, engine):
        for inst in await self.registry.list():
            if inst.role in self.roles:
                engine.add_instance(inst.instance_id, inst.address, inst.role, inst.model)
        self._task = asyncio.get_running_loop().create_task(self._follow(engine))

    async def _follow(self, engine):
        async for event in self.registry.watch(self.poll_s):
            inst = event.instance
            if inst.role not in self.roles:
                continue
            if event.kind == "left":
                await engine.remove_instance(inst.instance_id, reason="left the registry")
            else:
                engine.add_instance(inst.instance_id, inst.address, inst.role, inst.model)

    async def close(self):
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.registry.close()
