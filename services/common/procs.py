"""Starting and stopping service processes (tests, runners, chaos tools).

Readiness protocol, followed by every ``python -m services.*`` entry point and
``python -m loadgen serve``: given ``--ready-file PATH``, the process writes
``{"port": N, "pid": P, ...}`` as JSON to ``PATH`` (atomically: write to a
temporary name, then rename) once it is serving. ``--port 0`` picks a free
port, which is how tests and the local runner avoid collisions.

Ownership: a ``ServiceProcess`` owns its child. ``stop()`` sends SIGTERM,
waits ``grace_s``, then SIGKILLs; it is idempotent and also runs at
interpreter exit for anything still alive, so no caller leaks a process. A
start that fails or is interrupted (Ctrl-C while waiting for the ready file)
stops its child before the exception leaves the constructor.
It also owns a temporary directory (``parm-NAME-*``: the ready file, and
the log unless ``log_path`` is given) and removes it when the process is
stopped, when a start fails, and at the latest when the handle is garbage
collected or the interpreter exits (also after Ctrl-C), so runs leave
nothing in the temporary directory. The last lines of a log kept there
stay readable through ``tail_log()`` after ``stop()``.
Children start in their own process group so that a Ctrl-C in a terminal
reaches the runner only, which then stops them in order.
"""

import atexit
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref

_LIVE = weakref.WeakSet()


def write_ready_file(path, port, **extra):
    """Atomically writes the readiness JSON (called by the services)."""
    if not path:
        return
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"port": port, "pid": os.getpid(), **extra}))
    os.replace(tmp, path)


class ServiceStartError(RuntimeError):
    """A service process exited or did not become ready in time."""


class ServiceProcess:
    """A child service process started with ``--port 0 --ready-file``."""

    def __init__(self, argv, *, name, log_path=None, env=None, ready_timeout_s=60.0):
        self.name = name
        self.argv = list(argv)
        self._dir = tempfile.mkdtemp(prefix=f"parm-{name}-")
        # removes the directory once: at stop(), at garbage collection or at exit
        self._remove_dir = weakref.finalize(self, shutil.rmtree, self._dir, True)
        self._saved_tail = None
        self.ready_path = pathlib.Path(self._dir) / "ready.json"
        self.log_path = pathlib.Path(log_path) if log_path else pathlib.Path(self._dir) / "log.txt"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            self.argv + ["--ready-file", str(self.ready_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
        _LIVE.add(self)
        try:
            self.info = self._wait_ready(ready_timeout_s)
        except BaseException:
            # Ctrl-C (or any error) while waiting: nobody will get a handle to
            # this child, and _LIVE holds it only weakly, so stop it now.
            self.stop(grace_s=1)
            raise
        self.port = int(self.info["port"])

    @classmethod
    def python_module(cls, module, args, **kwargs):
        """Starts ``python -m module *args`` with this interpreter."""
        return cls([sys.executable, "-m", module, *map(str, args)], name=kwargs.pop("name", module), **kwargs)

    @property
    def pid(self):
        return self.proc.pid

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def _wait_ready(self, timeout_s):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready_path.exists():
                return json.loads(self.ready_path.read_text())
            if self.proc.poll() is not None:
                self._release()
                _LIVE.discard(self)
                raise ServiceStartError(
                    f"{self.name} exited with code {self.proc.returncode} before it was ready:\n"
                    + self.tail_log()
                )
            time.sleep(0.05)
        self.stop(grace_s=1)
        raise ServiceStartError(f"{self.name} was not ready after {timeout_s:.0f} s:\n" + self.tail_log())

    def tail_log(self, lines=30):
        """The last ``lines`` lines of the process's log (also after ``stop()``)."""
        if self._saved_tail is not None:
            return "\n".join(self._saved_tail[-lines:])
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self):
        return self.proc.poll() is None

    def kill(self, sig=signal.SIGKILL):
        """Sends ``sig`` to the process (``kill -9`` by default) and reaps it."""
        if self.alive():
            os.kill(self.proc.pid, sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        if not self.alive():  # dead and reaped: nothing more to own
            self._release()
            _LIVE.discard(self)

    def stop(self, grace_s=5.0):
        """SIGTERM, wait up to ``grace_s``, then SIGKILL. Idempotent."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        self._release()
        _LIVE.discard(self)
        return self.proc.returncode

    def _release(self):
        """Closes the log and removes the temporary directory (keeping the log's tail)."""
        if not self._log.closed:
            self._log.close()
        if self._remove_dir.alive:
            if pathlib.Path(self._dir) in self.log_path.parents:
                self._saved_tail = self.tail_log(200).splitlines()
            self._remove_dir()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


@atexit.register
def _stop_all():
    for service in list(_LIVE):
        service.stop(grace_s=2)
