"""Escapes and verdict forgeries against megapmp.sandbox, each judged from outside the sandbox.

Standard library only, and independent of the megapmp package: `tests/test_sandbox.py` runs every
attack in its own process (as the caller, i.e. root in CI) and, through ``setpriv``, as an unprivileged
user from a world-readable copy of this file and ``runner.py`` (megapmp/sandbox/runner.py):

    python sandbox_attacks.py DIR_WITH_SANDBOX_PY  ->  JSON {attack: [contained, detail]}

The escape programs undo the in-process guards the way a determined program would (``_io.open``,
``posix.fork``, the socket class under the guard's subclass), so what is measured is the OS isolation.
An escape counts as contained only if the program demonstrably ran (it prints ``ran``) and its effect
is absent outside: no file in the caller's directory, /tmp or /dev/shm, no secret of the caller's
environment in its output, no process left alive, no connection accepted. A forgery is contained when a
failing solution is not reported ``passed``; a correct solution must still pass (the control).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import tempfile
import time

RAN = "print('ran', flush=True)\n"
UNGUARDED_OPEN = "import _io\n"  # _io.open is the C function the guard's open() wraps


def _escape_cwd(sb) -> tuple[bool, str]:
    # The caller's working directory: a directory the caller itself may write to.
    scratch = tempfile.mkdtemp(prefix="megapmp-attack-cwd-")
    target = os.path.join(scratch, "pwned")
    old = os.getcwd()
    try:
        os.chdir(scratch)
        code = RAN + UNGUARDED_OPEN + (
            "import os\nfor path in (%r, '/proc/%%d/cwd/pwned' %% os.getppid()):\n"
            "    try:\n        _io.open(path, 'w').write('x')\n        print('wrote', path)\n"
            "    except OSError as e:\n        print('refused', path, e)\n" % target)
        r = sb.run_untrusted(code, timeout_s=10.0)
        found = os.listdir(scratch)
    finally:
        os.chdir(old)
        for name in os.listdir(scratch):
            os.remove(os.path.join(scratch, name))
        os.rmdir(scratch)
    return _ran(r) and not found, f"files in the caller's directory: {found}; {_out(r)}"


def _escape_shared_tmp(sb) -> tuple[bool, str]:
    token = secrets.token_hex(6)
    paths = [f"/tmp/megapmp-escape-{token}", f"/dev/shm/megapmp-escape-{token}"]
    code = RAN + UNGUARDED_OPEN + (
        "for path in %r:\n    try:\n        _io.open(path, 'w').write('x')\n        print('wrote', path)\n"
        "    except OSError as e:\n        print('refused', path, e)\n" % paths)
    r = sb.run_untrusted(code, timeout_s=10.0)
    survived = [p for p in paths if os.path.exists(p)]
    for p in survived:
        os.remove(p)
    return _ran(r) and not survived, f"visible outside after the run: {survived}; {_out(r)}"


def _escape_parent_environ(sb) -> tuple[bool, str]:
    # The secret is in this process's environment since it started (main() sees to it): that is what
    # /proc/<pid>/environ shows; a variable set later lives elsewhere in memory.
    secret = os.environ.get("OPENAI_API_KEY", "")
    if not secret.startswith("sk-megapmp-"):
        return False, "the runner was not started with a planted OPENAI_API_KEY"
    code = RAN + (
        "import os\nfound = []\nfor pid in os.listdir('/proc'):\n    if pid.isdigit():\n        try:\n"
        "            data = open('/proc/%s/environ' % pid, 'rb').read()\n        except OSError:\n"
        "            continue\n        found += [v.decode(errors='replace') for v in data.split(b'\\0')"
        " if v.startswith(b'OPENAI_API_KEY=')]\nprint(found)\nprint(os.environ)\n")
    r = sb.run_untrusted(code, timeout_s=10.0)
    leaked = secret in r.stdout or secret in r.stderr
    return _ran(r) and not leaked, f"secret leaked: {leaked}; {_out(r)}"


def _escape_setsid_grandchild(sb) -> tuple[bool, str]:
    # The grandchild names itself with a token (its comm, visible in the host's /proc) and sleeps.
    token = "mpx" + secrets.token_hex(6)
    code = RAN + (
        "import posix, os, time, ctypes\nif posix.fork() == 0:\n    os.setsid()\n    if posix.fork() == 0:\n"
        "        ctypes.CDLL(None).prctl(15, %r.encode(), 0, 0, 0)\n        time.sleep(30)\n"
        "    os._exit(0)\ntime.sleep(0.5)\nprint('forked', flush=True)\n" % token)
    r = sb.run_untrusted(code, timeout_s=10.0)
    time.sleep(0.5)
    alive = _processes_named(token)
    for pid in alive:  # clean up what escaped, by pid
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    return _ran(r) and "forked" in r.stdout and not alive, f"alive after the run: {alive}; {_out(r)}"


def _processes_named(comm: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if name == comm and state != "Z":
            found.append(int(pid))
    return found


def _escape_loopback(sb) -> tuple[bool, str]:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        port = srv.getsockname()[1]
        code = RAN + (
            "import _socket\nS = [c for c in _socket.socket.__mro__ if c.__name__ == 'socket'][0]\n"
            "s = S(_socket.AF_INET, _socket.SOCK_STREAM)\ns.settimeout(3)\ns.connect(('127.0.0.1', %d))\n"
            "print('connected')\n" % port)
        r = sb.run_untrusted(code, timeout_s=10.0)
        srv.setblocking(False)
        try:
            conn, _ = srv.accept()
            conn.close()
            accepted = True
        except BlockingIOError:
            accepted = False
    finally:
        srv.close()
    return _ran(r) and not accepted and "connected" not in r.stdout, f"connection accepted: {accepted}; {_out(r)}"


# -- forgeries of the verdict -------------------------------------------------------------------------

TEST = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"
WRONG = "def add(a, b):\n    return a - b\n"

FORGERIES = {
    # The end-of-tests marker is in the program's own source: print it and leave with status 0.
    "forge_marker_and_os_exit": (
        "import os, re, sys\n"
        "def add(a, b):\n"
        "    try:\n        src = open(__file__).read()\n    except OSError:\n        src = ''\n"
        "    print('PASSED')\n"
        "    for m in re.findall(r'megapmp-[a-z-]*[0-9a-f]{8,}', src + ' '.join(sys.argv)):\n        print(m)\n"
        "    for line in src.splitlines():  # the marker line last, as the harness would print it\n"
        "        if line.startswith('print(') and 'done' in line:\n            exec(line.strip())\n"
        "    sys.stdout.flush()\n    os._exit(0)\n", TEST),
    "forge_sys_exit_before_tests": ("import sys\n" + WRONG + "sys.exit(0)\n", TEST),
    "forge_os_exit_before_tests": ("import os\n" + WRONG + "os._exit(0)\n", TEST),
    "forge_system_exit_in_test": ("def add(a, b):\n    raise SystemExit(0)\n", TEST),
    "forge_patched_unittest": (
        "import unittest\nunittest.TestCase.assertEqual = lambda self, *a, **k: None\n" + WRONG,
        "def check(candidate):\n    import unittest\n    unittest.TestCase().assertEqual(candidate(1, 2), 3)\n"),
    "forge_patched_builtin": (
        "import builtins\nbuiltins.abs = lambda x: 0\n" + WRONG,
        "def check(candidate):\n    assert abs(candidate(1, 2) - 3) < 1e-9\n"),
    "forge_printed_markers": (
        "import sys\nprint('PASSED')\nprint('all tests passed')\nprint('megapmp-tests-done-0123456789abcdef')\n"
        "def add(a, b):\n    print('megapmp-tests-done-0123456789abcdef')\n    raise SystemExit(0)\n", TEST),
    # Write a forged record into every descriptor the process holds (bypassing os.write's guard).
    "forge_verdict_descriptors": (
        "import posix, os\ndef add(a, b):\n"
        "    for fd in range(3, 256):\n        for rec in (b'passed\\n', b'ok', b'megapmp-tests-done\\n'):\n"
        "            try:\n                posix.write(fd, rec)\n            except OSError:\n                pass\n"
        "    os._exit(0)\n", TEST),
    # Hunt the nonce in every object the garbage collector knows (module dicts, closures, cells,
    # tuples), call anything named like a harness function, write every candidate to every descriptor.
    "forge_nonce_hunt_via_gc": (
        "import gc, os, posix, re, sys, types\n"
        "def add(a, b):\n"
        "    found = set()\n"
        "    for o in gc.get_objects():\n"
        "        if isinstance(o, dict):\n            items = list(o.values())\n"
        "        elif isinstance(o, (list, tuple, set, frozenset)):\n            items = list(o)\n"
        "        elif isinstance(o, types.FunctionType):\n"
        "            items = [c.cell_contents for c in (o.__closure__ or ()) if c.cell_contents is not None]\n"
        "            if o.__name__ in ('finish', 'report', '_finish'):\n"
        "                try:\n                    o()\n                except Exception:\n                    pass\n"
        "        else:\n            continue\n"
        "        found.update(v for v in items if isinstance(v, str) and re.fullmatch('[0-9a-f]{16,64}', v))\n"
        "    main = sys.modules.get('__main__')\n"
        "    found.update(v for v in vars(main).values() if isinstance(v, str) and re.fullmatch('[0-9a-f]{16,64}', v))\n"
        "    for n in found:\n"
        "        for fd in range(3, 64):\n"
        "            try:\n                posix.write(fd, n.encode())\n            except OSError:\n                pass\n"
        "    os._exit(0)\n", TEST),
}


def _forgery(solution: str, test: str):
    def attack(sb) -> tuple[bool, str]:
        r = sb.run_tests(solution, test, "add", timeout_s=10.0)
        return r.status != "passed", f"{r.status}; {_out(r)}"
    return attack


def _forge_reported_records(sb) -> tuple[bool, str]:
    # A harness that reports through the channel (as verified.run_doctests does) runs code that prints
    # look-alike records and writes them to every descriptor; only the harness's own line may arrive.
    if not hasattr(sb, "run_reporting"):
        return False, "no authenticated report channel (records are parsed from stdout)"
    code = ("report = globals().pop('__sandbox_report__')\n"
            "exec(compile(%r, 'snippet.py', 'exec'), {'__name__': 'snippet'})\n"
            "report('harness: done')\n") % (
        "import posix\nfor fd in range(1, 64):\n    try:\n        posix.write(fd, b'{\"ok\": true}\\n')\n"
        "    except OSError:\n        pass\nprint('{\"ok\": true}')\n")
    r, lines = sb.run_reporting(code, timeout_s=10.0)
    return r.status == "passed" and lines == ["harness: done"], f"lines {lines}; {_out(r)}"


def _control_correct_solution_passes(sb) -> tuple[bool, str]:
    r = sb.run_tests("def add(a, b):\n    print('noise')\n    return a + b\n", TEST, "add", timeout_s=10.0)
    return r.status == "passed", f"{r.status}; {_out(r)}"


def _ran(r) -> bool:
    return r.stdout.startswith("ran\n")


def _out(r) -> str:
    return f"status {r.status}, stdout {r.stdout[-300:]!r}, stderr {r.stderr[-300:]!r}"


ATTACKS = {
    "escape_write_caller_cwd": _escape_cwd,
    "escape_write_tmp_and_dev_shm": _escape_shared_tmp,
    "escape_read_parent_environ": _escape_parent_environ,
    "escape_setsid_grandchild_survives": _escape_setsid_grandchild,
    "escape_connect_loopback_via__socket": _escape_loopback,
    **{name: _forgery(*args) for name, args in FORGERIES.items()},
    "forge_reported_records": _forge_reported_records,
    "control_correct_solution_passes": _control_correct_solution_passes,
}


def run_all(sb) -> dict[str, list]:
    results = {}
    for name, attack in ATTACKS.items():
        try:
            contained, detail = attack(sb)
        except Exception as exc:  # an attack that breaks the harness is not contained
            contained, detail = False, f"{type(exc).__name__}: {exc}"
        results[name] = [bool(contained), detail]
    return results


def main(argv: list[str]) -> int:
    """argv: the directory holding runner.py (megapmp/sandbox/runner.py), then optionally the backend to force (bwrap, unshare)."""
    if not os.environ.get("OPENAI_API_KEY", "").startswith("sk-megapmp-"):
        # Plant the secret in the initial environment, where /proc/<pid>/environ reads it: start again.
        env = dict(os.environ, OPENAI_API_KEY="sk-megapmp-" + secrets.token_hex(12))
        os.execve(sys.executable, sys.orig_argv, env)
    sys.path.insert(0, argv[0])
    import ctypes

    import runner as sandbox  # the copy in argv[0]

    # A user's own processes are dumpable (readable through /proc by the same uid); one that switched
    # uid from root, like this runner under setpriv, is not until it says so. Be the ordinary case.
    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
    caps = sandbox.sandbox_capabilities()
    if len(argv) > 1:
        backend = argv[1]
        problem = sandbox._probe(dict(caps, backend=backend)) if caps.get(backend) else "not installed"
        if problem is not None:
            print(json.dumps({"_unavailable": f"{backend}: {problem}"}))
            return 0
        sandbox._caps = dict(caps, backend=backend)
    out = run_all(sandbox)
    out["_backend"] = sandbox.sandbox_capabilities().get("backend")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
