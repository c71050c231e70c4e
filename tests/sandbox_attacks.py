"""Escapes and verdict forgeries against megapmp.sandbox, each judged from outside the sandbox.

Standard library only, and independent of the megapmp package: `tests/test_sandbox.py` runs every
attack in its own process (as the caller, i.e. root in CI) and, through ``setpriv``, as an unprivileged
user from a world-readable copy of this file and the sandbox's two files (runner.py, inside.py), once per
backend:

    python sandbox_attacks.py DIR_WITH_RUNNER_PY BACKEND SCRATCH_DIR  ->  JSON {attack: [contained, detail]}

SCRATCH_DIR is a directory of the host this process may write to, outside /tmp, /var/tmp and /dev/shm
(what a caller's home or working directory is): the host socket and the caller's private file live there.
The escape programs undo the in-process guards the way a determined program would (``_io.open``,
``posix.fork``, the socket class under the guard's subclass, ctypes), so what is measured is the OS
isolation. An escape counts as contained only if the program demonstrably ran (it prints ``ran``) and its
effect is absent outside: no file in the caller's directory, /tmp or /dev/shm, no secret of the caller's
in its output, no process left alive, no connection accepted, no storage past the budget, no process past
the limit. A forgery is contained when a failing solution is not reported ``passed``; a correct solution
must still pass (the controls).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import tempfile
import textwrap
import time

RAN = "print('ran', flush=True)\n"
UNGUARDED_OPEN = "import _io\n"  # _io.open is the C function the guard's open() wraps
# keyctl and add_key by machine (the kernel's keyrings are not namespaced); memfd_secret, the same on both
_KEY_SYSCALLS = {"x86_64": (248, 250), "aarch64": (217, 219)}
_MEMFD_SECRET = {"x86_64": 447, "aarch64": 447}.get(os.uname().machine)


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
    leaked = _printed(r, secret)
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
    _kill(alive)  # clean up what escaped
    return _ran(r) and "forked" in r.stdout and not alive, f"alive after the run: {alive}; {_out(r)}"


def _escape_outlive_killed_caller(sb) -> tuple[bool, str]:
    # The caller dies (SIGKILL, the OOM killer) while its program sleeps: nothing may be left running.
    import subprocess
    token = "mpx" + secrets.token_hex(6)
    # It also tries to hold a writer of every pipe its processes can see (a lifeline to the caller would
    # then never reach end of file).
    program = RAN + UNGUARDED_OPEN + (
        "import ctypes, os, time\nheld = []\nfor pid in os.listdir('/proc'):\n    if pid.isdigit():\n"
        "        try:\n            fds = os.listdir('/proc/%%s/fd' %% pid)\n"
        "        except OSError:\n            continue\n"
        "        for fd in fds:\n            try:\n"
        "                held.append(_io.open('/proc/%%s/fd/%%s' %% (pid, fd), 'wb'))\n"
        "            except OSError:\n                pass\n"
        "ctypes.CDLL(None).prctl(15, %r.encode(), 0, 0, 0)\ntime.sleep(60)\n" % token)
    caller = ("import json, sys\nsys.path.insert(0, %r)\nimport runner\nrunner._caps = json.loads(%r)\n"
              "runner.run_untrusted(%r, timeout_s=60.0)\n"
              % (os.path.dirname(os.path.abspath(sb.__file__)), json.dumps(sb.sandbox_capabilities()), program))
    proc = subprocess.Popen([sys.executable, "-I", "-c", caller], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started = []
    for _ in range(200):
        started = _processes_named(token)
        if started or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    time.sleep(1.0)
    alive = _processes_named(token)
    _kill(alive)  # clean up what survived
    error = proc.stderr.read().decode(errors="replace")[-300:]
    proc.stderr.close()
    return bool(started) and not alive, f"running before the kill: {started}, after: {alive}; {error!r}"


def _kill(pids: list[int]) -> None:
    for pid in pids:  # by pid, never by name
        try:
            os.kill(pid, 9)
        except OSError:
            pass


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


def _connect(sb, srv: socket.socket, family: str, address, payload: bytes = b"") -> tuple[bool, str]:
    """Contained when the program, with the real socket class under the guard's subclass, cannot connect
    to the host's listening ``srv`` at ``address`` (family: the _socket constant's name)."""
    code = RAN + (
        "import _socket\nS = [c for c in _socket.socket.__mro__ if c.__name__ == 'socket'][0]\n"
        "s = S(_socket.%s, _socket.SOCK_STREAM)\ns.settimeout(3)\ns.connect(%r)\n%s"
        "print('connected')\n" % (family, address, f"s.sendall({payload!r})\n" if payload else ""))
    r = sb.run_untrusted(code, timeout_s=10.0)
    srv.setblocking(False)
    try:
        conn, _ = srv.accept()
        conn.close()
        accepted = True
    except BlockingIOError:
        accepted = False
    return _ran(r) and not accepted and "connected" not in r.stdout, f"connection accepted: {accepted}; {_out(r)}"


def _escape_loopback(sb) -> tuple[bool, str]:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        return _connect(sb, srv, "AF_INET", ("127.0.0.1", srv.getsockname()[1]))
    finally:
        srv.close()


SCRATCH = ""  # set by main(): a host directory of the caller's, outside /tmp, /var/tmp and /dev/shm


def _escape_host_unix_socket(sb) -> tuple[bool, str]:
    # A unix socket of the host's, listening in the caller's directory (like an X server's, a database's,
    # an ssh agent's): the network namespace does not cover socket files, only what is visible does.
    path = os.path.join(SCRATCH, f"listener-{secrets.token_hex(4)}.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(path)
        os.chmod(path, 0o777)
        srv.listen(8)
        return _connect(sb, srv, "AF_UNIX", path, payload=b"pwned")
    finally:
        srv.close()
        if os.path.exists(path):
            os.remove(path)


def _escape_read_caller_private_file(sb) -> tuple[bool, str]:
    secret = "megapmp-private-" + secrets.token_hex(8)
    path = os.path.join(SCRATCH, f"private-{secrets.token_hex(4)}.txt")
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
    try:
        os.write(fd, secret.encode())
        os.close(fd)
        code = RAN + "try:\n    print(open(%r).read())\nexcept OSError as e:\n    print('refused', e)\n" % path
        r = sb.run_untrusted(code, timeout_s=10.0)
    finally:
        os.remove(path)
    leaked = _printed(r, secret)
    return _ran(r) and not leaked, f"secret read: {leaked}; {_out(r)}"


def _escape_nested_userns_tmpfs(sb) -> tuple[bool, str]:
    # A user namespace of its own gives the program CAP_SYS_ADMIN over a new mount namespace: an unsized
    # tmpfs there is storage outside every limit (RLIMIT_AS does not count it).
    code = RAN + UNGUARDED_OPEN + (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nuid, gid = os.getuid(), os.getgid()\n"
        "if libc.unshare(0x10000000 | 0x00020000) != 0:\n    print('unshare refused', ctypes.get_errno())\n"
        "else:\n"
        "    for name, text in (('setgroups', 'deny'), ('uid_map', '0 %d 1' % uid), ('gid_map', '0 %d 1' % gid)):\n"
        "        try:  # not needed for the mount: a new user namespace has every capability\n"
        "            with _io.open('/proc/self/' + name, 'w') as f:\n                f.write(text)\n"
        "        except OSError:\n            pass\n"
        "    if libc.mount(b'tmpfs', b'/tmp', b'tmpfs', 0, None) != 0:\n"
        "        print('mount refused', ctypes.get_errno())\n"
        "    else:\n        print('mounted an unsized tmpfs', flush=True)\n        stored = 0\n"
        "        with _io.open('/tmp/fill', 'wb') as f:\n"
        "            for _ in range(128):\n                f.write(b'x' * (1 << 20))\n                stored += 1\n"
        "        print('stored', stored, 'MB')\n")
    r = sb.run_untrusted(code, timeout_s=20.0, memory_mb=64, max_file_bytes=1 << 30)
    return _ran(r) and "mounted" not in r.stdout, f"budget 64 MB; {_out(r)}"


def _escape_storage_budget_split(sb) -> tuple[bool, str]:
    # Every writable place of the sandbox counts against one budget (memory_mb), not one budget each.
    code = RAN + UNGUARDED_OPEN + (
        "stored = 0\nfor d in ('/tmp', '/dev/shm', '/var/tmp'):\n    for i in range(40):\n        try:\n"
        "            with _io.open('%s/fill%s-%d' % (d, d.replace('/', '-'), i), 'wb') as f:\n                f.write(b'x' * (1 << 20))\n"
        "            stored += 1\n        except OSError:\n            break\nprint('stored', stored, 'MB')\n")
    r = sb.run_untrusted(code, timeout_s=20.0, memory_mb=64)
    return _ran_counting(r, "stored", at_most=64), f"budget 64 MB; {_out(r)}"


def _escape_fork_limit(sb) -> tuple[bool, str]:
    code = RAN + (
        "import posix, time\nforked = 0\nfor _ in range(60):\n    try:\n        pid = posix.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(20)\n        posix._exit(0)\n"
        "    forked += 1\nprint('forked', forked, flush=True)\n")
    r = sb.run_untrusted(code, timeout_s=10.0, max_procs=16)
    return _ran_counting(r, "forked", at_most=15), f"max_procs 16; {_out(r)}"


def _escape_sysv_shared_memory(sb) -> tuple[bool, str]:
    # System V shared memory outlives its mapping: attach, fill, detach, repeat. Neither RLIMIT_AS nor the
    # tmpfs counts it (the run's IPC namespace holds it until the run ends).
    code = RAN + (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.shmat.restype = ctypes.c_void_p\n"
        "libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]\nlibc.shmdt.argtypes = [ctypes.c_void_p]\n"
        "stored = 0\nfor _ in range(8):\n    sid = libc.shmget(0, ctypes.c_size_t(16 << 20), 0o600)\n"
        "    if sid < 0:\n        print('shmget refused', ctypes.get_errno())\n        break\n"
        "    addr = libc.shmat(sid, None, 0)\n    ctypes.memset(addr, 1, 16 << 20)\n    libc.shmdt(addr)\n"
        "    stored += 16\nprint('stored', stored, 'MB')\n"
        "for _ in range(64):\n    if libc.msgget(0, 0o600) < 0:\n        print('msgget refused', ctypes.get_errno())\n"
        "        break\nelse:\n    print('64 message queues (16 KiB each)')\n")
    r = sb.run_untrusted(code, timeout_s=20.0, memory_mb=64)
    return _ran_counting(r, "stored", at_most=0) and "msgget refused" in r.stdout, f"budget 64 MB; {_out(r)}"


def _escape_sysv_semaphores(sb) -> tuple[bool, str]:
    # A set of 32,000 semaphores is about 2 MB of kernel memory, and a namespace may hold 32,000 sets:
    # neither RLIMIT_AS nor the tmpfs counts them. Eight sets (16 MB) show it; the count is the kernel's
    # (the semaphores of the run's IPC namespace, /proc/sysvipc/sem), not the program's own.
    code = RAN + (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "for _ in range(8):\n    if libc.semget(0, 32000, 0o600) < 0:\n"
        "        print('semget refused', ctypes.get_errno())\n        break\n"
        "with open('/proc/sysvipc/sem') as f:\n    header = f.readline().split()\n"
        "    held = sum(int(line.split()[header.index('nsems')]) for line in f)\n"
        "print('semaphores', held, flush=True)\n")
    r = sb.run_untrusted(code, timeout_s=20.0, memory_mb=64)
    return _ran_counting(r, "semaphores", at_most=0), f"budget 64 MB; {_out(r)}"


def _escape_memory_files(sb) -> tuple[bool, str]:
    # A memfd is a file of the kernel's own tmpfs: RLIMIT_FSIZE (1 MiB) each, as many as descriptors
    # (RLIMIT_NOFILE) in every process, and neither RLIMIT_AS nor the run's tmpfs counts them (8 processes
    # of a 64 MB run held 440 MiB). 32 of them in this one process show it. memfd_secret, where the kernel
    # has it, the same way through a mapping: the file keeps its pages after munmap (fstat counts none).
    code = RAN + (
        "import ctypes, mmap, posix\nlibc = ctypes.CDLL(None, use_errno=True)\nfds = []\n"
        "for _ in range(32):\n    try:\n        fd = posix.memfd_create('x')\n"
        "    except OSError as e:\n        print('memfd_create refused', e)\n        break\n"
        "    posix.write(fd, b'x' * (1 << 20))\n    fds.append(fd)\n"
        "for _ in range(%d):\n    fd = libc.syscall(%r, 0)\n"
        "    if fd < 0:\n        print('memfd_secret refused', ctypes.get_errno())\n        break\n"
        "    try:\n        posix.ftruncate(fd, 1 << 20)\n        with mmap.mmap(fd, 1 << 20) as m:\n"
        "            m.write(b'x' * (1 << 20))\n    except (OSError, ValueError) as e:\n"
        "        print('memfd_secret not filled', e)\n    fds.append(fd)\n"
        "print('memfds', len(fds), 'holding', sum(posix.fstat(fd).st_blocks for fd in fds) >> 11, 'MiB', flush=True)\n"
        % (8 if _MEMFD_SECRET else 0, _MEMFD_SECRET))
    r = sb.run_untrusted(code, timeout_s=20.0, memory_mb=64)
    return _ran_counting(r, "memfds", at_most=0), f"budget 64 MB; {_out(r)}"


def _escape_tmpfs_inodes(sb) -> tuple[bool, str]:
    # Empty files cost the tmpfs no blocks, but each holds about 1 KiB of kernel memory (inode and dentry,
    # measured): the file count must be bounded with the size, or a run stores gigabytes in metadata.
    code = RAN + (
        "import posix\ncreated = 0\ntry:\n    for i in range(100000):\n"
        "        posix.close(posix.open('f%d' % i, posix.O_CREAT | posix.O_WRONLY, 0o600))\n        created += 1\n"
        "except OSError as e:\n    print(e)\nprint('created', created, flush=True)\n")
    r = sb.run_untrusted(code, timeout_s=20.0, memory_mb=32)
    contained = _ran_counting(r, "created", at_most=32 << 10)
    return contained, f"budget 32 MB (at most 32768 inodes of about 1 KiB); {_out(r)}"




def _escape_read_caller_keyring(sb) -> tuple[bool, str]:
    # A secret in the caller's session keyring (a Kerberos ticket, a token): the sandboxed processes
    # inherit the session keyring and possess its keys, whatever their uid.
    import ctypes
    numbers = _KEY_SYSCALLS.get(os.uname().machine)
    if numbers is None:
        return False, f"no keyring system call numbers for {os.uname().machine}"
    add_key, keyctl = numbers
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    secret = ("megapmp-keyring-" + secrets.token_hex(8)).encode()
    name = ("mpx-" + secrets.token_hex(4)).encode()
    # A fresh session keyring of this process's own (the real one is left alone), holding the secret.
    if libc.syscall(keyctl, 1, None) < 0:  # KEYCTL_JOIN_SESSION_KEYRING
        return True, f"no kernel keyrings for the caller here (errno {ctypes.get_errno()}): nothing to read"
    key = libc.syscall(add_key, b"user", name, secret, ctypes.c_size_t(len(secret)), ctypes.c_int(-3))
    if key < 0:
        return True, f"the caller cannot add a key here (errno {ctypes.get_errno()}): nothing to read"
    code = RAN + (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.syscall.restype = ctypes.c_long\n"
        "key = libc.syscall(%d, 10, ctypes.c_int(-3), b'user', %r, 0)  # KEYCTL_SEARCH the session keyring\n"
        "print('search', key, ctypes.get_errno())\nbuf = ctypes.create_string_buffer(256)\n"
        "n = libc.syscall(%d, 11, ctypes.c_long(key), buf, 256)  # KEYCTL_READ\n"
        "print('read', n, ctypes.get_errno(), buf.raw[:max(n, 0)])\n" % (keyctl, name, keyctl))
    try:
        r = sb.run_untrusted(code, timeout_s=10.0)
    finally:
        libc.syscall(keyctl, 3, ctypes.c_long(key))  # KEYCTL_REVOKE
    leaked = _printed(r, secret.decode())
    return _ran(r) and not leaked, f"secret read: {leaked}; {_out(r)}"


def _status_cpu_limit(ignore_sigxcpu: bool):
    def attack(sb) -> tuple[bool, str]:
        code = RAN + ("import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\n" if ignore_sigxcpu else "")
        r = sb.run_untrusted(code + "while True:\n    pass\n", timeout_s=20.0, cpu_s=1)
        return _ran(r) and r.status == "timeout" and r.seconds < 10, _out(r)
    return attack


def _status_claimed_setup_failure(sb) -> tuple[bool, str]:
    # The bootstrap's failure ("error": the sandbox could not run it, so code-bon retries it and verified
    # pairs drop it as the sandbox's fault) was told by exit status 94 and a line on stderr, both of which
    # a program can produce: a wrong solution that claims it must still be "failed", as a program or as a
    # solution, while loading and during a call. Before it claims it, it drains every pipe it can open
    # through /proc (a pipe's descriptor opened for reading there reads the pipe), where the bootstrap's
    # word that the set-up was complete could be taken back if any process of the run still held it.
    claim = ("import os, posix, sys\nfor pid in os.listdir('/proc'):\n    try:\n"
             "        fds = os.listdir('/proc/%s/fd' % pid) if pid.isdigit() else []\n"
             "    except OSError:\n        continue\n    for fd in fds:\n        try:\n"
             "            r = posix.open('/proc/%s/fd/%s' % (pid, fd), posix.O_RDONLY | posix.O_NONBLOCK)\n"
             "            if posix.fstat(r).st_mode & 0o170000 == 0o010000:  # a pipe\n"
             "                sys.stderr.write('drained %s/%s %r\\n' % (pid, fd, posix.read(r, 1 << 16)))\n"
             "        except OSError:\n            pass\n"
             "sys.stderr.write('sandbox setup failed:\\n')\nsys.stderr.flush()\nos._exit(94)\n")
    runs = [sb.run_untrusted(RAN + claim, timeout_s=10.0),
            sb.run_tests(claim + WRONG, TEST, "add", timeout_s=10.0),
            sb.run_tests("def add(a, b):\n" + textwrap.indent(claim, "    "), TEST, "add", timeout_s=10.0)]
    statuses = [r.status for r in runs]
    # Its own stdout is one of the pipes it drains: on a loaded box it can read its "ran" back before the
    # runner does. The claim's last line, written after the draining, is what shows it ran.
    ran = _ran(runs[0]) or runs[0].stderr.endswith("sandbox setup failed:\n")
    return ran and statuses == ["failed"] * 3, f"{statuses}; " + "; ".join(_out(r) for r in runs)


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
    # The solution's own object answers ==: equal to anything.
    "forge_always_equal_object": (
        "class A:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
        "def add(a, b):\n    return A()\n", TEST),
    "forge_always_equal_int_subclass": (
        "class A(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return A(0)\n", TEST),
    # Walk up the call stack to the harness, take every hex string its frames hold (the per-run secret
    # of a harness that runs in the solution's process), write them everywhere, leave with status 0.
    "forge_frame_walk_secret": (
        "import os, posix, re, sys\n"
        "def add(a, b):\n"
        "    found, f = set(), sys._getframe()\n"
        "    while f is not None:\n"
        "        found.update(v for v in f.f_locals.values() if isinstance(v, str) and re.fullmatch('[0-9a-f]{16,64}', v))\n"
        "        f = f.f_back\n"
        "    for n in found:\n"
        "        for fd in range(3, 64):\n"
        "            try:\n                posix.write(fd, n.encode())\n            except OSError:\n                pass\n"
        "    os._exit(0)\n", TEST),
    # Garbage and forged frames on every descriptor, then a wrong answer.
    "forge_garbage_on_descriptors": (
        "import posix\ndef add(a, b):\n"
        "    for fd in range(3, 64):\n"
        "        for data in (b'\\x00\\x00\\x00\\x03T', b'\\xff\\xff\\xff\\xff', b'{\"passed\": true}\\n'):\n"
        "            try:\n                posix.write(fd, data)\n            except OSError:\n                pass\n"
        "    return a - b\n", TEST),
    # StopIteration raised by the solution would silently end a test's map(): all(map(...)) of nothing is True.
    "forge_stop_iteration_in_map": (
        "def add(a, b):\n    raise StopIteration\n",
        "def check(candidate):\n    assert all(map(lambda c: candidate(*c[0]) == c[1], [((1, 2), 3), ((-1, 1), 0)]))\n"),
    # Raw frames written ahead of the real ones: a forged look-up answer that claims the builtin `abs` is the
    # solution's, then answers for the calls the (public) test will make.
    "forge_injected_builtin_via_raw_frames": (
        "import posix, struct\n"
        "def enc(v):\n"
        "    if isinstance(v, str):\n        b = v.encode()\n        return b's' + struct.pack('<I', len(b)) + b\n"
        "    if isinstance(v, int):\n        b = v.to_bytes(8, 'little', signed=True)\n"
        "        return b'i' + struct.pack('<I', 8) + b\n"
        "    if isinstance(v, tuple):\n        return b't' + struct.pack('<I', len(v)) + b''.join(map(enc, v))\n"
        "    if isinstance(v, dict):\n"
        "        return b'd' + struct.pack('<I', len(v)) + b''.join(enc(k) + enc(x) for k, x in v.items())\n"
        "frames = [('ready',), ('names', {'abs': ('callable',), 'add': ('callable',)}), ('ok', 5), ('ok', 0)]\n"
        "data = b''.join(struct.pack('>I', len(enc(f))) + enc(f) for f in frames)\n"
        "for fd in range(3, 64):\n    try:\n        posix.write(fd, data)\n    except OSError:\n        pass\n"
        + WRONG,
        "def check(candidate):\n    assert abs(candidate(1, 2) - 3) < 1e-9\n"),
}


def _forgery(solution: str, test: str):
    def attack(sb) -> tuple[bool, str]:
        r = sb.run_tests(solution, test, "add", timeout_s=10.0)
        return r.status != "passed", f"{r.status}; {_out(r)}"
    return attack


def _forge_doctest_records(sb) -> tuple[bool, str]:
    # A snippet whose doctest example writes look-alike outcome records and verdicts to every descriptor
    # and prints the expected output of the next, failing, example: only the judge's outcomes count.
    if not hasattr(sb, "run_doctests"):
        return False, "no judged doctests (outcomes are reported from the snippet's own process)"
    src = ('def add(a, b):\n    """\n    >>> forge()\n    >>> add(1, 2)\n    3\n    """\n    return a - b\n\n'
           'def forge():\n    import posix\n'
           '    for fd in range(1, 64):\n'
           '        for rec in (b\'{"test": "add", "index": 1, "ok": true, "got": "3"}\\n\', b\'{"passed": true}\\n\'):\n'
           '            try:\n                posix.write(fd, rec)\n            except OSError:\n                pass\n')
    run = sb.run_doctests(src, timeout_s=10.0)
    ok = run.outcomes.get(("add", 1), (None,))[0]  # None: no outcome reported, i.e. not passed
    return ok is not True, f"add[1] reported ok={ok}; {_out(run.result)}"


# Correct programs that import unittest and doctest: the common shape (the issue's), and one that runs
# its own doctests at the top level and defines a TestCase.
UNITTEST_PROGRAM = (
    "import unittest\n\n\ndef add(a, b):\n    \"\"\"\n    >>> add(1, 2)\n    3\n    \"\"\"\n    return a + b\n\n\n"
    "if __name__ == '__main__':\n    import doctest\n    doctest.testmod()\n")
DOCTEST_PROGRAM = (
    "import doctest\nimport unittest\n\n\ndef add(a, b):\n    \"\"\"\n    >>> add(1, 2)\n    3\n    \"\"\"\n"
    "    return a + b\n\n\nclass TestAdd(unittest.TestCase):\n    def test_add(self):\n"
    "        self.assertEqual(add(1, 2), 3)\n\n\ndoctest.testmod()\n"
    "if __name__ == '__main__':\n    doctest.testmod()\n    unittest.main()\n")


# Every call of a run reaches the same process: state kept between calls is the solution's own.
STATEFUL_SOLUTION = "total = 0\ndef add(a, b):\n    global total\n    total += a + b\n    return total\n"
STATEFUL_TEST = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(1, 2) == 6\n"


def _control_program(program: str, test: str = TEST):
    def attack(sb) -> tuple[bool, str]:
        r = sb.run_tests(program, test, "add", timeout_s=10.0)
        return r.status == "passed", f"{r.status}; {_out(r)}"
    return attack


def _ran(r) -> bool:
    return r.stdout.startswith("ran\n")


def _printed(r, secret: str) -> bool:
    return secret in r.stdout or secret in r.stderr


def _ran_counting(r, word: str, at_most: int) -> bool:
    """The program ran and reached its first "WORD N" line, with N <= at_most."""
    counts = [int(w) for line in r.stdout.splitlines() if line.startswith(word) for w in line.split()[1:2]]
    return _ran(r) and bool(counts) and counts[0] <= at_most


def _out(r) -> str:
    return f"status {r.status}, stdout {r.stdout[-300:]!r}, stderr {r.stderr[-300:]!r}"


ATTACKS = {
    "escape_write_caller_cwd": _escape_cwd,
    "escape_write_tmp_and_dev_shm": _escape_shared_tmp,
    "escape_read_parent_environ": _escape_parent_environ,
    "escape_setsid_grandchild_survives": _escape_setsid_grandchild,
    "escape_outlive_killed_caller": _escape_outlive_killed_caller,
    "escape_connect_loopback_via__socket": _escape_loopback,
    "escape_connect_host_unix_socket": _escape_host_unix_socket,
    "escape_read_caller_private_file": _escape_read_caller_private_file,
    "escape_nested_userns_tmpfs": _escape_nested_userns_tmpfs,
    "escape_storage_budget_split_over_tmpfs": _escape_storage_budget_split,
    "escape_fork_limit": _escape_fork_limit,
    "escape_sysv_shared_memory": _escape_sysv_shared_memory,
    "escape_sysv_semaphores": _escape_sysv_semaphores,
    "escape_memory_files": _escape_memory_files,
    "escape_tmpfs_inodes": _escape_tmpfs_inodes,
    "escape_read_caller_keyring": _escape_read_caller_keyring,
    "status_cpu_limit_is_timeout": _status_cpu_limit(ignore_sigxcpu=False),
    "status_cpu_limit_ignoring_sigxcpu_is_timeout": _status_cpu_limit(ignore_sigxcpu=True),
    "status_claimed_setup_failure_is_failed": _status_claimed_setup_failure,
    **{name: _forgery(*args) for name, args in FORGERIES.items()},
    "forge_doctest_records": _forge_doctest_records,
    "control_correct_solution_passes": _control_program("def add(a, b):\n    print('noise')\n    return a + b\n"),
    "control_imports_unittest_and_doctest": _control_program(UNITTEST_PROGRAM),
    "control_runs_its_own_doctests_and_has_a_testcase": _control_program(DOCTEST_PROGRAM),
    "control_stateful_solution": _control_program(STATEFUL_SOLUTION, STATEFUL_TEST),
}


# The promise (runner.GUARANTEES) each escape tests: where the OS here cannot give it, the sandbox says so
# at start, and the test reports the escape as not promised instead of contained.
NEEDS = {
    "escape_connect_host_unix_socket": "minimal_root",
    "escape_read_caller_private_file": "minimal_root",
    "escape_nested_userns_tmpfs": "no_nested_userns",
    "escape_storage_budget_split_over_tmpfs": "storage_budget",
    "escape_fork_limit": "process_limit",
    "escape_sysv_shared_memory": "storage_budget",
    "escape_sysv_semaphores": "storage_budget",
    "escape_memory_files": "storage_budget",
    "escape_tmpfs_inodes": "storage_budget",
    "escape_read_caller_keyring": "no_caller_keyrings",
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
    """argv: the directory holding runner.py and inside.py (megapmp/sandbox/), the backend to force (bwrap,
    unshare, or "auto"), and the scratch directory (module docstring)."""
    global SCRATCH
    if not os.environ.get("OPENAI_API_KEY", "").startswith("sk-megapmp-"):
        # Plant the secret in the initial environment, where /proc/<pid>/environ reads it: start again.
        env = dict(os.environ, OPENAI_API_KEY="sk-megapmp-" + secrets.token_hex(12))
        os.execve(sys.executable, sys.orig_argv, env)
    sys.path.insert(0, argv[0])
    SCRATCH = argv[2] if len(argv) > 2 else tempfile.mkdtemp(prefix="megapmp-attack-scratch-", dir=os.path.expanduser("~"))
    import ctypes

    import runner as sandbox  # the copy in argv[0]

    # A user's own processes are dumpable (readable through /proc by the same uid); one that switched
    # uid from root, like this runner under setpriv, is not until it says so. Be the ordinary case.
    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
    caps = sandbox.sandbox_capabilities()
    if len(argv) > 1 and argv[1] != "auto":
        backend = argv[1]
        probe = sandbox._probe(dict(caps, backend=backend)) if caps.get(backend) else "not installed"
        problem, guarantees = probe if isinstance(probe, tuple) else (probe, {})
        if problem is not None:
            print(json.dumps({"_unavailable": f"{backend}: {problem}"}))
            return 0
        sandbox._caps = dict(caps, backend=backend, guarantees=guarantees,
                             nproc=guarantees.get("process_limit", caps.get("nproc")),
                             missing=sorted(k for k, held in guarantees.items() if not held))
    out = run_all(sandbox)
    out["_backend"] = sandbox.sandbox_capabilities().get("backend")
    out["_missing"] = sandbox.sandbox_capabilities().get("missing", [])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
