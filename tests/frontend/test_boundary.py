"""The policy boundary: a policy uses only ``PolicyHost``, and the engine gets it injected."""

import typing

import numpy as np
import pytest

from services.frontend import redundancy
from services.frontend.records import BACKUP, ORIGINAL, RECONSTRUCTED, Source
from services.frontend.redundancy.host import PolicyHost
from tests.frontend.fakes import linear, settle
from tests.frontend.test_engine import make_engine, x

pytestmark = pytest.mark.timeout(30)

ALLOWED = {n for n in dir(PolicyHost) if not n.startswith("_")} | set(typing.get_type_hints(PolicyHost))


class StrictHost:
    """Forwards to the engine only the names ``PolicyHost`` declares."""

    def __init__(self, engine):
        self._engine = engine
        self.used = set()

    def __getattr__(self, name):
        if name not in ALLOWED:
            raise AttributeError(f"policy used {name!r}, which is not in PolicyHost")
        self.used.add(name)
        return getattr(self._engine, name)


def test_host_interface_is_public_and_the_engine_implements_it():
    from services.frontend.engine import Engine

    assert all(not n.startswith("_") for n in ALLOWED)
    for name in ALLOWED:
        assert hasattr(Engine, name) or name in ("clock", "counters", "observer", "max_attempts",
                                                 "group_timeout_s"), name


def test_source_codes_are_the_protos():
    from parm.v1 import frontend_pb2

    assert {s.name: s.value for s in Source} == dict(frontend_pb2.Source.items())
    assert (ORIGINAL, RECONSTRUCTED, BACKUP) == (frontend_pb2.ORIGINAL, frontend_pb2.RECONSTRUCTED,
                                                 frontend_pb2.BACKUP)


def test_roles_come_from_the_policy_class():
    assert redundancy.policy_class("coded").roles == ("data", "parity")
    assert redundancy.policy_class("cheap").roles == ("data", "backup")
    assert redundancy.policy_class("equal").roles == ("data",)
    with pytest.raises(ValueError, match="unknown mode 'bogus'"):
        redundancy.policy_class("bogus")


@pytest.mark.parametrize("mode", ["none", "hedged", "cheap", "coded"])
async def test_policies_only_use_the_host_interface(mode):
    e, clock, fleet = make_engine(mode, data=2, parity=1 if mode == "coded" else 0,
                                  backup=1 if mode == "cheap" else 0, hedge_delay_s=0.01,
                                  fns={"b0:1": lambda a: linear(a) * 0.5})
    host = StrictHost(e)
    e.policy.attach(host)
    qs = [e.submit(x(i)) for i in range(4)]
    await settle()
    clock.advance(0.02)                     # hedges fire
    await settle()
    if mode == "coded":
        fleet["d1:1"].release(1)
        fleet["p0:1"].release(2)
        await settle()
        assert qs[0].future.result().source == RECONSTRUCTED
    for _ in range(10):
        for c in fleet.clients.values():
            while c.pending:
                c.release()
        clock.advance(0.05)
        await settle()
    assert all(q.future.done() for q in qs) and e.in_system == 0
    assert host.used                        # the strict host was really in the path
    await e.close()


def test_grpc_client_serialises_a_batch_once_through_tensors_little_endian():
    from services.common import tensors
    from services.frontend.instances import GrpcInstanceClient
    from services.frontend.records import Batch

    big = np.arange(8, dtype=">f4").reshape(2, 4)
    batch = Batch(7, "data", [], big, 0.0)
    wire = GrpcInstanceClient.prepare(batch)
    assert wire is batch.wire and GrpcInstanceClient.prepare(batch) is wire      # once, reused
    assert wire.data == np.arange(8, dtype="<f4").tobytes() and list(wire.shape) == [2, 4]
    np.testing.assert_array_equal(tensors.from_proto(wire), big)
