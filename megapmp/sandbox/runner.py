"""Run untrusted (generated) Python code in a separate process inside operating-system isolation.

Generated code is never executed inside the calling process. Each call of `run_untrusted` starts
``python -I -S`` (isolated mode, no ``site``) inside fresh Linux namespaces and returns a
`SandboxResult`. The boundary is the kernel's, for root and unprivileged callers alike:

1. **Namespaces** (user, mount, PID, network, IPC, UTS), made by one of two backends, chosen once per
   process by probing (`sandbox_capabilities`), in this order:

   * ``bwrap`` (bubblewrap, Debian package ``bubblewrap``): ``--unshare-all``, the whole file system
     bound read-only, a minimal ``/dev``, a ``/proc`` of the sandbox's own PID namespace, fresh tmpfs on
     ``/tmp``, ``/dev/shm`` and ``/var/tmp``, ``--die-with-parent``, ``--new-session``;
   * ``unshare`` (util-linux) with the same effect: ``unshare --mount --pid --net --ipc --uts --fork
     --kill-child --mount-proc`` (plus ``--user --map-root-user`` for unprivileged callers); the
     bootstrap then makes every mount read-only (``mount_setattr(AT_RECURSIVE)``), mounts fresh tmpfs
     on ``/tmp``, ``/dev/shm`` and ``/var/tmp``, and gives up its privileges (below).

   The program's working directory, ``HOME`` and ``TMPDIR`` are the private ``/tmp``; nothing it
   writes is visible outside or survives the run. There is no network interface but a down loopback,
   so no connection to the host (not even 127.0.0.1, not even through ``_socket``). ``/proc`` shows the
   sandbox's own processes only. When the program's first process ends, the PID namespace's init ends
   and the kernel kills every process left in it, ``setsid`` daemons included; on a timeout the
   launcher is killed and takes the namespace with it (``--die-with-parent`` / ``--kill-child``).
2. **No privileges**: a root caller's program runs as a per-run unprivileged uid (unique per concurrent
   run, so ``RLIMIT_NPROC`` applies and nothing else is its own); an unprivileged caller's program runs
   in a nested user namespace with every capability dropped, so it cannot undo the read-only mounts
   (they are locked in any namespace it could create). ``no_new_privs`` is set in both cases.
3. **Environment**: a handful of fixed variables (``PATH``, ``HOME``, ``TMPDIR``, ``LANG``); nothing of
   the caller's (``OPENAI_API_KEY`` and the like never reach the program).
4. **rlimits** set before the code runs: ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``, ``RLIMIT_FSIZE``,
   ``RLIMIT_NOFILE``, ``RLIMIT_CORE`` = 0 and, with a per-run uid, ``RLIMIT_NPROC``; the private
   ``/tmp`` holds at most ``memory_mb``.
5. **In-process guards** (second layer, against accidents, not a boundary): sockets, writes outside
   the working directory, ``exec``/``subprocess`` and signals outside the sandbox raise
   ``SandboxViolation``; ``os.fork`` draws from a budget of ``max_procs``.

Where neither backend works (no bubblewrap, no usable ``unshare``, user namespaces disabled), every run
raises `SandboxUnavailable` unless the caller passes ``unsafe_no_sandbox=True`` (the CLIs'
``--unsafe-no-sandbox``): then the program runs with items 3-5 only, in its own process group and
temporary directory (and, for root, as a per-run uid), with a warning in the log.

**The verdict of a test run** (`run_tests`) comes from the harness, never from the program's output.
The program file holds the solution and the test code only; the bootstrap itself calls
``check(entry_point)`` after the program's top level ran, and reports success on a dedicated pipe to
the caller -- not stdout -- by writing a per-run random nonce there, then ending the process with
``os._exit(0)`` before any code of the program can run again. The caller counts a run as passed only if
the process exited with 0 *and* the pipe holds exactly that nonce. So printing any marker passes
nothing (stdout is never parsed), and so does exiting early: ``sys.exit``/``os._exit`` at the top
level or inside a test, ``SystemExit`` raised by the solution, a crash or a kill leave the pipe empty.
The nonce reaches the bootstrap through a descriptor it reads and closes before the program starts;
it is not in the program file, argv, the environment or any file, and while the program runs it is
a local variable of the harness's frame only: no module global, no closure or container that
``gc.get_objects()`` lists (``sys.modules["__main__"]`` is the program's own module). Before reporting,
the harness checks that the program left the test machinery alone: no builtin replaced, no trace or
profile function installed, and every function of ``unittest.case`` still defined by ``unittest``
itself (a patched ``assertEqual`` fails the run). Writes to the verdict descriptor through ``os.write``
are refused by the guards, and raw writes lack the nonce. The limit of this design, stated plainly: the
tests run in the same interpreter as the solution (HumanEval's tests call helpers the prompt defines),
so a solution that walks its call stack up to the harness's frame (``sys._getframe().f_back``) can
still read the nonce; closing that needs the tests and the solution in different processes. Every
forgery through the program's output, its exit status, the descriptors it holds, the objects the
garbage collector lists or the ordinary test machinery is caught.

`run_reporting` gives a harness written as the program itself (the doctest runner of
`megapmp.synth.verified`) the same private channel: each line it reports carries the nonce, lines
without it are dropped, stdout is never parsed. There the reporting callable is an ordinary Python
object of the program, so code under test that searches the garbage collector for it could call it.

Statuses: ``passed`` (exit 0; for `run_tests` also the harness's record), ``failed`` (non-zero exit:
exception, failed assertion, refused operation, early exit), ``timeout`` (wall-clock limit or
``RLIMIT_CPU``), ``memory`` (``MemoryError`` under ``RLIMIT_AS``), ``killed`` (another signal, e.g. the
OOM killer) and ``error`` (the sandbox itself could not run the program).
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

__all__ = ["SandboxResult", "SandboxUnavailable", "run_untrusted", "run_tests", "run_reporting",
           "sandbox_capabilities", "require_sandbox", "humaneval_program", "Status"]

log = logging.getLogger(__name__)

Status = str  # "passed" | "failed" | "timeout" | "memory" | "killed" | "error"

PROGRAM_NAME = "prog.py"
SANDBOX_DIR = "/tmp"  # the program's working directory inside the namespaces: a private tmpfs
_EXIT_MEMORY = 93  # bootstrap: the program raised MemoryError
_EXIT_SETUP = 94  # bootstrap: the sandbox could not be set up; nothing of the program ran
_MEMORY_MARKER = "MemoryError (sandbox memory limit)"
_TAIL_BYTES = 4096  # kept from the end of a truncated stream, so the last lines are never lost
_UID_BASE = 1_000_000_000  # sandbox uids: _UID_BASE + pid * _UID_SLOTS + slot, unique per live run
_UID_SLOTS = 256
_NESTED_UID = 65534  # an unprivileged caller's program appears as this uid ("nobody") in its namespace


class SandboxUnavailable(RuntimeError):
    """No OS isolation works here and the caller did not allow running without it."""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run. stdout/stderr are decoded (UTF-8, replacement) and truncated to
    `max_output_bytes` each, keeping the head and the last 4 KiB with a marker in between. `run_id`
    appears in the command line of every process of the run (tests use it to look for survivors)."""

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
# Bootstrap: trusted code that runs in the child before the program. Standard library only. argv:
# the descriptor of its settings (JSON: cfg, program, nonce; read and closed first) and the run id.
# --------------------------------------------------------------------------------------------------

_BOOTSTRAP = r'''
import os, sys, json
with os.fdopen(int(sys.argv[1]), "rb") as _f:
    _setup = json.loads(_f.read())
cfg, _program_text, _nonce = _setup["cfg"], _setup["program"], _setup["nonce"]
del _setup, _f
EXIT_MEMORY, EXIT_SETUP = cfg["exit_memory"], cfg["exit_setup"]
MEMORY_MARKER = ("\n" + cfg["memory_marker"] + "\n").encode()


def _libc():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    def call(what, fn, *args):
        if fn(*args) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "%s: %s" % (what, os.strerror(err)))
    return ctypes, libc, call


def isolate_filesystem(tmpfs_kb):
    """Every mount read-only and nosuid, then fresh tmpfs where programs expect to write (unshare
    backend; we hold CAP_SYS_ADMIN in this mount namespace only). /proc stays writable: it is this PID
    namespace's own, and a nested user namespace needs /proc/self/uid_map."""
    ctypes, libc, call = _libc()
    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]
    SYS_mount_setattr, AT_FDCWD, AT_RECURSIVE, RDONLY, NOSUID = 442, -100, 0x8000, 0x1, 0x2
    def setattr_(path, set_, clr, flags):
        attr = MountAttr(set_, clr, 0, 0)
        call("mount_setattr(%s)" % path, libc.syscall, ctypes.c_long(SYS_mount_setattr), ctypes.c_int(AT_FDCWD),
             path.encode(), ctypes.c_uint(flags), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    setattr_("/", RDONLY | NOSUID, 0, AT_RECURSIVE)
    setattr_("/proc", 0, RDONLY, 0)
    MS_NOSUID, MS_NODEV = 2, 4
    for target in ("/tmp", "/dev/shm", "/var/tmp", "/run/shm", "/run/lock"):
        if os.path.isdir(target) and not os.path.islink(target):
            call("mount tmpfs on " + target, libc.mount, b"tmpfs", target.encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                 ("size=%dk,mode=700" % tmpfs_kb).encode())


def drop_to_uid(uid):
    """Root caller: switch to the per-run uid. The new uid may not be able to search the directories
    above the standard library (/root/.pyenv); keep them reachable through descriptors opened now."""
    moved = {}
    for p in sys.path:
        try:
            moved[p] = "/proc/self/fd/%d" % os.open(p, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
    sys.path[:] = list(moved.values())
    for mod in list(sys.modules.values()):  # packages imported at start-up, e.g. encodings
        locations = getattr(mod, "__path__", None)
        if isinstance(locations, list):
            for i, loc in enumerate(locations):
                for old, new in moved.items():
                    if loc == old or loc.startswith(old + os.sep):
                        locations[i] = new + loc[len(old):]
    sys.path_importer_cache.clear()
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)  # from root to another uid: the kernel clears every capability
    if os.getuid() != uid or os.geteuid() != uid:
        raise RuntimeError("could not drop privileges")


def drop_capabilities(inner_uid):
    """Unprivileged caller (unshare backend): we are root of our own user namespace. Enter a nested one,
    where the mounts made above are locked (no one can make them writable again), appear there as an
    ordinary uid, and drop every capability."""
    ctypes, libc, call = _libc()
    CLONE_NEWUSER = 0x10000000
    call("unshare(CLONE_NEWUSER)", libc.unshare, CLONE_NEWUSER)
    for name, text in (("setgroups", "deny"), ("uid_map", "%d 0 1" % inner_uid), ("gid_map", "%d 0 1" % inner_uid)):
        with open("/proc/self/" + name, "w") as f:
            f.write(text)
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
    _LINUX_CAPABILITY_VERSION_3 = 0x20080522
    call("capset", libc.capset, ctypes.byref(Header(_LINUX_CAPABILITY_VERSION_3, 0)), (Data * 2)())


def no_new_privs():
    ctypes, libc, call = _libc()
    PR_SET_NO_NEW_PRIVS = 38
    call("prctl(PR_SET_NO_NEW_PRIVS)", libc.prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


try:
    import builtins, io, resource, traceback, errno, _socket
    if cfg["mounts"]:
        isolate_filesystem(cfg["tmpfs_kb"])
    if cfg["uid"] is not None:
        for _dir in cfg["private_dirs"]:  # the fresh tmpfs mounts become the per-run uid's own
            if os.path.isdir(_dir):
                os.chown(_dir, cfg["uid"], cfg["uid"])
        drop_to_uid(cfg["uid"])
    elif cfg["drop_capabilities"]:
        drop_capabilities(cfg["nested_uid"])
    if cfg["sandbox_dir"] is not None:
        no_new_privs()
        os.chdir(cfg["sandbox_dir"])
    workdir = os.path.realpath(os.getcwd())
    program_path = os.path.join(workdir, cfg["program"])
    with open(program_path, "w", encoding="utf-8") as _f:
        _f.write(_program_text)

    class SandboxViolation(PermissionError):
        """An operation the sandbox refuses (network, writes outside the working directory, ...)."""
    builtins.SandboxViolation = SandboxViolation

    _verdict_fd = cfg["verdict_fd"]
    _os_write = os.write
    if _verdict_fd is not None:
        def write(fd, data):
            if fd == _verdict_fd:
                raise SandboxViolation("sandbox: the verdict descriptor belongs to the harness")
            return _os_write(fd, data)
        os.write = write

    if cfg["guards"]:
        # -- network: every socket constructor and resolver raises ----------------------------
        def _no_net(*a, **k):
            raise SandboxViolation("network access is disabled in the sandbox")
        class _NoSocket(_socket.socket):
            __slots__ = ()  # socket.socket subclasses this and declares __weakref__ itself
            def __new__(cls, *a, **k):
                _no_net()
            def __init__(self, *a, **k):
                _no_net()
        _socket.socket = _socket.SocketType = _NoSocket
        for _name in ("socketpair", "fromfd", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
                      "gethostbyaddr", "getnameinfo", "create_connection", "create_server"):
            if hasattr(_socket, _name):
                setattr(_socket, _name, _no_net)

        # -- filesystem: writes and destructive calls only below the working directory ---------
        _real = os.path.realpath
        _allowed_files = {"/dev/null"}
        def _resolve(path, dir_fd=None):
            path = os.fsdecode(os.fspath(path))
            if dir_fd is not None and not os.path.isabs(path):
                path = os.path.join(os.readlink("/proc/self/fd/%d" % dir_fd), path)
            return _real(os.path.join(os.getcwd(), path))
        def _check(path, what, dir_fd=None):
            if isinstance(path, int):
                if path == _verdict_fd:
                    raise SandboxViolation("sandbox: the verdict descriptor belongs to the harness")
                return
            full = _resolve(path, dir_fd)
            if full in _allowed_files or full == workdir or full.startswith(workdir + os.sep):
                return
            raise SandboxViolation("sandbox: %s outside the working directory refused: %r" % (what, full))

        _open = builtins.open
        def open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                _check(file, "open(%r)" % mode)
            return _open(file, mode, *args, **kwargs)
        builtins.open = io.open = open

        _FileIO = io.FileIO
        class FileIO(_FileIO):
            def __init__(self, file, mode="r", *args, **kwargs):
                if any(c in mode for c in "wax+"):
                    _check(file, "FileIO(%r)" % mode)
                super().__init__(file, mode, *args, **kwargs)
        io.FileIO = FileIO

        _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        _os_open = os.open
        def os_open(path, flags, mode=0o777, *, dir_fd=None):
            if flags & _WRITE_FLAGS:
                _check(path, "os.open for writing", dir_fd)
            return _os_open(path, flags, mode, dir_fd=dir_fd)
        os.open = os_open

        def _guard_paths(name, npaths):
            fn = getattr(os, name, None)
            if fn is None:
                return
            def wrapper(*args, **kwargs):
                shared = kwargs.get("dir_fd")
                dir_fds = (kwargs.get("src_dir_fd", shared), kwargs.get("dst_dir_fd", shared))
                for i, p in enumerate(args[:npaths]):
                    _check(p, "os.%s" % name, dir_fds[min(i, 1)])
                return fn(*args, **kwargs)
            wrapper.__name__ = name
            setattr(os, name, wrapper)
        for _name in ("remove", "unlink", "rmdir", "mkdir", "chmod", "chown", "lchown", "truncate",
                      "utime", "mkfifo", "mknod", "removexattr", "setxattr"):
            _guard_paths(_name, 1)
        for _name in ("rename", "replace", "link", "symlink"):
            _guard_paths(_name, 2)

        # -- processes: no exec, a fixed budget of forks, signals only to our own group ---------
        def _no_spawn(*a, **k):
            raise SandboxViolation("starting programs is disabled in the sandbox")
        for _name in ("system", "popen", "execv", "execve", "execvp", "execvpe", "execl", "execle",
                      "execlp", "execlpe", "posix_spawn", "posix_spawnp", "spawnv", "spawnve",
                      "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "forkpty"):
            if hasattr(os, _name):
                setattr(os, _name, _no_spawn)
        import _posixsubprocess
        _posixsubprocess.fork_exec = _no_spawn

        # A pipe holding one byte per allowed fork, shared by every descendant; once the bytes are
        # gone (the write end is closed, so an empty pipe reads as EOF) fork fails like the kernel's.
        _tokens_r, _tokens_w = os.pipe()
        _os_write(_tokens_w, b"x" * cfg["max_procs"])
        os.close(_tokens_w)
        _fork = os.fork
        def fork():
            if not os.read(_tokens_r, 1):
                raise BlockingIOError(errno.EAGAIN, "sandbox: process limit reached")
            return _fork()
        os.fork = fork

        _kill, _killpg, _group = os.kill, os.killpg, os.getpgrp()
        def kill(pid, sig):
            if pid not in (0, -_group) and (pid < 0 or _group != os.getpgid(pid)):
                raise SandboxViolation("sandbox: signals outside the sandbox are refused")
            return _kill(pid, sig)
        def killpg(pgid, sig):
            if pgid not in (0, _group):
                raise SandboxViolation("sandbox: signals outside the sandbox are refused")
            return _killpg(pgid, sig)
        os.kill, os.killpg = kill, killpg

    # -- rlimits last: the program runs under them, the set-up above does not -------------------
    for _name, _value in cfg["rlimits"].items():
        _res = getattr(resource, _name)
        _soft, _hard = resource.getrlimit(_res)
        if _hard != resource.RLIM_INFINITY:
            _value = min(_value, _hard - 1 if _name == "RLIMIT_CPU" else _hard)
        # CPU: soft < hard, so the soft limit delivers SIGXCPU (reported as a timeout), not SIGKILL.
        resource.setrlimit(_res, (_value, _value + 1 if _name == "RLIMIT_CPU" else _value))
    code = compile(_program_text, program_path, "exec")
    del _program_text
except BaseException as exc:
    if isinstance(exc, SyntaxError) and "code" not in globals() and "program_path" in globals():
        # A syntax error of the program itself is the program's failure, not the sandbox's.
        import traceback
        traceback.print_exc()
        sys.exit(1)
    import traceback
    sys.stderr.write("sandbox setup failed:\n")
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(EXIT_SETUP)


def _untouched(snapshot, gettrace, getprofile):
    """Whether the test machinery is as it was before the program ran (see the module docstring)."""
    import builtins
    if sys.gettrace is not gettrace or sys.getprofile is not getprofile:
        return "sys.gettrace/sys.getprofile were replaced"
    if gettrace() is not None or getprofile() is not None:
        return "a trace or profile function is installed"
    for name, value in snapshot.items():
        if getattr(builtins, name, None) is not value:
            return "builtins.%s was replaced" % name
    case = sys.modules.get("unittest.case")
    if case is not None:
        classes = [v for v in vars(case).values() if isinstance(v, type) and v.__module__ == "unittest.case"]
        for owner in [case] + classes:
            for name, value in vars(owner).items():
                code = getattr(value, "__code__", None)
                if code is not None and code.co_filename != case.__file__:
                    return "unittest.case %s.%s was replaced" % (getattr(owner, "__name__", ""), name)
    return None


def _make_report(fd, nonce, write):
    """For a harness written as the program itself (run_reporting): one authenticated line per call."""
    prefix = nonce.encode()
    def report(text):
        write(fd, prefix + text.encode("utf-8", "replace").replace(b"\n", b" ") + b"\n")
    return report


def _main(code, program_path, entry_point, verdict_fd, nonce, report):
    """Run the program as the real __main__ module and, for run_tests, be the harness.

    With an entry point the program holds the solution and the test code; this function calls
    ``check(<entry point>)`` itself and, only when that returned normally and nothing was tampered
    with, writes the nonce to the verdict descriptor and ends the process before any program code can
    run again. The nonce and everything used after the tests (write, exit, the tamper check) are locals
    of this frame, bound before the program runs: no module global, no object the garbage collector
    lists, holds them."""
    import types
    write, exit_, untouched = _os_write, os._exit, _untouched
    snapshot, gettrace, getprofile = dict(vars(builtins)), sys.gettrace, sys.getprofile
    stdout, stderr = sys.stdout, sys.stderr
    main = types.ModuleType("__main__")
    main.__file__, main.__builtins__ = program_path, builtins
    sys.modules["__main__"] = main
    namespace = main.__dict__
    if report is not None:
        namespace["__sandbox_report__"] = report
    del report
    try:
        exec(code, namespace)
        if entry_point is None:
            return
        namespace["check"](namespace[entry_point])
    except SystemExit as exc:
        if entry_point is None:
            raise
        stderr.write("sandbox: the program exited (SystemExit %r) before the tests completed\n" % (exc.code,))
        exit_(1)
    except MemoryError:
        try:
            stdout.flush()
        except BaseException:
            pass
        write(2, MEMORY_MARKER)
        exit_(EXIT_MEMORY)
    except BaseException as exc:
        try:  # the program's frames only, not this bootstrap's
            tb = exc.__traceback__.tb_next
            while tb is not None and tb.tb_frame.f_code.co_filename != program_path:
                tb = tb.tb_next
            traceback.print_exception(type(exc), exc, tb)
        except MemoryError:
            write(2, MEMORY_MARKER)
            exit_(EXIT_MEMORY)
        sys.exit(1)
    tampered = untouched(snapshot, gettrace, getprofile)
    for stream in (stdout, stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    if tampered:
        write(2, ("sandbox: the program tampered with the test machinery: %s\n" % tampered).encode())
        exit_(1)
    write(verdict_fd, nonce.encode())
    exit_(0)


_report = None
if _nonce and not cfg["entry_point"]:
    _report = _make_report(cfg["verdict_fd"], _nonce, _os_write)
    _nonce = None
_main(code, program_path, cfg["entry_point"], cfg["verdict_fd"], globals().pop("_nonce"), globals().pop("_report"))
'''


# --------------------------------------------------------------------------------------------------
# Backends: probed once per process
# --------------------------------------------------------------------------------------------------

_caps_lock = threading.Lock()
_caps: dict | None = None
_uid_lock = threading.Lock()
_uid_next = 0
_uids_in_use: set[int] = set()
_RLIMITS = ["RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE"]
_PROBE = "import os\nopen('probe', 'w').write('x')\nprint(os.getcwd(), sorted(os.listdir('.')), os.getpid() < 5)\n"
_PROBE_OUT = f"{SANDBOX_DIR} ['probe', '{PROGRAM_NAME}'] True\n"


def _private_dirs() -> list[str]:
    """Where programs expect to write; each gets a fresh tmpfs inside the namespaces."""
    return [d for d in (SANDBOX_DIR, "/dev/shm", "/var/tmp", "/run/shm", "/run/lock")
            if os.path.isdir(d) and not os.path.islink(d)]


def _bwrap_prefix(bwrap: str, root: bool, tmpfs_bytes: int) -> list[str]:
    """bubblewrap: as root it creates the namespaces itself and keeps only what the bootstrap needs to
    become the per-run uid; otherwise in a user namespace of the caller's, with no capabilities left and
    no further user namespaces allowed."""
    help_text = _bwrap_help(bwrap)
    prefix = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
              "--die-with-parent", "--new-session", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for d in _private_dirs():
        prefix += (["--size", str(tmpfs_bytes)] if "--size" in help_text else []) + ["--tmpfs", d]
    if root:
        prefix += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_CHOWN"]
    else:
        prefix += ["--unshare-user"] + (["--disable-userns"] if "--disable-userns" in help_text else [])
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
    """util-linux unshare: new namespaces and a /proc of the new PID namespace; the bootstrap does the
    rest (read-only mounts, private tmpfs, dropping privileges). Root needs no user namespace."""
    user = [] if root else ["--user", "--map-root-user"]
    return [unshare, *user, "--mount", "--pid", "--net", "--ipc", "--uts", "--fork", "--kill-child",
            "--mount-proc", "--propagation", "private", "--"]


def _launch_plan(caps: dict, tmpfs_bytes: int) -> dict:
    """How one run starts under `caps`: argv prefix and the bootstrap's set-up steps."""
    root = os.geteuid() == 0
    backend = caps["backend"]
    if backend == "bwrap":
        prefix = _bwrap_prefix(caps["bwrap"], root, tmpfs_bytes)
    elif backend == "unshare":
        prefix = _unshare_prefix(caps["unshare"], root)
    else:
        prefix = []
    return {"prefix": prefix, "mounts": backend == "unshare", "drop_capabilities": backend == "unshare" and not root,
            "sandbox_dir": SANDBOX_DIR if backend else None}


def sandbox_capabilities(refresh: bool = False) -> dict:
    """Which isolation is in effect here, probed once by running a tiny program through each backend:
    ``backend`` (``"bwrap"``, ``"unshare"`` or None: nothing works), ``bwrap``/``unshare`` (the
    binaries found), ``drop_uid`` (the program runs as a per-run uid: the caller is root), ``nproc``
    (RLIMIT_NPROC enforced: only with ``drop_uid``), ``rlimits`` and ``problems`` (why a backend was
    not taken)."""
    global _caps
    with _caps_lock:
        if _caps is not None and not refresh:
            return dict(_caps)
        root = os.geteuid() == 0
        base = {"backend": None, "bwrap": shutil.which("bwrap"), "unshare": shutil.which("unshare"),
                "drop_uid": root, "kill_binary": shutil.which("kill"),
                "problems": {}}
        caps = dict(base)
        for backend in ("bwrap", "unshare"):
            if base[backend] is None:
                base["problems"][backend] = "not installed"
                continue
            trial = dict(base, backend=backend)
            problem = _probe(trial)
            if problem is None:
                caps = trial
                break
            base["problems"][backend] = problem
        caps["problems"] = dict(base["problems"])
        caps["nproc"] = caps["drop_uid"]
        caps["rlimits"] = _RLIMITS + (["RLIMIT_NPROC"] if caps["nproc"] else [])
        _caps = caps
        if caps["backend"]:
            log.info("sandbox: %s isolation (%s namespaces), %s, rlimits %s", caps["backend"],
                     "mount/pid/net/ipc/uts" if root else "user/mount/pid/net/ipc/uts",
                     "per-run uid" if caps["drop_uid"] else "no capabilities",
                     ",".join(caps["rlimits"]))
        else:
            log.warning("sandbox: no OS isolation available (%s)", _problems_text(caps))
        return dict(caps)


def _probe(caps: dict) -> str | None:
    try:
        r, _ = _execute(_PROBE, caps=caps, timeout_s=10.0, memory_mb=256, cpu_s=None, max_file_bytes=1 << 16,
                        max_procs=8, max_open_files=64, max_output_bytes=4096, guards=True)
    except OSError as exc:
        return str(exc)
    if r.status == "passed" and r.stdout == _PROBE_OUT:
        return None
    lines = (r.stderr.strip() or r.stdout.strip() or r.status).splitlines()
    return f"probe {r.status}: {lines[-1][:200]}"


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
            uid = _UID_BASE + (os.getpid() % 4_000_000) * _UID_SLOTS + _uid_next % _UID_SLOTS
            _uid_next += 1
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid
    raise RuntimeError(f"more than {_UID_SLOTS} concurrent sandbox runs in one process")


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
# Running
# --------------------------------------------------------------------------------------------------


def run_untrusted(code: str, *, timeout_s: float = 5.0, memory_mb: int = 512, cpu_s: float | None = None,
                  max_file_bytes: int = 1 << 20, max_procs: int = 32, max_open_files: int = 64,
                  max_output_bytes: int = 1 << 16, guards: bool = True,
                  unsafe_no_sandbox: bool = False) -> SandboxResult:
    """Run `code` as ``__main__`` in a fresh sandboxed Python process and wait for it.

    timeout_s: wall-clock limit; the launcher is killed when it passes, and the PID namespace with it.
        cpu_s: RLIMIT_CPU, default ceil(timeout_s) + 1.
    memory_mb: RLIMIT_AS of each process, and the size of the private /tmp. max_file_bytes: RLIMIT_FSIZE.
    max_procs: RLIMIT_NPROC where the kernel enforces it (per-run uid), and the in-process fork budget.
    max_open_files: RLIMIT_NOFILE. max_output_bytes: kept of stdout and of stderr each.
    guards: install the in-process guards; only tests of the OS-level isolation turn them off.
    unsafe_no_sandbox: where no OS isolation works, run anyway (guards and rlimits only) instead of
        raising `SandboxUnavailable`. Where isolation works it is used regardless.
    """
    _check_limits(timeout_s, memory_mb, max_procs)
    caps = require_sandbox(unsafe_no_sandbox)
    result, _ = _execute(code, caps=caps, timeout_s=timeout_s, memory_mb=memory_mb, cpu_s=cpu_s,
                         max_file_bytes=max_file_bytes, max_procs=max_procs, max_open_files=max_open_files,
                         max_output_bytes=max_output_bytes, guards=guards)
    return result


def _check_limits(timeout_s, memory_mb, max_procs) -> None:
    if timeout_s <= 0 or memory_mb <= 0 or max_procs <= 0:
        raise ValueError(f"timeout_s, memory_mb and max_procs must be positive: {timeout_s}, {memory_mb}, {max_procs}")


def _setup_fd(payload: dict) -> int:
    """A descriptor holding the bootstrap's settings, the program and the nonce: never argv (visible in
    /proc/*/cmdline), never a file the program could find."""
    data = json.dumps(payload).encode()
    fd = os.memfd_create("megapmp-sandbox-setup") if hasattr(os, "memfd_create") else os.dup(
        tempfile.TemporaryFile().fileno())
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _execute(code: str, *, caps: dict, timeout_s, memory_mb, cpu_s, max_file_bytes, max_procs, max_open_files,
             max_output_bytes, guards, entry_point: str | None = None,
             nonce: str | None = None) -> tuple[SandboxResult, bytes]:
    """One run; returns the result and what arrived on the verdict pipe (only with `nonce`)."""
    start = time.monotonic()
    run_id = secrets.token_hex(8)
    plan = _launch_plan(caps, int(memory_mb) << 20)
    isolation = [caps["backend"] or "unsafe_no_sandbox", "process_group" if not caps["backend"] else "pidns",
                 "rlimits"] + (["drop_uid"] if caps["drop_uid"] else []) + (["guards"] if guards else [])
    uid = _acquire_uid() if caps["drop_uid"] else None
    workdir = None if plan["sandbox_dir"] else tempfile.mkdtemp(prefix="megapmp-sandbox-")
    proc, fds = None, []
    try:
        if workdir is not None and uid is not None:
            os.chown(workdir, uid, uid)
        rlimits = {"RLIMIT_AS": int(memory_mb) << 20,
                   "RLIMIT_CPU": int(math.ceil(cpu_s if cpu_s is not None else timeout_s + 1)),
                   "RLIMIT_FSIZE": int(max_file_bytes), "RLIMIT_NOFILE": int(max_open_files), "RLIMIT_CORE": 0}
        if caps["drop_uid"]:
            rlimits["RLIMIT_NPROC"] = int(max_procs)
        verdict_r = verdict_w = None
        if nonce is not None:
            verdict_r, verdict_w = os.pipe()
            fds += [verdict_r, verdict_w]
        cfg = {"program": PROGRAM_NAME, "uid": uid, "guards": guards, "max_procs": int(max_procs),
               "rlimits": rlimits, "exit_memory": _EXIT_MEMORY, "exit_setup": _EXIT_SETUP,
               "memory_marker": _MEMORY_MARKER, "mounts": plan["mounts"], "tmpfs_kb": int(memory_mb) << 10,
               "private_dirs": _private_dirs(), "drop_capabilities": plan["drop_capabilities"],
               "nested_uid": _NESTED_UID, "sandbox_dir": plan["sandbox_dir"], "verdict_fd": verdict_w,
               "entry_point": entry_point}
        setup = _setup_fd({"cfg": cfg, "program": code, "nonce": nonce})
        fds.append(setup)
        home = plan["sandbox_dir"] or workdir
        argv = plan["prefix"] + [_interpreter(), "-I", "-S", "-B", "-c", _BOOTSTRAP, str(setup),
                                 f"megapmp-sandbox-{run_id}"]
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        try:
            proc = subprocess.Popen(argv, cwd=workdir or "/", env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                    close_fds=True, pass_fds=[fd for fd in (setup, verdict_w) if fd is not None])
        except OSError as exc:
            return SandboxResult("error", None, "", f"sandbox: could not start: {exc}", time.monotonic() - start,
                                 tuple(isolation), run_id), b""
        for fd in (setup, verdict_w):  # the child's copies are the only ones left
            if fd is not None:
                os.close(fd)
                fds.remove(fd)
        out, err, verdict, timed_out = _communicate(proc, start + timeout_s, max_output_bytes, uid, caps, verdict_r)
        rc = _returncode(proc.returncode, caps["backend"])
        status = _status(rc, timed_out, err.text())
        return SandboxResult(status, rc, out.text(), err.text(), time.monotonic() - start, tuple(isolation),
                             run_id), verdict.raw()
    finally:
        if proc is not None and proc.poll() is None:
            _kill_group(proc.pid)
            proc.wait()
        for fd in fds:
            os.close(fd)
        if uid is not None:
            if not caps["backend"]:
                _kill_uid(uid, caps["kill_binary"])
            _release_uid(uid)
        if workdir is not None:
            _rmtree(workdir)


def _interpreter() -> str:
    """The real interpreter binary: with -I -S a virtualenv adds nothing, and its directory may be
    hidden inside the namespaces (a venv under /tmp is covered by the private /tmp)."""
    return os.path.realpath(sys.executable)


def _returncode(rc: int | None, backend: str | None) -> int | None:
    # bubblewrap reports a child killed by signal N as exit status 128 + N; unshare re-raises it.
    if backend == "bwrap" and rc is not None and 128 < rc < 128 + 65:
        return -(rc - 128)
    return rc


def _communicate(proc, deadline, limit, uid, caps, verdict_fd):
    out, err, verdict = _Capture(limit), _Capture(limit), _Capture(limit)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    if verdict_fd is not None:
        sel.register(verdict_fd, selectors.EVENT_READ, verdict)
    timed_out = False
    exited_at = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if proc.poll() is not None and exited_at is None:
                # The program is done; whatever it left running goes now, so the pipes reach EOF.
                exited_at = now
                _kill_group(proc.pid)
                if uid is not None and not caps["backend"]:
                    _kill_uid(uid, caps["kill_binary"])
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
        if timed_out or proc.poll() is None:
            _kill_group(proc.pid)
            if uid is not None and not caps["backend"]:
                _kill_uid(uid, caps["kill_binary"])
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    return out, err, verdict, timed_out


def _status(rc: int | None, timed_out: bool, stderr: str) -> Status:
    if timed_out:
        return "timeout"
    if rc == 0:
        return "passed"
    if rc == _EXIT_MEMORY and _MEMORY_MARKER in stderr:
        return "memory"
    if rc == _EXIT_SETUP and "sandbox setup failed" in stderr:
        return "error"
    if rc is not None and rc < 0:
        if -rc == signal.SIGXCPU:
            return "timeout"
        return "killed"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if last.startswith("MemoryError"):
        return "memory"
    return "failed"


# --------------------------------------------------------------------------------------------------
# Tests with a verdict from the harness
# --------------------------------------------------------------------------------------------------


def humaneval_program(solution_code: str, test_code: str, entry_point: str) -> str:
    """The HumanEval check program as a file would hold it: solution, tests, ``check(entry_point)``.
    `run_tests` executes the same text without the last line (its harness makes that call), so line
    numbers in tracebacks are the same."""
    return f"{solution_code}\n\n{test_code}\n\ncheck({entry_point})\n"


def run_tests(solution_code: str, test_code: str, entry_point: str, timeout_s: float = 5.0,
              unsafe_no_sandbox: bool = False, **limits) -> SandboxResult:
    """Run a HumanEval-style test (solution + test code defining ``check``) in the sandbox; the harness
    calls ``check(<entry_point>)``.

    ``passed`` only when the harness itself recorded that ``check`` returned normally with the test
    machinery untouched (module docstring); whatever the program prints, however it exits, is never
    taken for a pass. `limits` go to `run_untrusted`'s keyword arguments.
    """
    _check_limits(timeout_s, limits.get("memory_mb", 512), limits.get("max_procs", 32))
    if not entry_point.isidentifier():
        raise ValueError(f"entry_point must be an identifier, got {entry_point!r}")
    caps = require_sandbox(unsafe_no_sandbox)
    nonce = secrets.token_hex(16)
    program = f"{solution_code}\n\n{test_code}\n"
    kwargs = dict(memory_mb=512, cpu_s=None, max_file_bytes=1 << 20, max_procs=32, max_open_files=64,
                  max_output_bytes=1 << 16, guards=True)
    kwargs.update(limits)
    result, verdict = _execute(program, caps=caps, timeout_s=timeout_s, entry_point=entry_point, nonce=nonce,
                               **kwargs)
    if result.status == "passed" and verdict != nonce.encode():
        return SandboxResult("failed", result.returncode, result.stdout,
                             result.stderr + "\nsandbox: exit status 0 without the harness's record that the tests "
                                             "completed\n", result.seconds, result.isolation, result.run_id)
    return result


def run_reporting(code: str, *, timeout_s: float = 5.0, unsafe_no_sandbox: bool = False,
                  **limits) -> tuple[SandboxResult, list[str]]:
    """Run a harness written as the program itself, which reports through ``__sandbox_report__``.

    The program finds a callable ``__sandbox_report__(text)`` among its globals; each call delivers one
    line to the caller on the private verdict pipe, prefixed by a per-run nonce the program's text never
    contains. A harness takes it out of its globals first (``report = globals().pop("__sandbox_report__")``)
    and then runs the code under test, so that code can neither call it nor forge a line: lines on the pipe
    without the nonce are dropped, and stdout is never parsed. Returns the result and the reported lines
    in order (`megapmp.synth.verified.run_doctests` is the user).
    """
    _check_limits(timeout_s, limits.get("memory_mb", 512), limits.get("max_procs", 32))
    caps = require_sandbox(unsafe_no_sandbox)
    nonce = secrets.token_hex(16)
    kwargs = dict(memory_mb=512, cpu_s=None, max_file_bytes=1 << 20, max_procs=32, max_open_files=64,
                  max_output_bytes=1 << 16, guards=True)
    kwargs.update(limits)
    result, channel = _execute(code, caps=caps, timeout_s=timeout_s, nonce=nonce, **kwargs)
    prefix = nonce.encode()
    lines = [line[len(prefix):].decode("utf-8", "replace") for line in channel.split(b"\n") if line.startswith(prefix)]
    return result, lines
