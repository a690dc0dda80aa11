"""Where a deployment's processes run: the launcher interface.

The experiment runner never starts processes itself; it asks a ``Launcher``
to start ``python -m MODULE ARGS`` on one of its hosts and gets back a
``Started`` handle with the address other components use to reach it.

- ``LocalLauncher``: every host is this machine; processes are children of the
  runner (``services.common.procs.ServiceProcess``).
- ``deploy.remote.agent.AgentLauncher``: every host runs a node agent that starts
  and stops processes on request (AWS runs).

Contract: ``start`` returns only once the process is serving (ready-file
protocol, ``--port 0``); the launcher owns every process it started and
``stop_all`` stops them all (SIGTERM, grace, SIGKILL), also after a failed
start. ``stop_all`` is idempotent.
"""

import abc
import signal
import sys
from dataclasses import dataclass, field

from services.common.procs import ServiceProcess


@dataclass
class Started:
    """A running service process and how to reach it."""

    name: str
    host: int
    address: str
    pid: int
    _handle: object = field(repr=False, default=None)
    _launcher: object = field(repr=False, default=None)

    def stop(self, grace_s=5.0):
        self._launcher.stop_process(self, grace_s)

    def kill(self):
        """``kill -9``: the process dies without any cleanup."""
        self._launcher.signal_process(self, signal.SIGKILL)

    def alive(self):
        return self._launcher.process_alive(self)


class Launcher(abc.ABC):
    """Starts service processes on a set of hosts."""

    #: Address at which services on host i are reachable from the frontend.
    host_addresses: list

    def bind_address(self, host):
        """The address services on ``host`` bind (and are reached at)."""
        return self.host_addresses[host]

    @abc.abstractmethod
    def start(self, module, args, *, name, host=0, log_path=None, env=None, ready_timeout_s=60.0):
        """Starts ``python -m module *args --port 0 --ready-file F`` on ``host``."""

    @abc.abstractmethod
    def stop_process(self, started, grace_s):
        """Stops one process this launcher started (SIGTERM, ``grace_s``, SIGKILL)."""

    @abc.abstractmethod
    def signal_process(self, started, sig):
        """Sends ``sig`` to one process this launcher started."""

    @abc.abstractmethod
    def process_alive(self, started):
        """Whether one process this launcher started is still running."""

    @abc.abstractmethod
    def stop_all(self, grace_s=5.0):
        """Stops every process this launcher started (reverse start order)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop_all()


class LocalLauncher(Launcher):
    """All hosts are this machine; processes are the runner's children."""

    def __init__(self, num_hosts=1, bind_host="127.0.0.1"):
        self.host_addresses = [bind_host] * max(1, num_hosts)
        self._started = []

    def argv(self, host, module, args, port):
        """The command that runs ``module`` on ``host`` (subclasses wrap it)."""
        return [sys.executable, "-m", module, *map(str, args), "--port", str(port)]

    def start(self, module, args, *, name, host=0, log_path=None, env=None, ready_timeout_s=60.0, port=0):
        proc = ServiceProcess(self.argv(host, module, args, port), name=name, log_path=log_path, env=env,
                              ready_timeout_s=ready_timeout_s)
        started = Started(name, host, f"{self.host_addresses[host]}:{proc.port}", proc.pid, proc, self)
        self._started.append(started)
        return started

    def stop_process(self, started, grace_s):
        started._handle.stop(grace_s)

    def signal_process(self, started, sig):
        started._handle.kill(sig)

    def process_alive(self, started):
        return started._handle.alive()

    def stop_all(self, grace_s=5.0):
        while self._started:
            self._started.pop().stop(grace_s)
