"""The testbed's sandbox: a private set of namespaces that dies with its run.

A testbed run (the sweep runner, the calibration) runs itself again inside

    unshare --user --map-root-user --net --mount --pid --fork --kill-child --mount-proc \\
        PYTHON -m deploy.network.sandbox init -- PYTHON -m MODULE ARGS...

and waits for it (``run_module``), forwarding SIGTERM and SIGHUP (``unshare``
itself ignores them) and exiting with its status; ``unshare`` gets SIGKILL
if that waiting process dies (``PR_SET_PDEATHSIG``), so even a ``kill -9``
of the process the user started takes the whole sandbox down.

- **user namespace** (``--user --map-root-user``): the process is root *inside*
  it, with ``CAP_NET_ADMIN`` over the namespaces it owns, and the real user
  outside: no privileges are needed (unprivileged user namespaces, on by
  default on current kernels). As real root the same works (and, where user
  namespaces are off, the sandbox is made without ``--user``).
- **network namespace**: the runner's own "root" network, with only ``lo``;
  the testbed (``deploy.network.netns``) builds its bridge, veth pairs and
  ``tbf`` queues inside it, and nothing of it is visible outside.
- **mount namespace**: a private tmpfs on ``/run`` holds ``/run/netns`` (the
  named namespaces' mount points that ``ip netns`` needs) and
  ``/run/lock``; the machine's ``/run`` is untouched. ``TMPDIR`` points into
  it, so the processes' temporary files vanish with the sandbox too.
- **PID namespace**: ``init`` (this module) is its PID 1. It starts the
  command, forwards SIGTERM and SIGHUP to it, reaps orphans, and exits with the
  command's status. When PID 1 exits the kernel kills every other process of
  the namespace; the last process gone takes the network and mount
  namespaces (and with them every link, queue and namespace of the testbed)
  along. ``--kill-child`` does the same if ``unshare`` itself is killed.

So whatever happens to a run, ``kill -9`` included, nothing it made is left
on the machine: no namespace, no link, no process, no file under /run or
$TMPDIR. (Results are written where the command says, as the real user.)

Ctrl-C reaches the command directly (it is in the terminal's foreground
process group); the waiting process, ``unshare`` and ``init`` ignore it and
wait.
"""

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys

from services.common import cli

#: Set (to "1") in the environment of everything that runs inside a sandbox.
INSIDE_ENV = "PARM_SANDBOX"

_NAMESPACES = ["--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc"]
_USER = ["--user", "--map-root-user"]


class SandboxUnavailable(RuntimeError):
    """This machine cannot make the sandbox; the message says why in one line."""


#: Where iproute2 lives. An ordinary user's PATH on Debian names none of these,
#: though ``ip`` and ``tc`` work unprivileged inside a user namespace.
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def add_sbin_to_path(environ=None):
    """Appends the ``SBIN_DIRS`` that ``PATH`` lacks (idempotent); returns the new PATH.

    Called before looking for ``ip``/``tc``, so that a non-root user finds them
    as root does; the sandbox and everything in it inherit the PATH.
    """
    environ = os.environ if environ is None else environ
    dirs = [d for d in environ.get("PATH", "").split(os.pathsep) if d]
    dirs += [d for d in SBIN_DIRS if d not in dirs]
    environ["PATH"] = os.pathsep.join(dirs)
    return environ["PATH"]


def inside():
    """True in a process that runs inside a sandbox."""
    return os.environ.get(INSIDE_ENV) == "1"


def _probe(flags):
    """None if ``unshare FLAGS true`` works here, else its one-line error."""
    try:
        proc = subprocess.run(["unshare", *flags, "true"], capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        return "unshare (util-linux) not found"
    except subprocess.TimeoutExpired:
        return "unshare did not finish in 10 s"
    if proc.returncode == 0:
        return None
    return " ".join(proc.stderr.split()) or f"unshare exited {proc.returncode}"


def mode():
    """``"userns"`` (no privileges needed) or ``"root"``; ``SandboxUnavailable`` says why neither.

    ``"root"``: user namespaces are off but this process is root, so the
    sandbox is made without a user namespace.
    """
    add_sbin_to_path()
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise SandboxUnavailable(f"{tool} (iproute2) not found")
    why = _probe([*_USER, *_NAMESPACES])
    if why is None:
        return "userns"
    if os.geteuid() == 0 and _probe(_NAMESPACES) is None:
        return "root"
    raise SandboxUnavailable(f"unprivileged user namespaces are not available here ({why})")


def describe_mode(kind):
    """One line saying how the sandbox is made (for the runner's banner)."""
    if kind == "userns":
        return "in a private user namespace (rootless)" if os.geteuid() != 0 else \
            "in a private user + network namespace"
    return "in a private network namespace (as root)"


def argv(command, kind=None):
    """The argv that runs ``command`` (a list) in a new sandbox."""
    kind = kind or mode()
    flags = [*_USER, *_NAMESPACES] if kind == "userns" else list(_NAMESPACES)
    return ["unshare", *flags, sys.executable, "-m", "deploy.network.sandbox", "init", "--", *command]


def _die_with_parent():
    """preexec_fn: SIGKILL this child (``unshare``) when its parent dies."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _init_pids(unshare_pid):
    try:
        with open(f"/proc/{unshare_pid}/task/{unshare_pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def run_module(module, args, kind=None):
    """Runs ``python -m module args`` in a new sandbox and waits; returns its exit status.

    SIGTERM and SIGHUP to this process go on to the sandbox's init, which
    passes them to the command; SIGINT is ignored here (from a terminal, the
    command gets it itself). If this process dies, ``unshare`` is killed,
    and with it everything in the sandbox.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    child = subprocess.Popen(argv([sys.executable, "-m", module, *args], kind), preexec_fn=_die_with_parent)

    def forward(signum, _frame):
        for pid in _init_pids(child.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        while True:
            try:
                rc = child.wait()
                break
            except InterruptedError:
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - rc if rc < 0 else rc


# -- PID 1 of the sandbox ----------------------------------------------------


def _mount_private_run():
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=64m", "parm-sandbox", "/run"],
                   check=True, capture_output=True, text=True)
    for sub in ("netns", "lock", "tmp"):
        os.makedirs(f"/run/{sub}", exist_ok=True)
    os.chmod("/run/tmp", 0o1777)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True, text=True)


def init(command):
    """PID 1: prepare the namespaces, run ``command``, reap, exit with its status."""
    if os.getpid() != 1:
        raise cli.UsageError("init runs only as PID 1 of a new PID namespace (use sandbox.argv)")
    try:
        _mount_private_run()
    except subprocess.CalledProcessError as exc:
        raise cli.Failure(f"cannot prepare the sandbox: {' '.join(exc.cmd)}: {exc.stderr.strip()}") from None
    env = dict(os.environ, **{INSIDE_ENV: "1", "TMPDIR": "/run/tmp"})
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the command's to handle
    child = subprocess.Popen(command, env=env, restore_signals=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 1
        except InterruptedError:
            continue
        if pid == child.pid:
            # Returning ends PID 1: the kernel kills whatever is left inside.
            return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _main(argv_):
    parser = cli.ArgumentParser(prog="python -m deploy.network.sandbox",
                                description="The testbed's sandbox (see the module doc); `check` says if it "
                                            "can be made here.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="exit 0 and say how, if the sandbox can be made here; else one line, exit 1")
    run = sub.add_parser("init", help="internal: PID 1 of a sandbox")
    run.add_argument("argv", nargs=argparse.REMAINDER)
    a = parser.parse_args(argv_)
    if a.command == "check":
        try:
            print(f"sandbox: {mode()}")
        except SandboxUnavailable as exc:
            raise cli.Failure(str(exc)) from None
        return 0
    command = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
    if not command:
        raise cli.UsageError("init needs a command after --")
    return init(command)


def main(argv_=None):
    return cli.run_main(_main, argv_, prog="python -m deploy.network.sandbox")


if __name__ == "__main__":
    sys.exit(main())
