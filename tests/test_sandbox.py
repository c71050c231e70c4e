"""megapmp.synth.sandbox: generated code runs only in a separate, limited process.

Every test checks that the calling process is unharmed afterwards (same cwd, same environment, no
leftover sandbox processes, still computing). Tests of an OS-level mechanism (network namespace,
unprivileged uid, RLIMIT_NPROC) run with the in-process guards off, and are skipped where
`sandbox_capabilities()` says the mechanism is not available.
"""

from __future__ import annotations

import os
import socket
import textwrap
import time

import pytest

from megapmp.synth import sandbox
from megapmp.synth.sandbox import run_tests, run_untrusted, sandbox_capabilities

CAPS = sandbox_capabilities()


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _sandbox_processes(marker: str) -> list[int]:
    """Live processes whose command line mentions `marker` (a sandbox directory)."""
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
def caller_unharmed():
    def environment():
        return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}

    cwd, env = os.getcwd(), environment()
    yield
    assert os.getcwd() == cwd
    assert environment() == env
    assert sum(i * i for i in range(1000)) == 332833500  # still computing
    assert run_untrusted("print(6 * 7)").stdout == "42\n"  # and can still start sandboxes


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
    target = tmp_path / "outside.txt"
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
        assert "SandboxViolation" in r.stderr or "PermissionError" in r.stderr, (code, r.stderr)
    assert victim.read_text() == "keep me"
    # Inside its own directory the program may write, and tempfile works there.
    r = run_untrusted("import os, tempfile\nopen('a.txt', 'w').write('x')\n"
                      "with tempfile.NamedTemporaryFile('w') as f:\n    f.write('y')\n"
                      "os.makedirs('d/e')\nos.remove('a.txt')\nprint(sorted(os.listdir('.')))\n")
    assert r.status == "passed", r
    assert r.stdout == "['d', 'prog.py']\n"


@pytest.mark.skipif(not CAPS["drop_uid"], reason="the sandbox cannot switch to an unprivileged uid here")
def test_unprivileged_uid_refuses_outside_writes_without_guards(tmp_path):
    target = tmp_path / "outside.txt"
    r = run_untrusted(f"open({str(target)!r}, 'w').write('x')", guards=False)
    assert r.status == "failed" and "PermissionError" in r.stderr, r
    assert not target.exists()
    r = run_untrusted("import os\nos.kill(1, 0)\n", guards=False)  # signalling others is refused
    assert r.status == "failed" and "PermissionError" in r.stderr, r


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


@pytest.mark.skipif(not CAPS["netns"], reason="unshare(1) cannot create a network namespace here")
def test_network_namespace_blocks_loopback_without_guards():
    srv = _listener()
    port = srv.getsockname()[1]
    try:
        r = run_untrusted(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
                          guards=False)
        assert r.status == "failed", r
        assert "Network is unreachable" in r.stderr or "Connection refused" in r.stderr, r.stderr
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
        pytest.skip("RLIMIT_NPROC is not enforced here (root without a uid switch)")
    r = run_untrusted(FORK_LOOP, timeout_s=2.0, max_procs=16, guards=guards)
    assert r.status == "timeout", r
    workdir, forked = r.stdout.splitlines()[:2]
    assert int(forked.split()[1]) < 16  # the 50 forks were cut at the limit
    time.sleep(0.2)
    assert _sandbox_processes(workdir) == []  # none of them outlives the run
    assert not os.path.exists(workdir)


@pytest.mark.skipif(not CAPS["drop_uid"], reason="needs the per-run uid to find escaped processes")
def test_process_that_leaves_the_group_is_killed():
    code = textwrap.dedent("""
        import os, time
        print(os.getcwd(), flush=True)
        if os.fork() == 0:
            os.setsid()  # leaves the process group the sandbox kills on exit
            time.sleep(60)
            os._exit(0)
    """)
    r = run_untrusted(code, timeout_s=5.0)
    assert r.status == "passed", r
    time.sleep(0.2)
    assert _sandbox_processes(r.stdout.split()[0]) == []


def test_bomb_like_forks_without_guards_do_not_harm_the_caller():
    # 2**7 processes wanted; with the uid switch RLIMIT_NPROC stops them, otherwise the group kill.
    code = "import os, time\nprint(os.getcwd(), flush=True)\nfor _ in range(7):\n    os.fork()\ntime.sleep(60)\n"
    r = run_untrusted(code, timeout_s=1.5, max_procs=16, guards=False)
    assert r.status in ("timeout", "failed", "killed"), r
    time.sleep(0.2)
    assert _sandbox_processes(r.stdout.splitlines()[0]) == []


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
    assert quitter.status == "failed" and "exited before the tests completed" in quitter.stderr
    slow = run_tests("def add(a, b):\n    while True:\n        pass\n", tests, "add", timeout_s=1.0)
    assert slow.status == "timeout"


def test_fallback_without_namespace_or_uid_switch(monkeypatch):
    # The in-process guards alone still refuse network and outside writes (e.g. non-root, no unshare).
    monkeypatch.setattr(sandbox, "_caps", dict(CAPS, netns=False, netns_command=None, drop_uid=False,
                                               nproc=False))
    r = run_untrusted("import socket\nsocket.socket()")
    assert r.status == "failed" and "SandboxViolation" in r.stderr
    assert "netns" not in r.isolation and "drop_uid" not in r.isolation
    r = run_untrusted("print(1)")
    assert r.status == "passed" and r.stdout == "1\n"
    r = run_untrusted(FORK_LOOP, timeout_s=1.5, max_procs=8)
    assert r.status == "timeout" and int(r.stdout.splitlines()[1].split()[1]) <= 8  # the guard's fork budget
    time.sleep(0.2)
    assert _sandbox_processes(r.stdout.splitlines()[0]) == []


def test_concurrent_runs_are_independent():
    from concurrent.futures import ThreadPoolExecutor

    codes = [f"print({i} * {i})" for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run_untrusted, codes))
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(8)]


def test_capabilities_are_reported():
    caps = sandbox_capabilities()
    assert {"netns", "drop_uid", "nproc", "rlimits"} <= set(caps)
    r = run_untrusted("pass")
    assert ("netns" in r.isolation) == caps["netns"] and ("drop_uid" in r.isolation) == caps["drop_uid"]
