"""The registry against a real Redis-compatible server process (no mocks)."""

import asyncio
import json
import subprocess
import sys
import time

import psutil
import pytest

from services.common.procs import ServiceProcess
from services.common.registry import (EmbeddedRedis, Heartbeat, Instance, RedisRegistry, RegistryError,
                                      RegistryEvent)


def _inst(iid, role="data", address="127.0.0.1:1", **kw):
    return Instance(iid, address, role, model=kw.pop("model", "m"), k=kw.pop("k", 2), **kw)


def run(coro):
    return asyncio.run(coro)


async def _with_registry(url, deployment, fn):
    registry = RedisRegistry(url, deployment)
    try:
        return await fn(registry)
    finally:
        await registry.close()


def test_register_list_by_role_and_deregister(redis_server):
    async def body(r):
        await r.register(_inst("d1"), ttl_s=30)
        await r.register(_inst("p1", role="parity", meta={"provider": "cpu"}), ttl_s=30)
        await r.register(_inst("d0"), ttl_s=30)
        everyone = [i.instance_id for i in await r.list()]
        parity = await r.list("parity")
        await r.deregister("d1")
        after = [i.instance_id for i in await r.list("data")]
        return everyone, parity, after

    everyone, parity, after = run(_with_registry(redis_server.url, "t-basic", body))
    assert everyone == ["d0", "d1", "p1"]
    assert parity == [_inst("p1", role="parity", meta={"provider": "cpu"})]
    assert after == ["d0"]


def test_key_expires_without_heartbeat_and_heartbeat_keeps_it(redis_server):
    async def body(r):
        await r.register(_inst("lapsed"), ttl_s=0.8)
        hb = Heartbeat(r, _inst("kept"), heartbeat_s=0.2, ttl_s=1.0)
        await hb.start()
        await asyncio.sleep(2.0)
        alive = [i.instance_id for i in await r.list()]
        await hb.stop(deregister=True)
        gone = await r.list()
        return alive, gone

    alive, gone = run(_with_registry(redis_server.url, "t-ttl", body))
    assert alive == ["kept"]
    assert gone == []


def test_deployments_are_separate_namespaces(redis_server):
    async def body():
        a = RedisRegistry(redis_server.url, "dep-a")
        b = RedisRegistry(redis_server.url, "dep-b")
        try:
            await a.register(_inst("x"), 30)
            await b.register(_inst("y", role="backup"), 30)
            await a.set_config("rate", 150)
            return ([i.instance_id for i in await a.list()], [i.instance_id for i in await b.list()],
                    await a.get_config("rate"), await b.get_config("rate", "unset"))
        finally:
            await a.close()
            await b.close()

    assert run(body()) == (["x"], ["y"], 150, "unset")


def test_experiment_config_roundtrip(redis_server):
    config = {"experiment_id": "fig9a", "ec_k_val": [2, 3], "send_rates": [150.0, 390.0]}

    async def body(r):
        await r.set_config("experiment", config)
        await r.set_config("trial", 3)
        return await r.get_config("experiment"), await r.all_config(), await r.get_config("missing")

    got, everything, missing = run(_with_registry(redis_server.url, "t-config", body))
    assert got == config
    assert everything == {"experiment": config, "trial": 3}
    assert missing is None


def test_watch_sees_join_change_and_leave(redis_server):
    async def body(r):
        events = []

        async def consume():
            async for event in r.watch(poll_s=0.05):
                events.append(event)

        task = asyncio.create_task(consume())
        try:
            await asyncio.sleep(0.2)
            await r.register(_inst("w1"), ttl_s=30)
            await asyncio.sleep(0.3)
            await r.register(_inst("w1", address="127.0.0.1:2"), ttl_s=30)
            await asyncio.sleep(0.3)
            await r.register(_inst("w2", role="parity"), ttl_s=0.6)  # expires by itself
            await asyncio.sleep(1.5)
            await r.deregister("w1")
            await asyncio.sleep(0.3)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return events

    events = run(_with_registry(redis_server.url, "t-watch", body))
    assert events == [
        RegistryEvent("joined", _inst("w1")),
        RegistryEvent("changed", _inst("w1", address="127.0.0.1:2")),
        RegistryEvent("joined", _inst("w2", role="parity")),
        RegistryEvent("left", _inst("w2", role="parity")),
        RegistryEvent("left", _inst("w1", address="127.0.0.1:2")),
    ]


def test_password_is_required_when_set():
    with EmbeddedRedis(password="s3cret") as server:
        assert server.url.startswith("redis://:s3cret@127.0.0.1:")
        wrong = server.url.replace(":s3cret@", "")

        async def body():
            ok = RedisRegistry(server.url, "t-auth")
            bad = RedisRegistry(wrong, "t-auth")
            try:
                await ok.register(_inst("a"), 30)
                listed = [i.instance_id for i in await ok.list()]
                try:
                    await bad.list()
                    refused = None
                except RegistryError as exc:
                    refused = str(exc)
                return listed, refused
            finally:
                await ok.close()
                await bad.close()

        listed, refused = run(body())
    assert listed == ["a"]
    assert refused is not None and "authenticat" in refused.lower() and "s3cret" not in refused


def test_unreachable_server_raises_registry_error():
    async def body():
        r = RedisRegistry("redis://127.0.0.1:1/0", "t-down", timeout_s=0.5)
        try:
            await r.register(_inst("a"), 3)
        finally:
            await r.close()

    with pytest.raises(RegistryError, match="127.0.0.1:1"):
        run(body())


def test_embedded_server_stops_and_leaves_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    server = EmbeddedRedis().start()
    pid, data_dir = server.proc.pid, server._dir
    server.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not (tmp_path / "dump.rdb").exists() and list(tmp_path.iterdir()) == []
    assert data_dir is not None and not __import__("os").path.exists(data_dir)


def test_standalone_registry_process():
    proc = ServiceProcess.python_module("services.common.registry", ["serve", "--port", "0"], name="registry")
    try:
        server_pid = proc.info["server_pid"]
        assert psutil.pid_exists(server_pid)

        async def body(r):
            await r.register(_inst("s1"), 30)
            return [i.instance_id for i in await r.list()]

        assert run(_with_registry(proc.info["url"], "t-standalone", body)) == ["s1"]
    finally:
        assert proc.stop() == 0
    deadline = time.monotonic() + 5
    while psutil.pid_exists(server_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not psutil.pid_exists(server_pid)


def test_standalone_cli_mistake_is_one_line():
    out = subprocess.run([sys.executable, "-m", "services.common.registry", "serve", "--port", "x"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "--port" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("argv, code, text", [
    (["serve", "--port", "70000"], 2, "error: argument --port: must be <= 65535, got 70000"),
    (["serve", "--bogus"], 2, "error: unrecognized arguments: --bogus"),
    ([], 2, "error: the following arguments are required: command"),
])
def test_standalone_cli_usage_errors_in_process(argv, code, text, capsys):
    from services.common import registry

    assert registry.main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("python -m services.common.registry") and text in err
    assert len(err.strip().splitlines()) == 1


def test_standalone_cli_port_taken_is_one_line_exit_1(capsys):
    import socket

    from services.common import registry

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code = registry.main(["serve", "--port", str(taken.getsockname()[1]), "--log-level", "WARNING"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("python -m services.common.registry: error: could not start ")


def test_instance_json_roundtrip():
    inst = _inst("j", role="backup", meta={"pid": 3})
    assert Instance.from_json(inst.to_json()) == inst
    assert json.loads(inst.to_json())["role"] == "backup"
    with pytest.raises(ValueError, match="role 'primary'"):
        Instance("x", "a:1", "primary")
