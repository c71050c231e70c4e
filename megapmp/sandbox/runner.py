"""Run untrusted (generated) Python code in separate processes inside operating-system isolation.

Generated code is never executed inside the calling process. `run_untrusted` runs a program;
`run_tests` and `run_doctests` judge a solution. Each sandboxed process is ``python -I -S`` (isolated
mode, no ``site``) started inside fresh Linux namespaces; `inside.py` is the trusted code that sets the
process up before any untrusted code runs (its docstring lists the steps). The promises, for root and
unprivileged callers alike, with either backend:

1. **Namespaces** (user, mount, PID, network, IPC, UTS), made by one of two backends, chosen once per
   process by probing (`sandbox_capabilities`), in this order: ``bwrap`` (bubblewrap, Debian package
   ``bubblewrap``), then util-linux ``unshare`` (``--user --map-root-user`` for unprivileged callers), whose
   root `inside.build_root` builds the way bubblewrap does.
2. **Only what a Python program needs is visible**, read-only: ``/usr``, the ``/lib`` directories, the
   interpreter's installation (``sys.base_prefix``), the dynamic loader's cache and ``/etc/localtime``; a
   ``/dev`` of null, zero, full, random and urandom; a ``/proc`` of the sandbox's own processes. Not ``/``:
   no socket of the host, no file of the caller's home or working directory, no ``/etc/passwd``.
3. **One memory budget for storage**: one tmpfs of ``memory_mb`` at ``/tmp`` (the working directory,
   ``HOME`` and ``TMPDIR``; ``/dev/shm`` and ``/var/tmp`` link to it), the only writable place, with at
   most one file per 16 KiB of it (`_tmpfs_inodes`: an empty file costs no block but about 1 KiB of
   kernel memory; unbounded, 3 million files were allowed). No nested user namespace (a seccomp filter,
   and bubblewrap's ``--disable-userns`` where it applies), so no process of the run can mount an unsized
   tmpfs of its own; no System V shared memory, semaphores or message queues and no memory files
   (``memfd_create``, ``memfd_secret``), by the same filter: they hold memory that neither RLIMIT_AS nor
   the tmpfs counts.
4. **Limits**: ``RLIMIT_AS`` (memory per process), ``RLIMIT_CPU``, ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``,
   ``RLIMIT_CORE`` = 0 and ``RLIMIT_NPROC`` = ``max_procs`` for the whole run: a root caller's processes run
   as a per-run uid, an unprivileged caller's in the run's own user namespace, where the kernel counts a
   uid's processes apart from the caller's (Linux >= 5.14). A CPU-limit kill is a ``timeout`` on both
   backends, also for a program that ignores SIGXCPU.
5. **No network** (a down loopback only), **no privileges** (``no_new_privs``; no capabilities), a scrubbed
   environment (``PATH``, ``HOME``, ``TMPDIR``, ``LANG``), **no kernel keyrings** (the seccomp filter: a
   process inherits its caller's session keyring, and possesses its keys whatever its uid), and every
   process of the run killed at its end (the PID namespace goes with its first process), or when the
   caller dies, even by SIGKILL (a lifeline pipe, `inside.supervise`).
6. **In-process guards** (a second layer, against accidents, not a boundary): sockets, writes outside the
   working directory, ``exec``/``subprocess`` and signals outside the sandbox raise ``SandboxViolation``;
   ``os.fork`` draws from a budget of ``max_procs``.

Where the OS cannot give one of 2-5 (an old kernel, no seccomp), `sandbox_capabilities` lists it under
``missing`` and the first use logs it. Where neither backend works at all, every run raises
`SandboxUnavailable` unless the caller passes ``unsafe_no_sandbox=True`` (the CLIs' ``--unsafe-no-sandbox``):
then only 4-6 hold, in a process group and temporary directory of its own (and, for root, a per-run uid).

**The verdict of a test run comes from a process the solution cannot reach.** `run_tests` starts two
sandboxes: the *candidate* (the solution, loaded as a module) and the *judge* (the problem's test code,
trusted). Every call the tests make crosses a private pipe to the candidate, and the answer comes back as
plain data -- None, bool, int, float, complex, str, bytes and lists, tuples, dicts, sets of them -- rebuilt
in the judge by a strict, bounded decoder (`inside.decode`; no pickle). So no object of the solution's ever
answers ``==`` in a test, and there is no secret in the solution's process to steal: the judge alone holds
the descriptor the verdict is written to. A result that is not plain data (an object with its own
``__eq__``, a generator), an exit, a crash, a broken message are failures with a reason; a test that
catches them still fails. The solution's printing goes to stdout, never onto the channel. Calls keep their
state: one candidate process serves every call of a run. Names the tests use that they do not define
(HumanEval/33 calls ``sort_third`` by name, MBPP-style tests call the function directly) are looked up in
the solution: functions become proxies, plain values are copied, modules are imported again on the
judge's side; builtins are never the solution's. With ``prompt=`` the problem's prompt runs in the judge,
so helpers like HumanEval/32's ``poly`` are the problem's, not a solution's redefinition. An exception the
solution raises reaches the tests as the builtin of the same name (``except ValueError`` works), anything
else as ``SolutionError``, and never as StopIteration (it would silently end a test's ``map``). What cannot
be judged this way: a test that needs an object of the solution's (an instance of its class, a generator):
only plain data crosses.

Statuses: ``passed`` (exit 0; for `run_tests` the judge's verdict), ``failed`` (non-zero exit: exception,
failed assertion, refused operation, early exit), ``timeout`` (wall-clock limit or ``RLIMIT_CPU``),
``memory`` (``MemoryError`` under ``RLIMIT_AS``), ``killed`` (another signal, e.g. the OOM killer) and
``error`` (the sandbox itself could not run the program: said by the bootstrap on a pipe of its own before the
program starts, never by the program's exit status or output).
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

try:
    from . import inside
except ImportError:  # this file copied on its own beside inside.py (tests/sandbox_attacks.py)
    import inside

__all__ = ["SandboxResult", "SandboxUnavailable", "DoctestRun", "run_untrusted", "run_tests", "run_doctests",
           "sandbox_capabilities", "require_sandbox", "humaneval_program", "doctest_plan", "Status"]

log = logging.getLogger(__name__)

Status = str  # "passed" | "failed" | "timeout" | "memory" | "killed" | "error"

PROGRAM_NAME = "prog.py"
SANDBOX_DIR = "/tmp"  # the working directory inside the namespaces: the one private tmpfs
DEVICES = ("null", "zero", "full", "random", "urandom")
_TAIL_BYTES = 4096  # kept from the end of a truncated stream, so the last lines are never lost
_UID_BASE = 1_000_000_000  # sandbox uids: _UID_BASE + pid * _UID_SLOTS + slot, unique per live run
_UID_SLOTS = 256
_PID_LIMIT = 1 << 22  # the kernel's largest pid_max: every live caller's pid has its own slots, below 2**31
_NESTED_UID = 65534  # an unprivileged caller's program appears as this uid ("nobody") in its namespace
_INSIDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "inside.py")
# Reads the set-up from a descriptor (8-byte length, the settings and program as JSON, then inside.py
# compiled once by the caller: the same interpreter binary runs both sides), closes it, hands over.
_LOADER = ("import os, sys, json, marshal\n"
           "with os.fdopen(int(sys.argv[1]), 'rb') as f:\n"
           "    setup = json.loads(f.read(int.from_bytes(f.read(8), 'little')))\n"
           "    code = marshal.loads(f.read())\n"
           "g = {'__name__': 'megapmp_sandbox_inside'}\n"
           "exec(code, g)\n"
           "del f, code, sys.argv[1:]\n"
           "g['main'](setup)\n")
_inside_code_lock = threading.Lock()
_inside_code: bytes | None = None


def _compiled_inside() -> bytes:
    global _inside_code
    with _inside_code_lock:
        if _inside_code is None:
            import marshal
            with open(_INSIDE, encoding="utf-8") as f:
                _inside_code = marshal.dumps(compile(f.read(), "<megapmp-sandbox>", "exec"))
        return _inside_code


class SandboxUnavailable(RuntimeError):
    """No OS isolation works here and the caller did not allow running without it."""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run. stdout/stderr are decoded (UTF-8, replacement) and truncated to
    `max_output_bytes` each, keeping the head and the last 4 KiB with a marker in between. `run_id`
    appears in the command line of every process of the run (tests use it to look for survivors).
    For `run_tests`, stdout and stderr are the solution's followed by the tests'."""

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolation: tuple[str, ...] = field(default=())
    run_id: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# --------------------------------------------------------------------------------------------------
# The visible file system
# --------------------------------------------------------------------------------------------------

_layout_lock = threading.Lock()
_layout: dict | None = None


def _root_layout() -> dict:
    """What a sandboxed Python sees besides /tmp, /proc and /dev: read-only binds (host path, path
    inside) and symbolic links (target, path), the same for both backends."""
    global _layout
    with _layout_lock:
        if _layout is not None:
            return _layout
        binds, links = [("/usr", "/usr")], []
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                links.append((os.readlink(top), top))
            elif os.path.isdir(top):
                binds.append((top, top))
        interpreter = os.path.realpath(sys.executable)
        for prefix in dict.fromkeys([os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix),
                                     os.path.dirname(os.path.dirname(interpreter))]):
            if prefix != "/" and not any(prefix == d or prefix.startswith(d + "/") for d, _ in binds):
                binds.append((prefix, prefix))
        for name in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime"):
            if os.path.exists(name):
                binds.append((os.path.realpath(name), name))
        links += [("/proc/self/fd", "/dev/fd"), ("/proc/self/fd/0", "/dev/stdin"), ("/proc/self/fd/1", "/dev/stdout"),
                  ("/proc/self/fd/2", "/dev/stderr"), (SANDBOX_DIR, "/dev/shm"), (SANDBOX_DIR, "/var/tmp")]
        _layout = {"binds": binds, "symlinks": links, "devices": list(DEVICES)}
        return _layout


def _visible_top_level() -> set[str]:
    layout = _root_layout()
    paths = [dest for _, dest in layout["binds"]] + [link for _, link in layout["symlinks"]]
    return {p.split("/")[1] for p in paths} | {"dev", "proc", "tmp"}


# --------------------------------------------------------------------------------------------------
# Backends: probed once per process
# --------------------------------------------------------------------------------------------------

_caps_lock = threading.Lock()
_caps: dict | None = None
_uid_lock = threading.Lock()
_uid_next = 0
_uids_in_use: set[int] = set()
_RLIMITS = ["RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE", "RLIMIT_NPROC"]
_PROBE_PROCS = 4
_PROBE_MB = 256
_REFUSED = inside._REFUSED_SYSCALLS.get(os.uname().machine, {})
_KEYCTL, _MEMFD_SECRET = _REFUSED.get("keyctl"), _REFUSED.get("memfd_secret")
# The probe measures what the kernel gives (no guards): a private working directory, a small PID, no
# user namespace, no System V storage or memory files, no keyring, a process limit, and what the root
# directory holds.
_PROBE = f"""
import ctypes, json, os, time
open('probe', 'w').write('x')
facts = {{"cwd": os.getcwd(), "listing": sorted(os.listdir('.')), "pid": os.getpid(), "root": sorted(os.listdir('/'))}}
libc = ctypes.CDLL(None, use_errno=True)
facts["userns"] = libc.unshare(0x10000000) == 0
facts["inodes"] = os.statvfs('.').f_files
facts["sysv_ipc"] = libc.shmget(0, 4096, 0o600) >= 0 or libc.msgget(0, 0o600) >= 0 or libc.semget(0, 1, 0o600) >= 0
try:
    os.memfd_create('probe')
    facts["memfd"] = True
except OSError:
    facts["memfd"] = {_MEMFD_SECRET} is None or libc.syscall({_MEMFD_SECRET}, 0) >= 0
# KEYCTL_GET_KEYRING_ID of the session keyring (the caller's, inherited), without creating one
facts["keyring"] = {_KEYCTL} is None or libc.syscall({_KEYCTL}, 0, -3, 0) >= 0
forked = 0
for _ in range({2 * _PROBE_PROCS}):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    forked += 1
facts["forked"] = forked
print(json.dumps(facts))
"""
# Promises 2-5 of the module docstring, by name: checked by the probe, reported when missing.
GUARANTEES = {
    "minimal_root": "only the paths a Python program needs are visible",
    "no_nested_userns": "no nested user namespaces (no mounts of the program's own)",
    "process_limit": "a process limit (RLIMIT_NPROC) for the run's processes",
    "storage_budget": ("one sized tmpfs for everything a program can write (no System V shared memory, "
                       "semaphores or queues, no memory files)"),
    "no_caller_keyrings": "no access to the caller's kernel keyrings",
}


def _tmpfs_inodes(tmpfs_bytes: int) -> int:
    """The file count of a sandbox's tmpfs: each file (an empty one too, which costs no block) holds about
    1 KiB of kernel memory that the size does not count, so at most 1/16 of the budget goes to files."""
    return max(4096, tmpfs_bytes >> 14)


def _bwrap_mounts_tmpfs(bwrap: str, root: bool) -> bool:
    """Whether the bootstrap may be given CAP_SYS_ADMIN to mount the run's tmpfs itself (bubblewrap sizes
    a tmpfs in bytes only): always as root; otherwise only with a bubblewrap that is not setuid (a setuid
    one refuses --cap-add to other users), and the probe then names the missing storage_budget."""
    return root or not os.stat(bwrap).st_mode & stat.S_ISUID


def _bwrap_prefix(bwrap: str, root: bool, tmpfs_bytes: int) -> list[str]:
    """bubblewrap: as root it creates the namespaces itself and keeps only what the bootstrap needs to
    become the per-run uid; otherwise in a user namespace of the caller's, with no capabilities left and
    no further user namespaces allowed. Either way the bootstrap also gets CAP_SYS_ADMIN over the
    sandbox's own mounts (`_bwrap_mounts_tmpfs`), to mount the tmpfs bounded in files, and drops it."""
    help_text = _bwrap_help(bwrap)
    layout = _root_layout()
    prefix = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
              "--die-with-parent", "--new-session"]
    if not root:
        prefix += ["--unshare-user"] + (["--disable-userns"] if "--disable-userns" in help_text else [])
    # Every directory the binds and links sit in, searchable by the program (bubblewrap makes them 0700).
    parents = {os.path.dirname(path) for path in [d for _, d in layout["binds"]] + [link for _, link in layout["symlinks"]]
               + ["/dev/" + name for name in layout["devices"]]}
    for directory in sorted({"/".join(p.split("/")[:i + 1]) for p in parents - {"/"}
                            for i in range(1, p.count("/") + 1)}):
        prefix += ["--perms", "0755", "--dir", directory]
    for src, dest in layout["binds"]:
        prefix += ["--ro-bind", src, dest]
    for name in layout["devices"]:
        prefix += ["--dev-bind", "/dev/" + name, "/dev/" + name]
    for target, link in layout["symlinks"]:
        prefix += ["--symlink", target, link]
    prefix += ["--proc", "/proc"]
    prefix += (["--size", str(tmpfs_bytes)] if "--size" in help_text else []) + ["--tmpfs", SANDBOX_DIR]
    prefix += ["--remount-ro", "/"]
    if root:
        prefix += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_CHOWN"]
    if _bwrap_mounts_tmpfs(bwrap, root):
        prefix += ["--cap-add", "CAP_SYS_ADMIN"]
    return prefix + ["--chdir", SANDBOX_DIR, "--"]


_bwrap_help_cache: dict[str, str] = {}


def _bwrap_help(bwrap: str) -> str:
    if bwrap not in _bwrap_help_cache:
        try:
            r = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10)
            _bwrap_help_cache[bwrap] = r.stdout + r.stderr
        except (OSError, subprocess.SubprocessError):
            _bwrap_help_cache[bwrap] = ""
    return _bwrap_help_cache[bwrap]


def _unshare_prefix(unshare: str, root: bool) -> list[str]:
    """util-linux unshare: new namespaces and a /proc of the new PID namespace (the one a new root's /proc
    may be mounted beside); the bootstrap does the rest. Root needs no user namespace."""
    user = [] if root else ["--user", "--map-root-user"]
    return [unshare, *user, "--mount", "--pid", "--net", "--ipc", "--uts", "--fork", "--kill-child",
            "--mount-proc", "--propagation", "private", "--"]


def _launch_plan(caps: dict, tmpfs_bytes: int) -> dict:
    """How one process starts under `caps`: argv prefix and the bootstrap's set-up steps."""
    root = os.geteuid() == 0
    backend = caps["backend"]
    layout = tmpfs = None
    if backend == "bwrap":
        prefix = _bwrap_prefix(caps["bwrap"], root, tmpfs_bytes)
        if _bwrap_mounts_tmpfs(caps["bwrap"], root):
            tmpfs = {"size_kb": max(1, tmpfs_bytes >> 10), "inodes": _tmpfs_inodes(tmpfs_bytes)}
    elif backend == "unshare":
        prefix = _unshare_prefix(caps["unshare"], root)
        layout = dict(_root_layout(), tmpfs_kb=max(1, tmpfs_bytes >> 10), tmpfs_inodes=_tmpfs_inodes(tmpfs_bytes))
    else:
        prefix = []
    return {"prefix": prefix, "root_layout": layout, "tmpfs": tmpfs,
            "drop_capabilities": backend == "unshare" and not root,
            "clear_capabilities": tmpfs is not None and not root,  # root's drop to the per-run uid clears them
            "sandbox_dir": SANDBOX_DIR if backend else None, "seccomp": bool(backend) and caps.get("seccomp", True)}


def sandbox_capabilities(refresh: bool = False) -> dict:
    """Which isolation is in effect here, probed once by running a tiny program through each backend:
    ``backend`` (``"bwrap"``, ``"unshare"`` or None: nothing works), ``bwrap``/``unshare`` (the binaries
    found), ``drop_uid`` (the program runs as a per-run uid: the caller is root), ``nproc`` (RLIMIT_NPROC
    holds for the run), ``rlimits``, ``guarantees`` (promise name -> held, see `GUARANTEES`), ``missing``
    (those the OS does not give here, logged once) and ``problems`` (why a backend was not taken)."""
    global _caps
    with _caps_lock:
        if _caps is not None and not refresh:
            return dict(_caps)
        root = os.geteuid() == 0
        base = {"backend": None, "bwrap": shutil.which("bwrap"), "unshare": shutil.which("unshare"),
                "drop_uid": root, "kill_binary": shutil.which("kill"), "seccomp": True, "problems": {}}
        caps = dict(base, guarantees={}, nproc=False)
        for backend in ("bwrap", "unshare"):
            if base[backend] is None:
                base["problems"][backend] = "not installed"
                continue
            trial = dict(base, backend=backend)
            problem, guarantees = _probe(trial)
            if problem is not None and "seccomp" in problem:  # a kernel without seccomp: do without it
                trial["seccomp"] = False
                problem, guarantees = _probe(trial)
            if problem is None:
                caps = dict(trial, guarantees=guarantees, nproc=guarantees["process_limit"])
                break
            base["problems"][backend] = problem
        caps["problems"] = dict(base["problems"])
        caps["rlimits"] = _RLIMITS if caps["nproc"] else _RLIMITS[:-1]
        caps["missing"] = sorted(k for k, held in caps["guarantees"].items() if not held)
        _caps = caps
        if caps["backend"]:
            log.info("sandbox: %s isolation (%s namespaces), %s, rlimits %s", caps["backend"],
                     "mount/pid/net/ipc/uts" if root else "user/mount/pid/net/ipc/uts",
                     "per-run uid" if caps["drop_uid"] else "no capabilities", ",".join(caps["rlimits"]))
            if caps["missing"]:
                log.warning("sandbox: the OS here does not give: %s",
                            "; ".join(GUARANTEES[k] for k in caps["missing"]))
        else:
            log.warning("sandbox: no OS isolation available (%s)", _problems_text(caps))
        return dict(caps)


def _probe(caps: dict) -> tuple[str | None, dict]:
    """(None, guarantees) if the backend runs a program as promised; else (why not, {})."""
    try:
        r = _run_one(_PROBE, caps=caps, timeout_s=10.0, memory_mb=_PROBE_MB, cpu_s=None, max_file_bytes=1 << 16,
                     max_procs=_PROBE_PROCS, max_open_files=64, max_output_bytes=4096, guards=False)
    except OSError as exc:
        return str(exc), {}
    try:
        facts = json.loads(r.stdout)
    except ValueError:
        lines = (r.stderr.strip() or r.stdout.strip() or r.status).splitlines()
        return f"probe {r.status}: {lines[-1][:200]}", {}
    if not (r.status == "passed" and facts["cwd"] == SANDBOX_DIR and facts["listing"] == ["probe", PROGRAM_NAME]
            and facts["pid"] < 5):
        return f"probe {r.status}: {r.stdout.strip()[:200]}", {}
    guarantees = {
        "minimal_root": set(facts["root"]) <= _visible_top_level(),
        "no_nested_userns": not facts["userns"],
        # An unprivileged caller's limit is the run's only from Linux 5.14 on (before, RLIMIT_NPROC counted
        # all the caller's processes: the forks the probe makes would fail for the wrong reason).
        "process_limit": 0 < facts["forked"] < _PROBE_PROCS and (caps["drop_uid"] or _kernel_at_least(5, 14)),
        "storage_budget": ((caps["backend"] == "unshare" or "--size" in _bwrap_help(caps["bwrap"]))
                           and facts["inodes"] <= _tmpfs_inodes(_PROBE_MB << 20) and not facts["sysv_ipc"]
                           and not facts["memfd"]),
        "no_caller_keyrings": not facts["keyring"],
    }
    return None, guarantees


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        version = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return version >= (major, minor)


def _problems_text(caps: dict) -> str:
    return "; ".join(f"{k}: {v}" for k, v in caps["problems"].items()) or "none tried"


def require_sandbox(unsafe_no_sandbox: bool = False) -> dict:
    """The capabilities, after checking that generated code may run: raises `SandboxUnavailable` (a
    one-line message) where no OS isolation works, unless `unsafe_no_sandbox`."""
    caps = sandbox_capabilities()
    if caps["backend"] is None and not unsafe_no_sandbox:
        raise SandboxUnavailable(
            "no OS isolation for generated code: neither bubblewrap (bwrap) nor unshare(1) with namespaces works "
            f"here ({_problems_text(caps)}); install bubblewrap or allow user namespaces, or pass "
            "--unsafe-no-sandbox to run it with in-process guards only")
    return caps


def _acquire_uid() -> int:
    global _uid_next
    with _uid_lock:
        for _ in range(_UID_SLOTS):
            uid = _UID_BASE + (os.getpid() % _PID_LIMIT) * _UID_SLOTS + _uid_next % _UID_SLOTS
            _uid_next += 1
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid
    raise RuntimeError(f"more than {_UID_SLOTS} concurrent sandbox processes in one process")


def _release_uid(uid: int) -> None:
    with _uid_lock:
        _uids_in_use.discard(uid)


def _kill_uid(uid: int, kill_binary: str) -> None:
    """Kill every process running as `uid` by signalling -1 *as* that uid (no /proc scan, no races
    with a fork loop: kill(-1) reaches all processes the sender may signal in one call). Only needed
    without a PID namespace (--unsafe-no-sandbox as root)."""
    if kill_binary is None:
        return
    try:
        subprocess.run([kill_binary, "-9", "-1"], user=uid, group=uid, extra_groups=[], env={},
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=10, cwd="/")
    except (OSError, subprocess.SubprocessError):
        pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _rmtree(path: str) -> None:
    def onerror(func, p, exc_info):
        try:
            os.chmod(p if os.path.isdir(p) else os.path.dirname(p), 0o700)
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=onerror)
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)


class _Capture:
    """Keep the first `limit` bytes and the last _TAIL_BYTES of a stream; count the rest."""

    def __init__(self, limit: int):
        self.limit, self.head, self.tail, self.total = limit, bytearray(), bytearray(), 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail = (self.tail + data)[-_TAIL_BYTES:]

    def raw(self) -> bytes:
        return bytes(self.head + self.tail)

    def text(self) -> str:
        if self.total <= len(self.head) + len(self.tail):
            raw = bytes(self.head + self.tail)
        else:
            skipped = self.total - len(self.head) - len(self.tail)
            raw = bytes(self.head) + f"\n...[{skipped} bytes truncated]...\n".encode() + bytes(self.tail)
        return raw.decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------------
# One sandboxed process
# --------------------------------------------------------------------------------------------------


@dataclass
class _Limits:
    timeout_s: float
    memory_mb: int = 512
    cpu_s: float | None = None
    max_file_bytes: int = 1 << 20
    max_procs: int = 32
    max_open_files: int = 64
    max_output_bytes: int = 1 << 16
    max_message_bytes: int = 1 << 24
    guards: bool = True

    def check(self) -> None:
        if self.timeout_s <= 0 or self.memory_mb <= 0 or self.max_procs <= 0 or self.max_message_bytes <= 0:
            raise ValueError(f"timeout_s, memory_mb, max_procs and max_message_bytes must be positive: "
                             f"{self.timeout_s}, {self.memory_mb}, {self.max_procs}, {self.max_message_bytes}")

    def rlimits(self, caps: dict) -> dict:
        limits = {"RLIMIT_AS": int(self.memory_mb) << 20,
                  "RLIMIT_CPU": int(math.ceil(self.cpu_s if self.cpu_s is not None else self.timeout_s + 1)),
                  "RLIMIT_FSIZE": int(self.max_file_bytes), "RLIMIT_NOFILE": int(self.max_open_files),
                  "RLIMIT_CORE": 0}
        # A per-run uid, or the run's own user namespace where the kernel counts the run's processes apart
        # (caps["nproc"]; the probe, which has no answer yet, sets it to measure).
        if caps["drop_uid"] or (caps["backend"] and caps.get("nproc", True)):
            limits["RLIMIT_NPROC"] = int(self.max_procs)
        return limits


class _Process:
    """One sandboxed Python process: started by __init__, read by `_watch`, cleaned up by `close`."""

    def __init__(self, role: str, text: str, *, caps: dict, limits: _Limits, run_id: str, extra_cfg: dict,
                 pass_fds: tuple[int, ...] = ()):
        self.caps, self.limits = caps, limits
        plan = _launch_plan(caps, int(limits.memory_mb) << 20)
        self.isolation = tuple([caps["backend"] or "unsafe_no_sandbox",
                                "process_group" if not caps["backend"] else "pidns", "rlimits"]
                               + (["drop_uid"] if caps["drop_uid"] else [])
                               + (["seccomp"] if plan["seccomp"] else [])
                               + (["guards"] if limits.guards else []))
        self.uid = _acquire_uid() if caps["drop_uid"] else None
        self.workdir = None if plan["sandbox_dir"] else tempfile.mkdtemp(prefix="megapmp-sandbox-")
        self.out, self.err = _Capture(limits.max_output_bytes), _Capture(limits.max_output_bytes)
        self.proc, self.error, self.exited_first, self.was_set_up = None, None, False, False
        # Only this process holds the write end: if it dies, even by SIGKILL, the sandbox sees end of file
        # and ends the run (inside.supervise). bubblewrap's --die-with-parent alone would not cover unshare.
        lifeline, self.lifeline = os.pipe()
        # The bootstrap writes one byte here when the set-up is complete, and closes its end before any of the
        # program's code runs: a program cannot take the byte back, so its exit status cannot claim that the
        # sandbox failed (EXIT_SETUP), however it exits and whatever it prints.
        self.set_up_pipe, set_up_w = os.pipe()
        if self.workdir is not None and self.uid is not None:
            os.chown(self.workdir, self.uid, self.uid)
        cfg = {"role": role, "program": PROGRAM_NAME, "uid": self.uid, "guards": limits.guards,
               "max_procs": int(limits.max_procs), "rlimits": limits.rlimits(caps),
               "root_layout": plan["root_layout"], "tmpfs": plan["tmpfs"],
               "drop_capabilities": plan["drop_capabilities"], "clear_capabilities": plan["clear_capabilities"],
               "nested_uid": _NESTED_UID, "sandbox_dir": plan["sandbox_dir"], "seccomp": plan["seccomp"],
               "max_message_bytes": int(limits.max_message_bytes), "lifeline_fd": lifeline,
               "set_up_fd": set_up_w, **extra_cfg}
        settings = json.dumps({"cfg": cfg, "program": text}).encode()
        payload = len(settings).to_bytes(8, "little") + settings + _compiled_inside()
        setup = os.memfd_create("megapmp-sandbox-setup") if hasattr(os, "memfd_create") else os.dup(
            tempfile.TemporaryFile().fileno())
        try:
            os.write(setup, payload)
            os.lseek(setup, 0, os.SEEK_SET)
            home = plan["sandbox_dir"] or self.workdir
            argv = plan["prefix"] + [os.path.realpath(sys.executable), "-I", "-S", "-B", "-c", _LOADER, str(setup),
                                     f"megapmp-sandbox-{run_id}"]
            env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
            self.proc = subprocess.Popen(argv, cwd=self.workdir or "/", env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                         close_fds=True, pass_fds=(setup, lifeline, set_up_w, *pass_fds))
        except OSError as exc:
            self.error = f"sandbox: could not start: {exc}"
        finally:
            os.close(setup)
            os.close(lifeline)
            os.close(set_up_w)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _kill_group(self.proc.pid)
        if self.uid is not None and not self.caps["backend"]:
            _kill_uid(self.uid, self.caps["kill_binary"])

    def returncode(self) -> int | None:
        rc = None if self.proc is None else self.proc.returncode
        # A signal's death is reported as exit status 128 + N, by bubblewrap and by inside.supervise.
        if rc is not None and 128 < rc < 128 + 65:
            return -(rc - 128)
        return rc

    def set_up(self) -> bool:
        """Whether the bootstrap said its set-up was complete (the byte is in the pipe before the program ran)."""
        if not self.was_set_up:
            os.set_blocking(self.set_up_pipe, False)
            try:
                self.was_set_up = os.read(self.set_up_pipe, 1) == b"1"
            except BlockingIOError:
                pass
        return self.was_set_up

    def status(self, timed_out: bool = False) -> Status:
        if self.error is not None:
            return "error"
        return _status(self.returncode(), timed_out, self.err.text(), self.set_up())

    def close(self) -> None:
        try:
            if self.proc is not None:
                if self.proc.poll() is None:
                    _kill_group(self.proc.pid)
                self.proc.wait()
                for stream in (self.proc.stdout, self.proc.stderr):
                    stream.close()
        finally:
            if self.uid is not None:
                if not self.caps["backend"]:
                    _kill_uid(self.uid, self.caps["kill_binary"])
                _release_uid(self.uid)
            if self.workdir is not None:
                _rmtree(self.workdir)
            os.close(self.lifeline)
            os.close(self.set_up_pipe)


def _watch(processes: list[_Process], primary: _Process, deadline: float, extra: dict[int, _Capture]) -> bool:
    """Read every process's stdout and stderr (and the `extra` descriptors) until the primary process is
    gone and the pipes are at end of file, or until the deadline (True: timed out). Once the primary exits,
    the others and whatever it left running are killed, so the pipes reach EOF."""
    sel = selectors.DefaultSelector()
    for p in processes:
        if p.proc is not None:
            sel.register(p.proc.stdout, selectors.EVENT_READ, p.out)
            sel.register(p.proc.stderr, selectors.EVENT_READ, p.err)
    for fd, capture in extra.items():
        sel.register(fd, selectors.EVENT_READ, capture)
    timed_out, exited_at = False, None
    try:
        while sel.get_map():
            now = time.monotonic()
            for p in processes:
                if p.proc is not None and p.proc.poll() is not None and exited_at is None and p is not primary:
                    p.exited_first = True
            if exited_at is None and (primary.proc is None or primary.proc.poll() is not None):
                exited_at = now
                for p in processes:
                    p.kill()
            if exited_at is not None and now - exited_at > 2.0:
                break  # a descendant we could not kill still holds a pipe: stop reading
            if exited_at is None and now >= deadline:
                timed_out = True
                break
            wait = 0.05 if exited_at is not None else min(deadline - now, 0.05)
            for key, _ in sel.select(max(wait, 0.0)):
                fd = key.fileobj if isinstance(key.fileobj, int) else key.fileobj.fileno()
                data = os.read(fd, 65536)
                if data:
                    key.data.add(data)
                else:
                    sel.unregister(key.fileobj)
    finally:
        sel.close()
        for p in processes:
            p.kill()
            if p.proc is not None:
                p.proc.wait()
    return timed_out


def _status(rc: int | None, timed_out: bool, stderr: str, set_up: bool) -> Status:
    if timed_out:
        return "timeout"
    if rc == 0:
        return "passed"
    if rc == inside.EXIT_MEMORY and inside.MEMORY_MARKER in stderr:
        return "memory"
    if rc == inside.EXIT_CPU and inside.CPU_MARKER in stderr:
        return "timeout"
    if rc == inside.EXIT_SETUP and not set_up and "sandbox setup failed" in stderr:
        return "error"  # the bootstrap's own failure: after the set-up, exit status 94 is the program's
    if rc is not None and rc < 0:
        if -rc == signal.SIGXCPU:
            return "timeout"
        return "killed"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if last.startswith("MemoryError"):
        return "memory"
    return "failed"


# --------------------------------------------------------------------------------------------------
# Running a program
# --------------------------------------------------------------------------------------------------


def run_untrusted(code: str, *, timeout_s: float = 5.0, memory_mb: int = 512, cpu_s: float | None = None,
                  max_file_bytes: int = 1 << 20, max_procs: int = 32, max_open_files: int = 64,
                  max_output_bytes: int = 1 << 16, guards: bool = True,
                  unsafe_no_sandbox: bool = False) -> SandboxResult:
    """Run `code` as ``__main__`` in a fresh sandboxed Python process and wait for it.

    timeout_s: wall-clock limit; the launcher is killed when it passes, and the PID namespace with it.
        cpu_s: RLIMIT_CPU, default ceil(timeout_s) + 1.
    memory_mb: RLIMIT_AS of each process, and the size of the private /tmp. max_file_bytes: RLIMIT_FSIZE.
    max_procs: RLIMIT_NPROC for the run's processes (the sandbox's own init and supervisor count), and the
        in-process fork budget. max_open_files: RLIMIT_NOFILE. max_output_bytes: kept of stdout and of stderr each.
    guards: install the in-process guards; only tests of the OS-level isolation turn them off.
    unsafe_no_sandbox: where no OS isolation works, run anyway (guards and rlimits only) instead of
        raising `SandboxUnavailable`. Where isolation works it is used regardless.
    """
    limits = _Limits(timeout_s, memory_mb, cpu_s, max_file_bytes, max_procs, max_open_files, max_output_bytes,
                     guards=guards)
    limits.check()
    caps = require_sandbox(unsafe_no_sandbox)
    return _run_one(code, caps=caps, **vars(limits))


def _run_one(code: str, *, caps: dict, **limits) -> SandboxResult:
    limits = _Limits(**limits)
    start, run_id = time.monotonic(), secrets.token_hex(8)
    process = _Process("program", code, caps=caps, limits=limits, run_id=run_id, extra_cfg={})
    try:
        if process.error is not None:
            return SandboxResult("error", None, "", process.error, time.monotonic() - start, process.isolation, run_id)
        timed_out = _watch([process], process, start + limits.timeout_s, {})
        return SandboxResult(process.status(timed_out), process.returncode(), process.out.text(), process.err.text(),
                             time.monotonic() - start, process.isolation, run_id)
    finally:
        process.close()


# --------------------------------------------------------------------------------------------------
# Judging a solution: the candidate and the judge, two sandboxes joined by two pipes
# --------------------------------------------------------------------------------------------------


def humaneval_program(solution_code: str, test_code: str, entry_point: str) -> str:
    """The HumanEval check program as a file would hold it: solution, tests, ``check(entry_point)``.
    `run_tests` lays the solution and the tests out on the same lines (the solution in the candidate's
    process, the tests in the judge's), so line numbers in tracebacks are this file's."""
    return f"{solution_code}\n\n{test_code}\n\ncheck({entry_point})\n"


def _judged(solution: str, judge_text: str, judge_cfg: dict, *, caps: dict, limits: _Limits
            ) -> tuple[SandboxResult, dict | None, list[dict]]:
    """Run the candidate (`solution`) and the judge (`judge_cfg`) side by side; returns the result, the
    judge's verdict (None if it gave none) and the records it sent before it."""
    start, run_id = time.monotonic(), secrets.token_hex(8)
    requests_r, requests_w = os.pipe()
    answers_r, answers_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    fds = [requests_r, requests_w, answers_r, answers_w, verdict_r, verdict_w]
    processes = []
    try:
        candidate = _Process("candidate", solution, caps=caps, limits=limits, run_id=run_id,
                             extra_cfg={"channel": {"requests": requests_r, "answers": answers_w}},
                             pass_fds=(requests_r, answers_w))
        processes.append(candidate)
        judge = _Process("judge", judge_text, caps=caps, limits=limits, run_id=run_id,
                         extra_cfg=dict(judge_cfg, channel={"requests": requests_w, "answers": answers_r},
                                        verdict_fd=verdict_w),
                         pass_fds=(requests_w, answers_r, verdict_w))
        processes.append(judge)
        for fd in (requests_r, requests_w, answers_r, answers_w, verdict_w):  # the children's copies only
            os.close(fd)
            fds.remove(fd)
        if candidate.error or judge.error:
            return SandboxResult("error", None, "", candidate.error or judge.error, time.monotonic() - start,
                                 candidate.isolation, run_id), None, []
        verdict_capture = _Capture(1 << 24)  # the judge's own records: trusted, kept whole
        timed_out = _watch(processes, judge, start + limits.timeout_s, {verdict_r: verdict_capture})
        verdict, records = _parse_verdict(verdict_capture.raw())
        status, rc = _judged_status(candidate, judge, verdict, timed_out)
        result = SandboxResult(status, rc, candidate.out.text() + judge.out.text(),
                               candidate.err.text() + judge.err.text(), time.monotonic() - start,
                               candidate.isolation, run_id)
        return result, verdict, records
    finally:
        for fd in fds:
            os.close(fd)
        for p in processes:
            p.close()


def _parse_verdict(raw: bytes) -> tuple[dict | None, list[dict]]:
    """The judge's JSON lines: (the verdict, or None if it never came; the records before it)."""
    verdict, records = None, []
    for line in raw.split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        if isinstance(record.get("passed"), bool):
            verdict = record
        else:
            records.append(record)
    return verdict, records


def _judged_status(candidate: _Process, judge: _Process, verdict: dict | None, timed_out: bool) -> tuple[Status, int]:
    if timed_out:
        return "timeout", candidate.returncode()
    if verdict is not None and verdict["passed"] and judge.returncode() == 0:
        return "passed", 0
    if candidate.exited_first:  # the solution's process ended on its own: its way of ending names the status
        own = candidate.status()
        if own in ("timeout", "memory", "killed", "error"):
            return own, candidate.returncode()
    if verdict is None:  # the judge itself did not finish
        own = judge.status()
        return (own if own in ("timeout", "memory") else "error"), judge.returncode()
    return "failed", 1


def run_tests(solution_code: str, test_code: str, entry_point: str, timeout_s: float = 5.0,
              unsafe_no_sandbox: bool = False, *, prompt: str | None = None, **limits) -> SandboxResult:
    """Judge a solution with HumanEval-style or MBPP-style tests: the test code defines ``check(candidate)``
    (called with the solution's `entry_point`), or asserts at its top level, calling the solution's
    functions by name. The tests run in the judge's sandbox, the solution in the candidate's (module
    docstring); ``passed`` only on the judge's verdict, whatever the solution prints or however it exits.

    prompt: the problem's prompt, a prefix of `solution_code`; given, it also runs on the judge's side, so
        the helpers it defines are the problem's own when the tests call them. `limits` go to
        `run_untrusted`'s keyword arguments, plus ``max_message_bytes`` (the largest plain value that may
        cross, default 16 MiB).
    """
    if not entry_point.isidentifier():
        raise ValueError(f"entry_point must be an identifier, got {entry_point!r}")
    if prompt is not None and not solution_code.startswith(prompt):
        raise ValueError("prompt must be a prefix of solution_code")
    limits = _Limits(timeout_s, **limits)
    limits.check()
    caps = require_sandbox(unsafe_no_sandbox)
    if prompt is not None:
        try:
            ast.parse(prompt)
        except (SyntaxError, ValueError):  # not a program on its own (or not UTF-8): its helpers stay the solution's
            prompt = None
    tests = {"prompt": prompt or "", "test": test_code, "entry_point": entry_point,
             "test_line": solution_code.count("\n") + 3}  # where humaneval_program puts the test code
    result, _, _ = _judged(solution_code, humaneval_program(solution_code, test_code, entry_point),
                              {"tests": tests}, caps=caps, limits=limits)
    return result


# --------------------------------------------------------------------------------------------------
# Doctests, judged the same way
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DoctestRun:
    """The outcome of `run_doctests`: the run, its plan ``[(test name, [example source])]`` and, per
    example run to the end, ``(test name, index) -> (ok, got)``."""

    result: SandboxResult
    plan: list[tuple[str, list[str]]]
    outcomes: dict[tuple[str, int], tuple[bool, str]]


def doctest_plan(source: str) -> list[tuple[str, list[tuple[str, str, str | None, dict]]]]:
    """The doctest examples of `source`'s definitions, found without running it: for each function and
    class (and, recursively, the definitions in a class body) whose docstring has examples, its name
    (``Class.method`` inside a class, as doctest.DocTestFinder names them) and its examples as
    ``(source, want, exc_msg, {option name: on})``; examples marked ``+SKIP`` are left out. Sorted by name."""
    import doctest
    parser = doctest.DocTestParser()
    names = {flag: name for name, flag in doctest.OPTIONFLAGS_BY_NAME.items()}
    plan = []

    def visit(nodes, prefix):
        for node in nodes:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            name = prefix + node.name
            doc = ast.get_docstring(node, clean=False)
            examples = []
            for ex in parser.get_examples(doc or "", name):
                if ex.options.get(doctest.SKIP):
                    continue
                examples.append((ex.source, ex.want, ex.exc_msg, {names[f]: on for f, on in ex.options.items()}))
            if examples:
                plan.append((name, examples))
            if isinstance(node, ast.ClassDef):
                visit(node.body, name + ".")

    visit(ast.parse(source).body, "")
    return sorted(plan, key=lambda t: t[0])


def run_doctests(source: str, *, timeout_s: float = 10.0, unsafe_no_sandbox: bool = False, **limits) -> DoctestRun:
    """Run every doctest example of `source` (`doctest_plan`): the source is the candidate, each example
    runs in its process (a fresh copy of the module's globals per definition, as doctest gives), and its
    output, a plain string, is compared in the judge's process with doctest's own checker. A definition's
    doctests that the source cannot even load report nothing (every example not ok).

    Not a verdict a hostile source cannot forge: the output is the source's own text (an example's value
    is printed by its ``__repr__``, in the source's process), so a source may print an example's expected
    output whatever it computes. What the judge adds is that printed markers and forged records count for
    nothing; use it on trusted snippets and their mutants, `run_tests` for generated code."""
    limits = _Limits(timeout_s, **limits)
    limits.check()
    caps = require_sandbox(unsafe_no_sandbox)
    plan = doctest_plan(source)
    result, verdict, records = _judged(source, source, {"doctests": plan}, caps=caps, limits=limits)
    outcomes = {}
    for record in records:
        if isinstance(record.get("test"), str) and isinstance(record.get("index"), int):
            outcomes[(record["test"], record["index"])] = (record.get("ok") is True, str(record.get("got", "")))
    if result.status == "passed" and verdict is not None and not verdict.get("passed", False):
        result = SandboxResult("failed", 1, result.stdout, result.stderr, result.seconds, result.isolation,
                               result.run_id)
    return DoctestRun(result, [(name, [ex[0] for ex in examples]) for name, examples in plan], outcomes)
