"""The namespace testbed: a real network of shaped hosts on one machine.

Topology (``Testbed.up()``), all names prefixed ``parm-<pid>-<n>`` so that
concurrent runs never collide::

    root namespace                bridge namespace "<prefix>-br"
    ---------------               -------------------------------
    pm<pid>c<n> ------veth------- ctl ---+
    (control, .254, unshaped)            |
                                         br0 (Linux bridge)
                                         |
    host namespace "<prefix>-h<i>"       |
    eth0 (.i+1) ----------veth----------- h<i>
      egress: tbf (uplink)                 egress: tbf (downlink)

- Every host is a network namespace with ``lo`` up and one interface
  ``eth0`` on a private /24 that ``up()`` picks among 10.0.0.0/8 so that it
  overlaps no address or route of the root namespace; host ``i`` is ``.i+1``.
- Each host's link is shaped in both directions with a token bucket (``tbf``:
  rate, burst, queue limit in bytes): on ``eth0`` inside the host (what the
  host sends) and on the bridge port ``h<i>`` (what the host receives). A
  bulk TCP transfer fills the queue where it is limited, so a small message
  that shares that queue waits behind it: real queueing, drops and
  retransmissions, not a model of them.
- The control link joins the root namespace to the bridge, unshaped on its
  own side, so that the runner (which stays in the root namespace) reaches
  the services with ordinary sockets at ``host_address(i)``; services in the
  hosts reach the root at ``control_address``. Its traffic into host ``i``
  still passes host ``i``'s downlink. The hosts have no default route, so no
  packet leaves the subnet; the root namespace gets one connected /24 route
  on its end of the control link and nothing else.

Ownership: the ``Testbed`` owns every namespace and link it creates and every
process left inside its namespaces. ``down()`` kills what still runs in them,
deletes the control link and the namespaces; it is idempotent, is safe after
a partial ``up()`` (which calls it itself before raising), and also runs at
interpreter exit. Deleting a namespace deletes the veth ends inside it, and
with them their peers.

``NetnsLauncher`` implements ``deploy.runner.launcher.Launcher`` on a testbed:
launcher host ``i`` is testbed host ``i``; ``bind_address(i)`` is the address
a service on it must listen on (pass it as ``--host``).
"""

import atexit
import contextlib
import fcntl
import ipaddress
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from deploy.network import sandbox
from deploy.runner.launcher import LocalLauncher
from services.common import cli

#: Defaults scaled from the paper's cluster (docs/netns.md has the numbers).
DEFAULT_RATE_MBIT = 50.0
DEFAULT_QUEUE_MS = 10.0
DEFAULT_BURST_BYTES = 16 * 1024
#: How long one direction of a background shuffle lasts on an idle link.
SHUFFLE_SECONDS = (0.5, 1.0)


def shuffle_bytes_for(rate_mbit, seconds=SHUFFLE_SECONDS):
    """The shuffle size range (bytes) that takes ``seconds`` per direction at ``rate_mbit``."""
    return tuple(int(rate_mbit * 1e6 / 8 * s) for s in seconds)


#: Background shuffle sizes at the default rate: 3.125-6.25 MB.
DEFAULT_SHUFFLE_BYTES = shuffle_bytes_for(DEFAULT_RATE_MBIT)

UNAVAILABLE_MESSAGE = (
    "the netns testbed needs root or CAP_NET_ADMIN and iproute2 (ip, tc){why}; "
    'run the emulated network instead: make local (config "network": "emulated")'
)

_CAP_NET_ADMIN = 12
_LOCK_PATH = "/run/lock/parm-netns.lock"
_COUNTER = itertools.count()
_LIVE = set()  # testbeds up, strongly held so that exit still finds them


class TestbedUnavailable(RuntimeError):
    """This machine cannot run the namespace testbed (no privileges or no iproute2)."""

    __test__ = False


class TestbedError(RuntimeError):
    """A command that builds or inspects the testbed failed (the message says which)."""

    __test__ = False


def _run(argv, check=True):
    """Runs a command; ``TestbedError`` with its stderr when it fails and ``check``."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as exc:
        raise TestbedUnavailable(UNAVAILABLE_MESSAGE.format(why=f" ({argv[0]} not found)")) from exc
    except subprocess.TimeoutExpired as exc:
        raise TestbedError(f"`{' '.join(argv)}` did not finish in 30 s") from exc
    if check and proc.returncode != 0:
        raise TestbedError(f"`{' '.join(argv)}` failed: {_one_line(proc.stderr) or proc.returncode}")
    return proc


def _one_line(text):
    return " ".join(text.split())


def _has_net_admin():
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return False


def require_netns(path=None, has_net_admin=None, probe=True):
    """Checks that the testbed can run here; ``TestbedUnavailable`` says why not.

    Args:
        path: the search path for ``ip`` and ``tc`` (default: ``$PATH``, to which
            the sbin directories are added: ``sandbox.add_sbin_to_path``).
        has_net_admin: overrides the privilege check (tests).
        probe: also create and delete a namespace (the conclusive check).
    """
    if path is None:
        sandbox.add_sbin_to_path()
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool, path=path) is None]
    if missing:
        raise TestbedUnavailable(UNAVAILABLE_MESSAGE.format(why=f" ({', '.join(missing)} not found)"))
    if not (_has_net_admin() if has_net_admin is None else has_net_admin):
        raise TestbedUnavailable(UNAVAILABLE_MESSAGE.format(why=" (this process has neither)"))
    if not probe:
        return
    name = f"parm-probe-{os.getpid()}"
    ip = shutil.which("ip", path=path)
    made = subprocess.run([ip, "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        raise TestbedUnavailable(UNAVAILABLE_MESSAGE.format(why=f" (`ip netns add` failed: {_one_line(made.stderr)})"))
    subprocess.run([ip, "netns", "del", name], capture_output=True)


@dataclass(frozen=True)
class TestbedSpec:
    """What to build: ``num_hosts`` hosts, each on a link shaped to ``rate_mbit``.

    ``queue_ms`` sizes each tbf queue as the time a full queue takes to drain
    at ``rate_mbit`` (``limit_bytes``); ``shape_ingress`` also shapes the
    bridge port towards each host. ``subnet`` and ``prefix`` are picked by
    ``up()`` when None.
    """

    __test__ = False

    num_hosts: int
    rate_mbit: float = DEFAULT_RATE_MBIT
    queue_ms: float = DEFAULT_QUEUE_MS
    burst_bytes: int = DEFAULT_BURST_BYTES
    shape_ingress: bool = True
    control: bool = True
    subnet: str | None = None
    prefix: str | None = None

    def __post_init__(self):
        if not 1 <= self.num_hosts <= 250:
            raise ValueError(f"num_hosts must be in 1..250, got {self.num_hosts}")
        if not self.rate_mbit > 0:
            raise ValueError(f"rate_mbit must be > 0, got {self.rate_mbit}")
        if not self.queue_ms > 0:
            raise ValueError(f"queue_ms must be > 0, got {self.queue_ms}")
        if self.burst_bytes < 2048:
            raise ValueError(f"burst_bytes must be >= 2048 (more than one packet), got {self.burst_bytes}")
        if self.subnet is not None and ipaddress.ip_network(self.subnet).prefixlen != 24:
            raise ValueError(f"subnet must be a /24, got {self.subnet}")

    @property
    def limit_bytes(self):
        """The tbf queue limit: ``queue_ms`` worth of bytes at ``rate_mbit``."""
        return max(int(self.rate_mbit * 1e6 / 8 * self.queue_ms / 1e3), 2 * self.burst_bytes)

    @property
    def shuffle_bytes(self):
        """Background shuffle sizes (low, high) for this rate: ``shuffle_bytes_for(rate_mbit)``."""
        return shuffle_bytes_for(self.rate_mbit)


@dataclass(frozen=True)
class QdiscStats:
    """Counters of one tbf queue (``tc -s qdisc``): what left it and what it dropped."""

    bytes: int
    packets: int
    drops: int
    overlimits: int
    backlog_bytes: int


@dataclass(frozen=True)
class LinkStats:
    """Both directions of host ``host``'s link; ``down`` is None if ingress is unshaped."""

    host: int
    up: QdiscStats
    down: QdiscStats | None


def _used_networks(run):
    """Every IPv4 network the root namespace has an address or a route in."""
    nets = []
    addrs = json.loads(run(["ip", "-4", "-j", "addr", "show"]).stdout or "[]")
    for link in addrs:
        for a in link.get("addr_info", []):
            nets.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    routes = json.loads(run(["ip", "-4", "-j", "route", "show", "table", "all"]).stdout or "[]")
    for r in routes:
        dst = r.get("dst", "")
        if dst and dst != "default":
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
    return nets


def pick_subnet(used, seed=None):
    """A /24 in 10.0.0.0/8 that overlaps none of ``used`` (networks)."""
    rng = random.Random(os.getpid() if seed is None else seed)
    # A seeded random order spreads concurrent runs apart; every /24 is tried.
    start = rng.randrange(1 << 16)
    for n in range(1 << 16):
        cand = ipaddress.ip_network(f"10.{(start + n) >> 8 & 255}.{(start + n) & 255}.0/24")
        if not any(cand.overlaps(u) for u in used) and cand.network_address.packed[1] != 0:
            return cand
    raise TestbedError("no free /24 in 10.0.0.0/8 on this machine")


class Testbed:
    """Namespaces, veth links, a bridge and tc shaping; see the module doc."""

    __test__ = False

    def __init__(self, spec, run=_run):
        self.spec = spec
        self._run = run
        n = next(_COUNTER)
        self.prefix = spec.prefix or f"parm-{os.getpid()}-{n}"
        self.bridge_namespace = f"{self.prefix}-br"
        self.namespaces = [f"{self.prefix}-h{i}" for i in range(spec.num_hosts)]
        # The root-side interface name must fit IFNAMSIZ (15) and be unique.
        self.control_link = f"pm{os.getpid()}c{n}"
        self.subnet = ipaddress.ip_network(spec.subnet) if spec.subnet else None
        self._made = []  # namespaces created, in order
        self._control_made = False
        self._is_up = False

    # -- addresses -------------------------------------------------------

    def host_address(self, i):
        """The IPv4 address of host ``i`` (``str``)."""
        self._check_host(i)
        return str(self.subnet.network_address + i + 1)

    @property
    def control_address(self):
        """The root namespace's address on the control link (None without one)."""
        return str(self.subnet.network_address + 254) if self.spec.control else None

    def exec_argv(self, i, argv):
        """``argv`` run inside host ``i``'s namespace."""
        self._check_host(i)
        return ["ip", "netns", "exec", self.namespaces[i], *map(str, argv)]

    def _check_host(self, i):
        if not 0 <= i < self.spec.num_hosts:
            raise IndexError(f"host {i} is not in 0..{self.spec.num_hosts - 1}")
        if self.subnet is None:
            raise TestbedError("the testbed is not up")

    # -- lifecycle -------------------------------------------------------

    def up(self):
        """Creates everything; on any failure removes what it made and raises."""
        if self._is_up:
            return self
        require_netns(probe=False)
        _LIVE.add(self)
        try:
            os.makedirs(os.path.dirname(_LOCK_PATH), exist_ok=True)
            with open(_LOCK_PATH, "a") as lock:
                # Picking a subnet and claiming it (the control address) is one
                # step for concurrent runs on this machine.
                fcntl.flock(lock, fcntl.LOCK_EX)
                used = _used_networks(self._run)
                if self.subnet is None:
                    self.subnet = pick_subnet(used)
                elif self.spec.control and any(self.subnet.overlaps(n) for n in used):
                    raise TestbedError(f"subnet {self.subnet} is in use on this machine; leave it unset to pick a free one")
                self._add_namespace(self.bridge_namespace)
                self._ip(self.bridge_namespace, "link", "add", "br0", "type", "bridge")
                self._ip(self.bridge_namespace, "link", "set", "br0", "up")
                if self.spec.control:
                    self._add_control_link()
            for i in range(self.spec.num_hosts):
                self._add_host(i)
        except BaseException:
            with contextlib.suppress(Exception):
                self.down()
            raise
        self._is_up = True
        return self

    def _ip(self, ns, *args):
        return self._run(["ip", "-n", ns, *args])

    def _tc(self, ns, dev):
        s = self.spec
        self._run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
                   "rate", f"{s.rate_mbit}mbit", "burst", str(s.burst_bytes), "limit", str(s.limit_bytes)])

    def _add_namespace(self, ns):
        self._run(["ip", "netns", "add", ns])
        self._made.append(ns)
        self._ip(ns, "link", "set", "lo", "up")

    def _add_control_link(self):
        br, name = self.bridge_namespace, self.control_link
        self._run(["ip", "link", "add", name, "type", "veth", "peer", "name", "ctl", "netns", br])
        self._control_made = True
        self._ip(br, "link", "set", "ctl", "master", "br0")
        self._ip(br, "link", "set", "ctl", "up")
        self._run(["ip", "addr", "add", f"{self.control_address}/24", "dev", name])
        self._run(["ip", "link", "set", name, "up"])

    def _add_host(self, i):
        ns, br, port = self.namespaces[i], self.bridge_namespace, f"h{i}"
        self._add_namespace(ns)
        self._ip(br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self._ip(br, "link", "set", port, "master", "br0")
        self._ip(br, "link", "set", port, "up")
        self._ip(ns, "addr", "add", f"{self.host_address(i)}/24", "dev", "eth0")
        self._ip(ns, "link", "set", "eth0", "up")
        self._tc(ns, "eth0")
        if self.spec.shape_ingress:
            self._tc(br, port)

    def down(self, grace_s=2.0):
        """Kills what runs in the namespaces, removes links and namespaces. Idempotent."""
        made, self._made = self._made, []
        self._is_up = False
        _LIVE.discard(self)
        hosts = [ns for ns in made if ns != self.bridge_namespace]
        _kill_namespace_processes(hosts, self._run, grace_s)
        errors = []
        if self._control_made:
            proc = self._run(["ip", "link", "del", self.control_link], check=False)
            if proc.returncode != 0 and "Cannot find device" not in proc.stderr:
                errors.append(proc.stderr.strip())
            self._control_made = False
        for ns in reversed(made):
            proc = self._run(["ip", "netns", "del", ns], check=False)
            if proc.returncode != 0 and "No such file" not in proc.stderr:
                errors.append(proc.stderr.strip())
        if errors:
            raise TestbedError("testbed teardown left something behind: " + "; ".join(errors))

    def __enter__(self):
        return self.up()

    def __exit__(self, *exc):
        self.down()

    # -- observation -----------------------------------------------------

    def link_stats(self):
        """``LinkStats`` of every host, from the tbf counters (``tc -s qdisc``)."""
        return [
            LinkStats(i, self._qdisc_stats(ns, "eth0"),
                      self._qdisc_stats(self.bridge_namespace, f"h{i}") if self.spec.shape_ingress else None)
            for i, ns in enumerate(self.namespaces)
        ]

    def _qdisc_stats(self, ns, dev):
        for q in json.loads(self._run(["tc", "-n", ns, "-s", "-j", "qdisc", "show", "dev", dev]).stdout):
            if q.get("kind") == "tbf":
                return QdiscStats(q["bytes"], q["packets"], q["drops"], q["overlimits"], q["backlog"])
        raise TestbedError(f"no tbf qdisc on {dev} in {ns}")

    def describe(self, stats=False):
        """The network's parameters (and with ``stats`` each link's counters), JSON-serializable."""
        s = self.spec
        out = {
            "network": "netns", "hosts": s.num_hosts, "subnet": str(self.subnet),
            "rate_mbit": s.rate_mbit, "queue_ms": s.queue_ms, "queue_limit_bytes": s.limit_bytes,
            "burst_bytes": s.burst_bytes, "shaped": "both directions" if s.shape_ingress else "egress only",
            "qdisc": "tbf", "shuffle_bytes": list(s.shuffle_bytes), "prefix": self.prefix,
            "addresses": [self.host_address(i) for i in range(s.num_hosts)] if self.subnet else [],
        }
        if stats:
            out["links"] = [asdict(link) for link in self.link_stats()]
        return out


def _kill_namespace_processes(namespaces, run, grace_s):
    """SIGTERM, then SIGKILL, every process inside ``namespaces``."""

    def pids():
        found = set()
        for ns in namespaces:
            proc = run(["ip", "netns", "pids", ns], check=False)
            found.update(int(p) for p in proc.stdout.split() if p.isdigit())
        return found

    left = pids()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while left and time.monotonic() < deadline:
            for pid in list(left):
                # Reap our own children; others vanish from the namespace.
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
            left = pids()
        if not left:
            return


@atexit.register
def _down_all():
    for testbed in list(_LIVE):
        with contextlib.suppress(Exception):
            testbed.down()


class NetnsLauncher(LocalLauncher):
    """Launcher host ``i`` is testbed host ``i``; processes are the runner's children."""

    def __init__(self, testbed):
        super().__init__()
        self.testbed = testbed
        self.host_addresses = [testbed.host_address(i) for i in range(testbed.spec.num_hosts)]

    def argv(self, host, module, args, port):
        # `ip netns exec` execs the command, so the child's pid is the service's.
        return self.testbed.exec_argv(host, super().argv(host, module, args, port))


# -- command line ----------------------------------------------------------


def stale_testbeds(run=_run):
    """Namespaces ``parm-<pid>-*`` whose creating process is gone."""
    out = run(["ip", "netns", "list"], check=False).stdout
    stale = []
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if len(parts) >= 3 and parts[0] == "parm" and parts[1].isdigit():
            if not os.path.exists(f"/proc/{parts[1]}"):
                stale.append(name)
    return stale


def check():
    """How this machine can run the testbed (one line); ``TestbedUnavailable`` if it cannot.

    In this process (root or ``CAP_NET_ADMIN``), or else in the sandbox
    (``deploy.network.sandbox``: an unprivileged user namespace), which the
    runner and the calibration enter by themselves.
    """
    try:
        require_netns()
        return "netns testbed: available (this process has CAP_NET_ADMIN)"
    except TestbedUnavailable as exc:
        first = exc
    try:
        sandbox.mode()
    except sandbox.SandboxUnavailable as exc:
        raise TestbedUnavailable(f"{first}; {exc}") from None
    return "netns testbed: available without root (in an unprivileged user namespace)"


def _main(argv):
    parser = cli.ArgumentParser(
        prog="python -m deploy.network.netns",
        description="The namespace testbed: check that it can run here, or remove what a killed run left.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="exit 0 and say how if this machine can run the testbed, else say why (exit 1)")
    sub.add_parser("cleanup", help="remove the namespaces (and with them the links) of runs that no longer exist "
                                   "(root testbeds only; a sandboxed run leaves none)")
    cfg = parser.parse_args(argv)
    try:
        if cfg.command == "check":
            print(check())
            return 0
        require_netns()
        stale = stale_testbeds()
        for ns in stale:
            _kill_namespace_processes([ns], _run, 2.0)
            _run(["ip", "netns", "del", ns], check=False)
        print(f"removed {len(stale)} stale namespace(s)")
    except (TestbedUnavailable, TestbedError) as exc:
        raise cli.Failure(str(exc)) from None
    return 0


def main(argv=None):
    return cli.run_main(_main, argv, prog="python -m deploy.network.netns")


if __name__ == "__main__":
    sys.exit(main())
