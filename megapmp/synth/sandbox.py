"""Run untrusted (generated) Python code in a separate, resource-limited process.

Generated code is never executed inside the calling process. Each call of `run_untrusted` starts
``sys.executable -I -S`` (isolated mode, no ``site``) in a fresh temporary directory with a minimal
environment, reads the program from a file in that directory (never argv), and returns a
`SandboxResult`. The limits, in decreasing order of strength:

1. **Process isolation**: own session / process group (``start_new_session``), killed as a group on
   timeout and after the program ends, so no stray children survive it.
2. **Network namespace**: where ``unshare(1)`` can create one (root, or unprivileged user namespaces),
   the child runs in an empty network namespace: no interfaces, not even loopback.
3. **Unprivileged user**: when the caller is root, the child switches to a uid/gid of its own, unique
   per concurrent run, so the kernel refuses writes to files it does not own, signals to other
   processes, and enforces ``RLIMIT_NPROC`` (the kernel never applies it to root). After the run every
   process of that uid is killed (``kill -9 -1`` as that uid), which also catches processes that left
   the process group with ``setsid``. The interpreter's library may live under a directory the new
   uid cannot search (``/root/.pyenv``); the bootstrap opens ``sys.path`` as directory descriptors
   before switching and imports through ``/proc/self/fd/N`` afterwards.
4. **rlimits** set in the child before the code runs: ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``,
   ``RLIMIT_FSIZE`` (largest file it may write), ``RLIMIT_NOFILE``, ``RLIMIT_CORE`` = 0 and
   ``RLIMIT_NPROC`` (only where it applies, see 3).
5. **In-process guards** installed by the bootstrap: sockets and name resolution raise, writes and
   destructive file operations outside the working directory raise, spawning programs (``exec``,
   ``subprocess``, ``os.system``) raises, ``os.fork`` draws from a fixed budget of ``max_procs``
   forks, and signals may only go to the sandbox's own process group. These guard against
   *accidents* in generated code (a test that writes to ``/tmp/out.txt``, a stray ``requests.get``);
   they are not a security boundary against a determined attacker, who can undo them with ctypes.
   Items 1-4 are the real limits.

`sandbox_capabilities()` reports which of these are in effect on this machine (probed once, then
cached); every `SandboxResult` carries the list too.

Statuses: ``passed`` (exit 0), ``failed`` (non-zero exit: exception, failed assertion, refused
operation), ``timeout`` (wall-clock limit or ``RLIMIT_CPU``), ``memory`` (``MemoryError`` under
``RLIMIT_AS``), ``killed`` (ended by another signal, e.g. SIGSEGV or the kernel's OOM killer) and
``error`` (the sandbox itself could not run the program).
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

__all__ = ["SandboxResult", "run_untrusted", "run_tests", "sandbox_capabilities", "Status"]

log = logging.getLogger(__name__)

Status = str  # "passed" | "failed" | "timeout" | "memory" | "killed" | "error"

PROGRAM_NAME = "prog.py"
_EXIT_MEMORY = 93  # bootstrap: the program raised MemoryError
_EXIT_SETUP = 94  # bootstrap: the sandbox could not be set up; nothing of the program ran
_MEMORY_MARKER = "MemoryError (sandbox memory limit)"
_TAIL_BYTES = 4096  # kept from the end of a truncated stream, so the last lines are never lost
_UID_BASE = 1_000_000_000  # sandbox uids: _UID_BASE + pid * _UID_SLOTS + slot, unique per live run
_UID_SLOTS = 256


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run. stdout/stderr are decoded (UTF-8, replacement) and truncated to
    `max_output_bytes` each, keeping the head and the last 4 KiB with a marker in between."""

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolation: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# --------------------------------------------------------------------------------------------------
# Bootstrap: trusted code that runs in the child before the program. Kept free of imports that could
# fail; it receives its settings as one JSON argv item and the program as a file.
# --------------------------------------------------------------------------------------------------

_BOOTSTRAP = r'''
import os, sys, json
cfg = json.loads(sys.argv[1])
EXIT_MEMORY, EXIT_SETUP = cfg["exit_memory"], cfg["exit_setup"]
MEMORY_MARKER = ("\n" + cfg["memory_marker"] + "\n").encode()
try:
    import builtins, io, resource, traceback, errno, _socket
    workdir = os.path.realpath(os.getcwd())
    with open(cfg["program"], "rb") as f:
        source = f.read()

    if cfg["uid"] is not None:
        # The new uid may not be able to search the directories above the standard library; keep
        # them reachable through descriptors opened now, while still privileged.
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
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
        if os.getuid() != cfg["uid"] or os.geteuid() != cfg["uid"]:
            raise RuntimeError("could not drop privileges")

    class SandboxViolation(PermissionError):
        """An operation the sandbox refuses (network, writes outside the working directory, ...)."""
    builtins.SandboxViolation = SandboxViolation

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
        os.write(_tokens_w, b"x" * cfg["max_procs"])
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
    code = compile(source, cfg["program"], "exec")
except BaseException as exc:
    if isinstance(exc, SyntaxError) and "code" not in globals():
        # A syntax error of the program itself is the program's failure, not the sandbox's.
        import traceback
        traceback.print_exc()
        sys.exit(1)
    import traceback
    sys.stderr.write("sandbox setup failed:\n")
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(EXIT_SETUP)

del cfg
namespace = {"__name__": "__main__", "__file__": os.path.join(workdir, sys.argv[2]), "__builtins__": builtins}
try:
    exec(code, namespace)
except MemoryError:
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    os.write(2, MEMORY_MARKER)
    os._exit(EXIT_MEMORY)
except SystemExit:
    raise
except BaseException as exc:
    try:  # the program's frames only, not this bootstrap's
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
    except MemoryError:
        os.write(2, MEMORY_MARKER)
        os._exit(EXIT_MEMORY)
    sys.exit(1)
'''


# --------------------------------------------------------------------------------------------------
# Capabilities: probed once per process
# --------------------------------------------------------------------------------------------------

_caps_lock = threading.Lock()
_caps: dict | None = None
_uid_lock = threading.Lock()
_uid_next = 0
_uids_in_use: set[int] = set()


def _probe_netns() -> list[str] | None:
    """The unshare(1) command line that gives a child an empty network namespace here, if any:
    plain ``--net`` needs root; unprivileged users need a user namespace for it."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    variants = [[unshare, "--net", "--"]] if os.geteuid() == 0 else []
    variants.append([unshare, "--user", "--map-root-user", "--net", "--"])
    for prefix in variants:
        try:
            r = subprocess.run(prefix + [sys.executable, "-I", "-S", "-c", "pass"],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return prefix
    return None


def sandbox_capabilities(refresh: bool = False) -> dict:
    """Which isolation mechanisms are in effect here, probed once by running tiny programs:
    ``netns`` (empty network namespace; ``netns_command`` is the unshare(1) prefix), ``drop_uid``
    (per-run unprivileged uid; needs root), ``nproc`` (whether RLIMIT_NPROC is enforced: the kernel
    ignores it for root and counts all of a user's processes otherwise, so only with ``drop_uid``)
    and ``rlimits`` (the limits applied)."""
    global _caps
    with _caps_lock:
        if _caps is not None and not refresh:
            return dict(_caps)
        prefix = _probe_netns()
        kill_binary = shutil.which("kill")
        caps = {"netns": prefix is not None, "netns_command": prefix,
                "drop_uid": os.geteuid() == 0 and kill_binary is not None, "kill_binary": kill_binary}

        def works(c: dict) -> bool:
            try:
                r = _run("import os, json, math\nprint(os.getuid())\n", timeout_s=10.0, memory_mb=256, cpu_s=None,
                         max_file_bytes=1 << 16, max_procs=8, max_open_files=64, max_output_bytes=4096,
                         guards=True, caps=c)
            except OSError:
                return False
            return r.status == "passed" and (not c["drop_uid"] or r.stdout.strip() != "0")

        # Give up the strongest mechanisms last: first try everything, then without the uid switch
        # (e.g. no CAP_SETUID), then without the namespace.
        for drop_uid, netns in ((caps["drop_uid"], caps["netns"]), (False, caps["netns"]), (False, False)):
            trial = dict(caps, drop_uid=drop_uid, netns=netns, netns_command=prefix if netns else None)
            if works(trial):
                caps = trial
                break
        else:
            caps = dict(caps, drop_uid=False, netns=False, netns_command=None)
        caps["nproc"] = caps["drop_uid"]
        caps["rlimits"] = ["RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE"] + (
            ["RLIMIT_NPROC"] if caps["nproc"] else [])
        _caps = caps
        log.info("sandbox: network namespace %s, unprivileged uid %s, rlimits %s",
                 "on" if caps["netns"] else "off (in-process guard only)",
                 "on" if caps["drop_uid"] else "off", ",".join(caps["rlimits"]))
        return dict(caps)


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
    with a fork loop: kill(-1) reaches all processes the sender may signal in one call)."""
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

    def text(self) -> str:
        if self.total <= len(self.head) + len(self.tail):
            raw = bytes(self.head + self.tail)
        else:
            skipped = self.total - len(self.head) - len(self.tail)
            raw = bytes(self.head) + f"\n...[{skipped} bytes truncated]...\n".encode() + bytes(self.tail)
        return raw.decode("utf-8", errors="replace")


def run_untrusted(code: str, *, timeout_s: float = 5.0, memory_mb: int = 512, cpu_s: float | None = None,
                  max_file_bytes: int = 1 << 20, max_procs: int = 32, max_open_files: int = 64,
                  max_output_bytes: int = 1 << 16, guards: bool = True) -> SandboxResult:
    """Run `code` as ``__main__`` in a fresh sandboxed Python process and wait for it.

    timeout_s: wall-clock limit; the whole process group (and, with a dropped uid, every process of
        that uid) is killed when it passes. cpu_s: RLIMIT_CPU, default ceil(timeout_s) + 1.
    memory_mb: RLIMIT_AS of each process. max_file_bytes: RLIMIT_FSIZE. max_procs: RLIMIT_NPROC
        where the kernel enforces it, and the fork budget of the in-process guard.
    max_open_files: RLIMIT_NOFILE. max_output_bytes: kept of stdout and of stderr each.
    guards: install the in-process guards (network, writes outside the directory, exec, signals);
        only tests of the OS-level mechanisms turn them off.
    """
    if timeout_s <= 0 or memory_mb <= 0 or max_procs <= 0:
        raise ValueError(f"timeout_s, memory_mb and max_procs must be positive: {timeout_s}, {memory_mb}, {max_procs}")
    return _run(code, timeout_s=timeout_s, memory_mb=memory_mb, cpu_s=cpu_s, max_file_bytes=max_file_bytes,
                max_procs=max_procs, max_open_files=max_open_files, max_output_bytes=max_output_bytes,
                guards=guards, caps=sandbox_capabilities())


def _run(code: str, *, timeout_s, memory_mb, cpu_s, max_file_bytes, max_procs, max_open_files,
         max_output_bytes, guards, caps) -> SandboxResult:
    start = time.monotonic()
    isolation = ["process_group", "rlimits"] + (["netns"] if caps["netns"] else []) + (
        ["drop_uid"] if caps["drop_uid"] else []) + (["guards"] if guards else [])
    uid = _acquire_uid() if caps["drop_uid"] else None
    uid_cleaned = False
    workdir = tempfile.mkdtemp(prefix="megapmp-sandbox-")
    proc = None
    try:
        program = os.path.join(workdir, PROGRAM_NAME)
        with open(program, "w", encoding="utf-8") as f:
            f.write(code)
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(program, uid, uid)
        rlimits = {
            "RLIMIT_AS": int(memory_mb) << 20,
            "RLIMIT_CPU": int(math.ceil(cpu_s if cpu_s is not None else timeout_s + 1)),
            "RLIMIT_FSIZE": int(max_file_bytes),
            "RLIMIT_NOFILE": int(max_open_files),
            "RLIMIT_CORE": 0,
        }
        if caps["drop_uid"]:
            rlimits["RLIMIT_NPROC"] = int(max_procs)
        cfg = {"program": program, "uid": uid, "guards": guards, "max_procs": int(max_procs),
               "rlimits": rlimits, "exit_memory": _EXIT_MEMORY, "exit_setup": _EXIT_SETUP,
               "memory_marker": _MEMORY_MARKER}
        argv = [sys.executable, "-I", "-S", "-B", "-c", _BOOTSTRAP, json.dumps(cfg), PROGRAM_NAME]
        if caps["netns"]:
            argv = caps["netns_command"] + argv
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "LC_ALL": "C.UTF-8"}
        try:
            proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True, close_fds=True)
        except OSError as exc:
            return SandboxResult("error", None, "", f"sandbox: could not start: {exc}",
                                 time.monotonic() - start, tuple(isolation))
        out, err, timed_out = _communicate(proc, start + timeout_s, max_output_bytes, uid, caps)
        uid_cleaned = True
        rc = proc.returncode
        seconds = time.monotonic() - start
        return SandboxResult(_status(rc, timed_out, err.text()), rc, out.text(), err.text(), seconds,
                             tuple(isolation))
    finally:
        if proc is not None and proc.poll() is None:
            _kill_group(proc.pid)
            proc.wait()
        if uid is not None:
            if not uid_cleaned:
                _kill_uid(uid, caps["kill_binary"])
            _release_uid(uid)
        _rmtree(workdir)


def _communicate(proc, deadline, limit, uid, caps):
    out, err = _Capture(limit), _Capture(limit)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    timed_out = False
    exited_at = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if proc.poll() is not None and exited_at is None:
                # The program is done; whatever it left running goes now, so the pipes reach EOF.
                exited_at = now
                _kill_group(proc.pid)
                if uid is not None:
                    _kill_uid(uid, caps["kill_binary"])
            if exited_at is not None and now - exited_at > 2.0:
                break  # a descendant we could not kill still holds a pipe: stop reading
            if exited_at is None and now >= deadline:
                timed_out = True
                break
            wait = 0.05 if exited_at is not None else min(deadline - now, 0.05)
            for key, _ in sel.select(max(wait, 0.0)):
                data = os.read(key.fileobj.fileno(), 65536)
                if data:
                    key.data.add(data)
                else:
                    sel.unregister(key.fileobj)
    finally:
        sel.close()
        if timed_out or proc.poll() is None:
            _kill_group(proc.pid)
            if uid is not None:
                _kill_uid(uid, caps["kill_binary"])
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    return out, err, timed_out


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


def humaneval_program(solution_code: str, test_code: str, entry_point: str, nonce: str = "") -> str:
    """The HumanEval check program: solution, tests, ``check(entry_point)``, then the end marker."""
    program = f"{solution_code}\n\n{test_code}\n\ncheck({entry_point})\n"
    if nonce:
        program += f"print({nonce!r})\n"
    return program


def run_tests(solution_code: str, test_code: str, entry_point: str, timeout_s: float = 5.0,
              **limits) -> SandboxResult:
    """Run a HumanEval-style program (solution + tests + ``check(entry_point)``) in the sandbox.

    ``passed`` requires exit 0 *and* a random end marker printed after ``check`` returned, so a
    solution that calls ``exit(0)`` / ``os._exit(0)`` part-way does not pass. `limits` go to
    `run_untrusted`. The program's line numbers are those of `humaneval_program` (tracebacks in
    stderr refer to ``prog.py``).
    """
    nonce = "megapmp-tests-done-" + secrets.token_hex(8)
    result = run_untrusted(humaneval_program(solution_code, test_code, entry_point, nonce),
                           timeout_s=timeout_s, **limits)
    if result.status == "passed" and (not result.stdout.strip() or result.stdout.strip().splitlines()[-1] != nonce):
        return SandboxResult("failed", result.returncode, result.stdout,
                             result.stderr + "\nsandbox: the program exited before the tests completed\n",
                             result.seconds, result.isolation)
    if result.stdout.rstrip().endswith(nonce):
        stdout = result.stdout.rstrip()[: -len(nonce)]
        result = SandboxResult(result.status, result.returncode, stdout, result.stderr, result.seconds,
                               result.isolation)
    return result
