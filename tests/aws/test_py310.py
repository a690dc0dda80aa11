"""Code that runs on the nodes must run on Python 3.10 (the GPU image's Python, Ubuntu 22.04).

Two checks over every module the nodes run (``NODE_CODE``):

- an AST scan for standard-library APIs and syntax that 3.10 lacks
  (``asyncio.timeout``, ``TaskGroup``, ``ExceptionGroup``, ``except*``,
  ``tomllib``, ``datetime.UTC``, ``typing.Self``, PEP 695, ...); it runs
  everywhere and fails naming file:line and the 3.10 way to write it;
- where a Python 3.10 interpreter is at hand (``PARM_PY310``, or pyenv's
  ``3.10.*``), every file is byte-compiled with it, which catches syntax
  the scan does not know (3.12 f-strings, ...), and the boot's
  ``bootstrap.py`` (which runs on the image's bare ``python3``) is run
  under it; skipped, saying so, where there is none.
"""

import ast
import glob
import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
# What the nodes run: services, load generators, the sweep runner (frontend node), background shuffles,
# the node agent, the on-node AWS helpers, the coding kernels' Python layer.
NODE_CODE = ("services", "loadgen", "coding_ext", "deploy/runner", "deploy/network", "deploy/remote",
             "deploy/aws", "deploy/certs.py")

# module -> {attribute: the 3.10 way}
MODULE_ATTRS = {
    "asyncio": {"timeout": "asyncio.wait_for(coro, timeout) (or a deadline checked by hand)",
                "timeout_at": "asyncio.wait_for with the remaining time",
                "TaskGroup": "asyncio.gather(*tasks) with cancellation of the rest on error",
                "Runner": "asyncio.run", "Barrier": "an asyncio.Event/Condition"},
    "datetime": {"UTC": "datetime.timezone.utc"},
    "typing": {"Self": "a TypeVar bound to the class", "LiteralString": "str", "Never": "typing.NoReturn",
               "assert_never": "raise AssertionError", "reveal_type": "(remove)", "Required": "typing_extensions",
               "NotRequired": "typing_extensions", "TypeVarTuple": "typing_extensions",
               "Unpack": "typing_extensions", "override": "(remove)"},
    "enum": {"StrEnum": "class X(str, enum.Enum)", "verify": "(remove)", "ReprEnum": "enum.Enum"},
    "hashlib": {"file_digest": "a read loop over hashlib.sha256().update"},
    "contextlib": {"chdir": "os.chdir in try/finally"},
    "operator": {"call": "f(*args)"},
    "logging": {"getLevelNamesMapping": "logging._nameToLevel or getattr(logging, name)"},
    "math": {"exp2": "2 ** x", "cbrt": "x ** (1 / 3)"},
    "itertools": {"batched": "a slicing loop"},
}
MODULES_NEW = {"tomllib": "tomli (a dependency) or JSON", "wsgiref.types": "(remove)"}
NAMES_NEW = {"ExceptionGroup": "a plain exception carrying a list", "BaseExceptionGroup": "a plain exception",
             "aiter": None, "anext": None}  # aiter/anext are 3.10: allowed
METHODS_NEW = {"add_note": "put the note in the message"}


def node_files():
    out = []
    for entry in NODE_CODE:
        path = REPO / entry
        out.extend([path] if path.is_file() else sorted(path.rglob("*.py")))
    return [p for p in out if "__pycache__" not in p.parts]


def findings(path):
    """(line, what, the 3.10 way) for each 3.11+ feature in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    aliases = {}  # local name -> module, from `import x as y` / `from x import y`
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name] = a.name
                if a.name in MODULES_NEW:
                    found.append((node.lineno, f"import {a.name}", MODULES_NEW[a.name]))
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module in MODULES_NEW:
                found.append((node.lineno, f"from {node.module} import", MODULES_NEW[node.module]))
            for a in node.names:
                if a.name in MODULE_ATTRS.get(node.module, {}):
                    found.append((node.lineno, f"from {node.module} import {a.name}",
                                  MODULE_ATTRS[node.module][a.name]))
        elif isinstance(node, ast.Attribute):
            module = aliases.get(node.value.id, node.value.id) if isinstance(node.value, ast.Name) else None
            if node.attr in MODULE_ATTRS.get(module, {}):
                found.append((node.lineno, f"{module}.{node.attr}", MODULE_ATTRS[module][node.attr]))
            elif node.attr in METHODS_NEW:
                found.append((node.lineno, f".{node.attr}()", METHODS_NEW[node.attr]))
        elif isinstance(node, ast.Name) and NAMES_NEW.get(node.id):
            found.append((node.lineno, node.id, NAMES_NEW[node.id]))
        elif isinstance(node, ast.Name) and node.id == "TimeoutError" and "asyncio" in aliases.values():
            # 3.11 made asyncio.TimeoutError the builtin; on 3.10 catching TimeoutError misses asyncio's.
            found.append((node.lineno, "builtin TimeoutError in asyncio code", "asyncio.TimeoutError"))
        elif type(node).__name__ == "TryStar":
            found.append((node.lineno, "except*", "except with isinstance checks"))
        elif type(node).__name__ == "TypeAlias":
            found.append((node.lineno, "type X = ... (PEP 695)", "X: TypeAlias = ..."))
        elif getattr(node, "type_params", None):
            found.append((node.lineno, "generic syntax [T] (PEP 695)", "typing.TypeVar"))
    both = {n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "TimeoutError"}
    return sorted({f for f in found if not (f[1] == "builtin TimeoutError in asyncio code" and f[0] in both)})


def test_the_scan_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import asyncio as aio\nimport tomllib\nfrom datetime import UTC\n"
                   "async def f():\n    async with aio.timeout(1):\n        pass\n"
                   "    async with aio.TaskGroup() as tg:\n        pass\n"
                   "try:\n    pass\nexcept* ValueError:\n    pass\n"
                   "e = ExceptionGroup('x', [])\ne.add_note('n')\n"
                   "try:\n    pass\nexcept TimeoutError:\n    pass\n")
    whats = [w for _, w, _ in findings(bad)]
    assert whats == ["import tomllib", "from datetime import UTC", "asyncio.timeout", "asyncio.TaskGroup",
                     "except*", "ExceptionGroup", ".add_note()", "builtin TimeoutError in asyncio code"]
    good = tmp_path / "good.py"
    good.write_text("import asyncio\nasync def f(c):\n    return await asyncio.wait_for(c, 1)\n"
                    "x = aiter\n")
    assert findings(good) == []


def test_node_code_has_no_python_311_features():
    problems = [f"{p.relative_to(REPO)}:{line}: {what} (3.10: {instead})"
                for p in node_files() for line, what, instead in findings(p)]
    assert problems == [], "\n" + "\n".join(problems)


def _python310():
    candidates = [os.environ.get("PARM_PY310", "")] + sorted(
        glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3.10")))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def test_node_code_compiles_under_python_310(tmp_path):
    py310 = _python310()
    if py310 is None:
        pytest.skip("no Python 3.10 interpreter here (set PARM_PY310); the AST scan still ran")
    files = [str(p) for p in node_files()]
    script = ("import sys\nbad = []\nfor f in sys.argv[1:]:\n    try:\n"
              "        compile(open(f).read(), f, 'exec')\n"
              "    except SyntaxError as e:\n        bad.append(f'{e.filename}:{e.lineno}: {e.msg}')\n"
              "print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n")
    proc = subprocess.run([py310, "-c", script, *files], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bootstrap_runs_under_python_310():
    py310 = _python310()
    if py310 is None:
        pytest.skip("no Python 3.10 interpreter here (set PARM_PY310)")
    proc = subprocess.run([py310, "-I", str(REPO / "deploy" / "aws" / "bootstrap.py"), "fetch", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--bucket-owner" in proc.stdout, proc.stderr
