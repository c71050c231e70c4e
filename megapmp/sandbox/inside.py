"""The trusted code that runs inside the sandbox, before (and around) the untrusted code.

`runner.py` starts ``python -I -S -B -c LOADER SETUP_FD RUN_ID`` inside the namespaces; the loader reads
this file's text and a JSON set-up from the descriptor and calls `main(setup)`. Standard library only:
nothing of megapmp is importable in there. Importing this module elsewhere runs nothing (the tests use
its codec).

Every sandboxed process goes through the same steps, in this order:

1. ``build_root`` (unshare backend only; bubblewrap does the same from its command line): a new root
   holding only what a Python program needs, read-only (the interpreter's installation, ``/usr``, the
   ``/lib`` directories, the dynamic loader's cache, ``/etc/localtime``), a ``/dev`` of six device
   nodes, a ``/proc`` of the sandbox's own PID namespace and ONE sized tmpfs at ``/tmp`` (``/dev/shm`` and
   ``/var/tmp`` are links to it, so every byte a program can store counts against one budget), bounded
   in files too (each holds kernel memory its size does not count). Under bubblewrap, which sizes bytes
   only, ``mount_sized_tmpfs`` puts such a tmpfs over its ``/tmp``.
2. Privileges: a root caller's process becomes a per-run uid; an unprivileged caller's (unshare backend)
   enters a nested user namespace and drops every capability; ``no_new_privs``.
3. ``install_syscall_filter``: a seccomp filter refusing ``unshare``/``clone`` with ``CLONE_NEWUSER``,
   ``setns`` and ``clone3`` (whose flags a filter cannot read; the C library falls back to ``clone``), so no
   process of the run gets capabilities over new mounts again (an unsized tmpfs, a writable root); and
   refusing the kernel's stores that no namespace or limit of ours bounds or hides: System V shared
   memory, semaphores and message queues (storage outside RLIMIT_AS and the tmpfs: 32,000 sets of
   32,000 semaphores are allowed per namespace, about 2 MB of kernel memory each), memory files
   (``memfd_create``, ``memfd_secret``: files of the kernel's internal tmpfs, which the run's tmpfs does not
   count, RLIMIT_FSIZE each, as many as descriptors; no Python program needs them: libffi tries one
   only where it may not map memory writable and executable, and then falls back to a temporary file,
   in ``/tmp``) and the keyrings (``add_key``,
   ``request_key``, ``keyctl``: the caller's session keyring is inherited, and its keys are readable
   whatever the uid).
4. rlimits (``RLIMIT_NPROC`` holds per run: a per-run uid, or the run's own user namespace, in which the
   kernel counts a uid's processes separately since Linux 5.14).
5. ``supervise``: the process forks; the parent stays as a tiny supervisor that reaps every child and
   reports the program's end as an exit status. The program is never PID 1 (the kernel ignores SIGXCPU
   for a namespace's init), and a program killed at the CPU hard limit (it ignored SIGXCPU) is reported as
   having hit the CPU limit (``EXIT_CPU``), not as an anonymous SIGKILL. It also ends the run when the
   caller dies (end of file on a lifeline pipe only the caller can write).
6. The in-process guards (a second layer against accidents: sockets, writes outside ``/tmp``, exec,
   signals outside the sandbox, a fork budget).
   Then one byte on a pipe that only the caller reads says the set-up is complete, and the pipe is
   closed: from here on, an exit with ``EXIT_SETUP`` is the program's own, a failure like any other.
7. The role:

   * ``program`` (`run_untrusted`): the code runs as ``__main__``.
   * ``candidate`` (`run_tests`, `run_doctests`): the solution is loaded as a module, then the process
     answers requests on a private pipe: call a function with plain-data arguments, look names up, run a
     doctest example. Every answer is plain data (`encode`), never an object.
   * ``judge``: the trusted side of a test run, in a sandbox of its own that the candidate cannot
     reach. It runs the problem's test code against proxies whose calls cross to the candidate and come
     back as plain data rebuilt here (`decode`), and writes the verdict to a descriptor only it holds.
"""

import os
import struct
import sys

EXIT_MEMORY = 93  # the program raised MemoryError
EXIT_SETUP = 94  # the sandbox could not be set up (trusted only before the set-up byte: runner._Process)
EXIT_CPU = 95  # the program was killed at its CPU-time limit
MEMORY_MARKER = "MemoryError (sandbox memory limit)"
CPU_MARKER = "sandbox: CPU time limit reached"

# --------------------------------------------------------------------------------------------------
# Plain data: the only thing that crosses from a candidate to the tests
# --------------------------------------------------------------------------------------------------
#
# One value is a tag byte and its payload; lengths and counts are 4-byte little-endian unsigned:
#   N None   T True   F False
#   i int    length, then that many bytes, little-endian two's complement
#   f float  8 bytes, IEEE 754 binary64 little-endian (nan, inf and -0.0 cross exactly)
#   c complex  16 bytes: the real part, then the imaginary part, each as for a float
#   s str    length, then UTF-8 (lone surrogates kept: "surrogatepass")
#   b bytes  length, then the bytes
#   l list / t tuple / S set / Z frozenset: count, then the items
#   d dict   count, then key, value, key, value, ...
# Decoding is strict: unknown tags, lengths past the end, trailing bytes, unhashable keys and nesting
# deeper than MAX_DEPTH are errors, never guesses. An instance of a subclass of one of these types (a
# namedtuple, a Counter) is encoded as its base type's value through the base type's own methods, so
# none of the subclass's code decides what crosses.

MAX_DEPTH = 100
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")


class PlainDataError(ValueError):
    """A value that is not plain data, or bytes that are not a valid encoding of one."""


def encode(value, limit: int = 1 << 24) -> bytes:
    """The encoding of `value`, or PlainDataError naming where (``result[2]['k']``) it is not plain."""
    out = bytearray()
    _encode(value, out, 0, limit)
    if len(out) > limit:
        raise PlainDataError(f"larger than {limit} bytes")
    return bytes(out)


def _encode(value, out: bytearray, depth: int, limit: int) -> None:
    if depth > MAX_DEPTH:
        raise PlainDataError(f"nested deeper than {MAX_DEPTH} levels")
    if len(out) > limit:
        raise PlainDataError(f"larger than {limit} bytes")
    kind = type(value)
    if value is None:
        out += b"N"
    elif kind is bool:
        out += b"T" if value else b"F"
    elif isinstance(value, int):
        raw = int.to_bytes(value, int.bit_length(value) // 8 + 1, "little", signed=True)
        out += b"i" + _U32.pack(len(raw)) + raw
    elif isinstance(value, float):
        out += b"f" + _F64.pack(value)
    elif isinstance(value, complex):  # through complex's own descriptors: a subclass may redefine .real
        out += b"c" + _F64.pack(complex.real.__get__(value)) + _F64.pack(complex.imag.__get__(value))
    elif isinstance(value, str):
        raw = str.encode(value, "utf-8", "surrogatepass")
        out += b"s" + _U32.pack(len(raw)) + raw
    elif isinstance(value, bytes):
        raw = bytes(memoryview(value))
        out += b"b" + _U32.pack(len(raw)) + raw
    elif isinstance(value, dict):
        items = list(dict.items(value))
        out += b"d" + _U32.pack(len(items))
        for key, item in items:
            _encode_item(key, out, depth, limit, f"[{key!r:.40}] (key)" if _printable(key) else "[key]")
            _encode_item(item, out, depth, limit, f"[{key!r:.40}]" if _printable(key) else "[...]")
    else:
        for base, tag in ((list, b"l"), (tuple, b"t"), (set, b"S"), (frozenset, b"Z")):
            if isinstance(value, base):
                items = list(base.__iter__(value))
                out += tag + _U32.pack(len(items))
                for i, item in enumerate(items):
                    _encode_item(item, out, depth, limit, f"[{i}]")
                return
        raise PlainDataError(f"a {_type_name(value)} object is not plain data")


def _encode_item(value, out, depth, limit, where) -> None:
    try:
        _encode(value, out, depth + 1, limit)
    except PlainDataError as e:
        e.args = (where + e.args[0] if e.args[0].startswith("[") else f"{where}: {e.args[0]}",)
        raise
    except RecursionError:
        raise PlainDataError(f"{where}: nested too deeply to encode") from None


def _printable(key) -> bool:
    return type(key) in (str, int, bool, float) or key is None


def _type_name(value) -> str:
    kind = type(value)
    module = getattr(kind, "__module__", "?")
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def decode(data: bytes):
    """The value `data` encodes; PlainDataError for anything that is not exactly one valid encoding."""
    view = memoryview(data)
    value, end = _decode(view, 0, 0)
    if end != len(view):
        raise PlainDataError(f"{len(view) - end} bytes after the value")
    return value


def _take(view, pos: int, n: int) -> tuple[memoryview, int]:
    if n < 0 or pos + n > len(view):
        raise PlainDataError("truncated encoding")
    return view[pos:pos + n], pos + n


def _count(view, pos: int) -> tuple[int, int]:
    raw, pos = _take(view, pos, 4)
    n = _U32.unpack(raw)[0]
    if n > len(view) - pos:  # every item takes at least one byte: no huge allocation from a forged count
        raise PlainDataError("a count larger than the data")
    return n, pos


def _decode(view, pos: int, depth: int):
    if depth > MAX_DEPTH:
        raise PlainDataError(f"nested deeper than {MAX_DEPTH} levels")
    tag, pos = _take(view, pos, 1)
    tag = tag.tobytes()
    if tag == b"N":
        return None, pos
    if tag == b"T":
        return True, pos
    if tag == b"F":
        return False, pos
    if tag in (b"i", b"s", b"b"):
        n, pos = _count(view, pos)
        raw, pos = _take(view, pos, n)
        if tag == b"i":
            return int.from_bytes(raw, "little", signed=True), pos
        if tag == b"b":
            return raw.tobytes(), pos
        try:
            return str(raw, "utf-8", "surrogatepass"), pos
        except UnicodeDecodeError:
            raise PlainDataError("a string that is not UTF-8") from None
    if tag == b"f":
        raw, pos = _take(view, pos, 8)
        return _F64.unpack(raw)[0], pos
    if tag == b"c":
        raw, pos = _take(view, pos, 16)
        return complex(_F64.unpack(raw[:8])[0], _F64.unpack(raw[8:])[0]), pos
    if tag in (b"l", b"t", b"S", b"Z", b"d"):
        n, pos = _count(view, pos)
        items = []
        for _ in range(2 * n if tag == b"d" else n):
            item, pos = _decode(view, pos, depth + 1)
            items.append(item)
        try:
            if tag == b"d":
                return dict(zip(items[0::2], items[1::2])), pos
            return (items if tag == b"l" else {b"t": tuple, b"S": set, b"Z": frozenset}[tag](items)), pos
        except TypeError:  # an unhashable key or member
            raise PlainDataError("an unhashable dict key or set member") from None
    raise PlainDataError(f"unknown tag {tag!r}")


# -- frames on a pipe: 4-byte big-endian length, then the encoding ----------------------------------


class ChannelClosed(EOFError):
    """The other side's process is gone (end of file on the pipe)."""


def send(fd: int, value, limit: int) -> None:
    send_encoded(fd, encode(value, limit))


def send_encoded(fd: int, payload: bytes) -> None:
    data = memoryview(struct.pack(">I", len(payload)) + payload)
    while data:
        data = data[os.write(fd, data):]


def encode_tuple(*encoded: bytes) -> bytes:
    """The encoding of a tuple whose items are already encoded (no value is encoded twice)."""
    return b"t" + _U32.pack(len(encoded)) + b"".join(encoded)


def receive(fd: int, limit: int):
    header = _read_exactly(fd, 4)
    if header is None:
        raise ChannelClosed("end of file")
    n = struct.unpack(">I", header)[0]
    if n > limit:
        raise PlainDataError(f"a message of {n} bytes, over the limit of {limit}")
    payload = _read_exactly(fd, n)
    if payload is None:
        raise ChannelClosed("end of file inside a message")
    return decode(payload)


def _read_exactly(fd: int, n: int):
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------------------------------
# Set-up: file system, privileges, system calls, rlimits
# --------------------------------------------------------------------------------------------------


def _libc():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    def call(what, fn, *args):
        if fn(*args) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
    return ctypes, libc, call


_SYSCALLS = {  # machine: (seccomp audit arch, unshare, clone, clone3, setns, pivot_root, mount_setattr)
    "x86_64": (0xC000003E, 272, 56, 435, 308, 155, 442),
    "aarch64": (0xC00000B7, 97, 220, 435, 268, 41, 442),
}
# machine: {system call: number} (the kernel's arch/x86/entry/syscalls/syscall_64.tbl and
# include/uapi/asm-generic/unistd.h), see step 3. Only the calls that create a System V object are
# refused: every process of a run shares one fresh IPC namespace of its own, so semop, semctl, shmat,
# msgsnd and the rest have nothing to act on.
_REFUSED_SYSCALLS = {
    "x86_64": {"shmget": 29, "msgget": 68, "semget": 64, "memfd_create": 319, "memfd_secret": 447,
               "add_key": 248, "request_key": 249, "keyctl": 250},
    "aarch64": {"shmget": 194, "msgget": 186, "semget": 190, "memfd_create": 279, "memfd_secret": 447,
                "add_key": 217, "request_key": 218, "keyctl": 219},
}
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    0x1, 0x2, 0x4, 0x8, 0x20, 0x1000, 0x4000, 0x40000)
MNT_DETACH = 2


def build_root(layout: dict) -> None:
    """unshare backend: pivot into a new root built from `layout` (runner._root_layout), the way
    bubblewrap does it. We hold CAP_SYS_ADMIN over this mount namespace only."""
    ctypes, libc, call = _libc()
    nrs = _SYSCALLS.get(os.uname().machine)
    if nrs is None:
        raise OSError(f"no pivot_root number for {os.uname().machine}")

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    def mount(source, target, fstype, flags, data=None):
        call(f"mount {target}", libc.mount, source.encode() if source else None, target.encode(),
             fstype.encode() if fstype else None, ctypes.c_ulong(flags), data.encode() if data else None)

    def read_only(path, recursive, nodev=True):
        # mount_setattr applies to a whole bind-mounted tree at once (a remount would miss submounts).
        attr = MountAttr(0x1 | 0x2 | (0x4 if nodev else 0), 0, 0, 0)  # MOUNT_ATTR_RDONLY | NOSUID | NODEV
        call(f"mount_setattr {path}", libc.syscall, ctypes.c_long(nrs[6]), ctypes.c_int(-100), path.encode(),
             ctypes.c_uint(0x8000 if recursive else 0), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))

    def pivot_root(new, old):
        call("pivot_root", libc.syscall, ctypes.c_long(nrs[5]), new.encode(), old.encode())

    def make_target(path, is_dir):
        parent = os.path.dirname(path)
        os.makedirs(parent, mode=0o755, exist_ok=True)
        if is_dir:
            os.makedirs(path, mode=0o755, exist_ok=True)
        elif not os.path.exists(path):
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))

    os.umask(0o022)
    # A scratch root holding the new root and, after the first pivot, the host's root at /oldroot.
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
    os.chdir("/tmp")
    os.mkdir("newroot")
    os.mkdir("oldroot")
    mount("tmpfs", "newroot", "tmpfs", MS_NOSUID | MS_NODEV, "size=256k,mode=755")
    pivot_root("/tmp", "/tmp/oldroot")
    os.chdir("/")
    for src, dest in layout["binds"]:
        host = "/oldroot" + src
        if not os.path.exists(host):
            continue
        make_target("/newroot" + dest, os.path.isdir(host))
        mount(host, "/newroot" + dest, None, MS_BIND | MS_REC)
        read_only("/newroot" + dest, recursive=True)
    for name in layout["devices"]:
        make_target("/newroot/dev/" + name, False)
        mount("/oldroot/dev/" + name, "/newroot/dev/" + name, None, MS_BIND)
        read_only("/newroot/dev/" + name, recursive=False, nodev=False)
    for target, link in layout["symlinks"]:
        os.makedirs(os.path.dirname("/newroot" + link), mode=0o755, exist_ok=True)
        os.symlink(target, "/newroot" + link)
    os.makedirs("/newroot/proc", mode=0o555, exist_ok=True)
    mount("proc", "/newroot/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs("/newroot/tmp", mode=0o755, exist_ok=True)
    mount("tmpfs", "/newroot/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
          "size=%dk,nr_inodes=%d,mode=700" % (layout["tmpfs_kb"], layout["tmpfs_inodes"]))
    # Forget the host's root, then make the new root the root (bubblewrap's sequence).
    mount(None, "/oldroot", None, MS_REC | MS_PRIVATE)
    call("umount /oldroot", libc.umount2, b"/oldroot", MNT_DETACH)
    os.chdir("/newroot")
    pivot_root(".", ".")
    call("umount the scratch root", libc.umount2, b".", MNT_DETACH)
    os.chdir("/")
    read_only("/", recursive=False)


def mount_sized_tmpfs(path: str, size_kb: int, inodes: int) -> None:
    """bubblewrap backend: put over its tmpfs at `path` one bounded in files as well as in bytes
    (bubblewrap sizes bytes only, and every file holds kernel memory the size does not count), in a mount
    namespace of our own; the CAP_SYS_ADMIN bubblewrap left us for this is dropped in the next step."""
    ctypes, libc, call = _libc()
    call("unshare(CLONE_NEWNS)", libc.unshare, 0x00020000)
    call(f"mount {path}", libc.mount, b"tmpfs", path.encode(), b"tmpfs", ctypes.c_ulong(MS_NOSUID | MS_NODEV),
         b"size=%dk,nr_inodes=%d,mode=700" % (size_kb, inodes))


def drop_to_uid(uid: int) -> None:
    """Root caller: become the per-run uid. In --unsafe-no-sandbox mode the directories above the standard
    library (e.g. /root/.pyenv) may not be searchable by that uid: keep them reachable by descriptor."""
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


def drop_capabilities(inner_uid: int) -> None:
    """Unprivileged caller (unshare backend): we are root of our own user namespace. Enter a nested one,
    where the mounts made above are locked, appear there as an ordinary uid, and drop every capability."""
    ctypes, libc, call = _libc()
    call("unshare(CLONE_NEWUSER)", libc.unshare, 0x10000000)
    for name, text in (("setgroups", "deny"), ("uid_map", "%d 0 1" % inner_uid), ("gid_map", "%d 0 1" % inner_uid)):
        with open("/proc/self/" + name, "w") as f:
            f.write(text)
    clear_capabilities()


def clear_capabilities() -> None:
    """Drop every capability of this process (effective, permitted, inheritable; the ambient ones go
    with the permitted)."""
    ctypes, libc, call = _libc()

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
    call("capset", libc.capset, ctypes.byref(Header(0x20080522, 0)), (Data * 2)())  # _LINUX_CAPABILITY_VERSION_3


def no_new_privs() -> None:
    _, libc, call = _libc()
    call("prctl(PR_SET_NO_NEW_PRIVS)", libc.prctl, 38, 1, 0, 0, 0)


def install_syscall_filter() -> None:
    """Install the seccomp filter of step 3 (needs no_new_privs first). Other system calls are untouched."""
    ctypes, libc, call = _libc()
    nrs = _SYSCALLS.get(os.uname().machine)
    if nrs is None:
        raise OSError(f"no seccomp filter for {os.uname().machine}")
    arch, unshare, clone, clone3, setns = nrs[:5]
    refused = (setns, *_REFUSED_SYSCALLS[os.uname().machine].values())
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JGE|K, JMP|JSET|K, RET|K
    allow, kill, errno = 0x7FFF0000, 0x80000000, 0x00050000  # SECCOMP_RET_ALLOW, _KILL_PROCESS, _ERRNO
    eperm, enosys, clone_newuser = 1, 38, 0x10000000
    program = [  # (code, jump if true, jump if false, k); jumps count from the next instruction
        (ld, 0, 0, 4),  # 0: A = seccomp_data.arch
        (jeq, 1, 0, arch),  # 1
        (ret, 0, 0, kill),  # 2: another ABI (i386 on x86_64): never
        (ld, 0, 0, 0),  # 3: A = seccomp_data.nr
        (jge, 0, 1, 0x40000000),  # 4: the x32 ABI's numbers
        (ret, 0, 0, kill),  # 5
        (jeq, 0, 1, clone3),  # 6
        (ret, 0, 0, errno | enosys),  # 7: its flags are in memory; the C library falls back to clone
    ]
    for nr in refused:
        program += [(jeq, 0, 1, nr), (ret, 0, 0, errno | eperm)]
    program += [
        (jeq, 1, 0, unshare),
        (jeq, 0, 3, clone),
        (ld, 0, 0, 16),  # A = low word of args[0], the flags of unshare and clone
        (jset, 0, 1, clone_newuser),
        (ret, 0, 0, errno | eperm),
        (ret, 0, 0, allow),
    ]

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]
    filters = (SockFilter * len(program))(*[SockFilter(*insn) for insn in program])
    fprog = SockFprog(len(program), filters)
    call("prctl(PR_SET_SECCOMP)", libc.prctl, 22, 2, ctypes.byref(fprog), 0, 0)  # SECCOMP_MODE_FILTER


def set_rlimits(rlimits: dict) -> None:
    import resource
    for name, value in rlimits.items():
        res = getattr(resource, name)
        _, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard - 1 if name == "RLIMIT_CPU" else hard)
        # CPU: soft < hard, so the soft limit delivers SIGXCPU first; the hard one SIGKILL (see supervise).
        resource.setrlimit(res, (value, value + 1 if name == "RLIMIT_CPU" else value))


def supervise(cpu_limit: float | None, lifeline: int | None) -> None:
    """Fork. The child returns and becomes the program; this process reaps every child until the program
    is gone and exits with its status: its exit code, ``EXIT_CPU`` for a death at the CPU limit (SIGXCPU,
    or SIGKILL at the hard limit after ignoring SIGXCPU, told apart from other kills by the CPU time the
    kernel accounted), else 128 + the signal. It holds no descriptor of the program's but stdout and
    stderr, so a peer sees end of file on a pipe as soon as the program's last process is gone.

    `lifeline`: the read end of a pipe whose write end only the caller holds. End of file on it means the
    caller is gone (killed too: the kernel closes its descriptors), and this process leaves at once, and
    the run with it (it is the PID namespace's first process, or bubblewrap's only child). A parent-death
    signal cannot do this: the kernel clears it when a process changes uid, as the bootstrap does. Not
    dumpable, so the program (same uid) cannot reopen the lifeline through /proc and hold it open."""
    import ctypes
    import select
    import signal
    libc = ctypes.CDLL(None)
    dumpable = libc.prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0, before the fork: the program never sees us dumpable
    pid = os.fork()
    if pid == 0:
        libc.prctl(4, dumpable, 0, 0, 0)  # the program as it was (the judge stays not dumpable)
        if lifeline is not None:
            os.close(lifeline)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP})
    for low, high in ((3, lifeline), (lifeline + 1, 1 << 16)) if lifeline is not None else ((3, 1 << 16),):
        os.closerange(low, high)
    # Woken by the program's end (its pidfd), by the caller's, and every 0.2 s to reap orphans (as PID 1 of
    # the namespace they are ours, and until reaped they count against the process limit).
    poller = select.poll()
    try:
        program = os.pidfd_open(pid)
        poller.register(program, select.POLLIN)
    except (AttributeError, OSError):  # Linux < 5.3: the 0.2 s tick notices the program's end too
        pass
    if lifeline is not None:
        poller.register(lifeline, select.POLLIN)
    while True:
        if any(fd == lifeline for fd, _ in poller.poll(200)):
            os._exit(EXIT_SETUP)  # the caller is gone; nobody reads this status
        while True:
            try:
                child, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                os._exit(EXIT_SETUP)
            if child == 0:
                break
            if child == pid:
                _exit_as(status, usage, cpu_limit)


def _exit_as(status: int, usage, cpu_limit: float | None) -> None:
    """supervise: leave with the program's way of ending (see there)."""
    import signal
    if os.WIFEXITED(status):
        os._exit(os.WEXITSTATUS(status))
    sig = os.WTERMSIG(status)
    cpu = usage.ru_utime + usage.ru_stime
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_limit is not None and cpu >= cpu_limit - 0.05):
        os.write(2, ("\n%s (%.1f s)\n" % (CPU_MARKER, cpu)).encode())
        os._exit(EXIT_CPU)
    os._exit(128 + sig)


# --------------------------------------------------------------------------------------------------
# In-process guards: a second layer, against accidents rather than adversaries
# --------------------------------------------------------------------------------------------------


def install_guards(workdir: str, max_procs: int) -> None:
    import builtins
    import errno
    import io

    import _socket

    class SandboxViolation(PermissionError):
        """An operation the sandbox refuses (network, writes outside the working directory, ...)."""
    builtins.SandboxViolation = SandboxViolation

    # -- network: every socket constructor and resolver raises --------------------------------------
    def _no_net(*a, **k):
        raise SandboxViolation("network access is disabled in the sandbox")

    class _NoSocket(_socket.socket):
        __slots__ = ()  # socket.socket subclasses this and declares __weakref__ itself

        def __new__(cls, *a, **k):
            _no_net()

        def __init__(self, *a, **k):
            _no_net()
    _socket.socket = _socket.SocketType = _NoSocket
    for name in ("socketpair", "fromfd", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
                 "gethostbyaddr", "getnameinfo", "create_connection", "create_server"):
        if hasattr(_socket, name):
            setattr(_socket, name, _no_net)

    # -- filesystem: writes and destructive calls only below the working directory ---------------
    real = os.path.realpath
    allowed_files = {"/dev/null"}

    def resolve(path, dir_fd=None):
        path = os.fsdecode(os.fspath(path))
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(os.readlink("/proc/self/fd/%d" % dir_fd), path)
        return real(os.path.join(os.getcwd(), path))

    def check(path, what, dir_fd=None):
        if isinstance(path, int):
            return
        full = resolve(path, dir_fd)
        if full in allowed_files or full == workdir or full.startswith(workdir + os.sep):
            return
        raise SandboxViolation("sandbox: %s outside the working directory refused: %r" % (what, full))

    _open = builtins.open

    def open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            check(file, "open(%r)" % mode)
        return _open(file, mode, *args, **kwargs)
    builtins.open = io.open = open

    _FileIO = io.FileIO

    class FileIO(_FileIO):
        def __init__(self, file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                check(file, "FileIO(%r)" % mode)
            super().__init__(file, mode, *args, **kwargs)
    io.FileIO = FileIO

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    _os_open = os.open

    def os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags:
            check(path, "os.open for writing", dir_fd)
        return _os_open(path, flags, mode, dir_fd=dir_fd)
    os.open = os_open

    def guard_paths(name, npaths):
        fn = getattr(os, name, None)
        if fn is None:
            return

        def wrapper(*args, **kwargs):
            shared = kwargs.get("dir_fd")
            dir_fds = (kwargs.get("src_dir_fd", shared), kwargs.get("dst_dir_fd", shared))
            for i, p in enumerate(args[:npaths]):
                check(p, "os.%s" % name, dir_fds[min(i, 1)])
            return fn(*args, **kwargs)
        wrapper.__name__ = name
        setattr(os, name, wrapper)
    for name in ("remove", "unlink", "rmdir", "mkdir", "chmod", "chown", "lchown", "truncate",
                 "utime", "mkfifo", "mknod", "removexattr", "setxattr"):
        guard_paths(name, 1)
    for name in ("rename", "replace", "link", "symlink"):
        guard_paths(name, 2)

    # -- processes: no exec, a fixed budget of forks, signals only to our own group ---------------
    def no_spawn(*a, **k):
        raise SandboxViolation("starting programs is disabled in the sandbox")
    for name in ("system", "popen", "execv", "execve", "execvp", "execvpe", "execl", "execle",
                 "execlp", "execlpe", "posix_spawn", "posix_spawnp", "spawnv", "spawnve",
                 "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "forkpty"):
        if hasattr(os, name):
            setattr(os, name, no_spawn)
    import _posixsubprocess
    _posixsubprocess.fork_exec = no_spawn

    # A pipe holding one byte per allowed fork, shared by every descendant; once the bytes are gone
    # (the write end is closed, so an empty pipe reads as EOF) fork fails like the kernel's.
    tokens_r, tokens_w = os.pipe()
    os.write(tokens_w, b"x" * max_procs)
    os.close(tokens_w)
    _fork = os.fork

    def fork():
        if not os.read(tokens_r, 1):
            raise BlockingIOError(errno.EAGAIN, "sandbox: process limit reached")
        return _fork()
    os.fork = fork

    _kill, _killpg, group = os.kill, os.killpg, os.getpgrp()

    def kill(pid, sig):
        if pid not in (0, -group) and (pid < 0 or group != os.getpgid(pid)):
            raise SandboxViolation("sandbox: signals outside the sandbox are refused")
        return _kill(pid, sig)

    def killpg(pgid, sig):
        if pgid not in (0, group):
            raise SandboxViolation("sandbox: signals outside the sandbox are refused")
        return _killpg(pgid, sig)
    os.kill, os.killpg = kill, killpg


# --------------------------------------------------------------------------------------------------
# Roles
# --------------------------------------------------------------------------------------------------


def _program_traceback(exc: BaseException, program_path: str):
    """`exc`'s traceback from the program's first frame on: none of this file's frames above it."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != program_path:
        tb = tb.tb_next
    return tb


def _print_exception(exc: BaseException, program_path: str) -> None:
    import traceback
    traceback.print_exception(type(exc), exc, _program_traceback(exc, program_path))


def _memory_exit() -> None:
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    os.write(2, ("\n%s\n" % MEMORY_MARKER).encode())
    os._exit(EXIT_MEMORY)


def run_program(code, program_path: str) -> None:
    """`run_untrusted`: the code is the ``__main__`` module; its exit status is the run's."""
    import types
    main = types.ModuleType("__main__")
    main.__file__ = program_path
    sys.modules["__main__"] = main
    try:
        exec(code, main.__dict__)
    except SystemExit:
        raise
    except MemoryError:
        _memory_exit()
    except BaseException as exc:
        try:
            _print_exception(exc, program_path)
        except MemoryError:
            _memory_exit()
        sys.exit(1)


def serve_candidate(text: str, program_path: str, cfg: dict) -> None:
    """The candidate side: load the solution, then answer the judge's requests until it hangs up.

    Nothing here is trusted by the judge: whatever this process sends, the judge only ever holds the
    plain values it decodes. The solution's module is not ``__main__`` (as in HumanEval's own harness), so
    a demonstration block under ``if __name__ == "__main__":`` does not run."""
    _Candidate(text, program_path, cfg).serve()


class _Candidate:
    """The solution's module and the answers to the judge's requests, each one encoded plain data:
    ``("ready",)`` or ``("load_error", ...)`` first, then per request ``("names", {...})``, ``("ok", value)``,
    ``("raise", type name, message, traceback)``, ``("exit", code)``, ``("nonplain", reason)``, ..."""

    def __init__(self, text: str, program_path: str, cfg: dict):
        import types
        self.text, self.program_path = text, program_path
        self.requests, self.answers = cfg["channel"]["requests"], cfg["channel"]["answers"]
        self.limit = cfg["max_message_bytes"]
        module = types.ModuleType("solution")
        module.__file__ = program_path
        sys.modules["solution"] = module
        self.namespace = module.__dict__
        self.doctest_globals: dict | None = None

    def serve(self) -> None:
        try:
            exec(compile(self.text, self.program_path, "exec"), self.namespace)
        except BaseException as exc:  # a syntax error too: the solution's failure, reported to the judge
            self.answer(("load_error",) + self.failure(exc))
            self.leave(1)
        self.answer(("ready",))
        handlers = {"lookup": self.lookup, "call": self.call, "doctest_globals": self.fresh_doctest_globals,
                    "doctest_example": self.doctest_example}
        while True:
            try:
                request = receive(self.requests, self.limit)
            except ChannelClosed:
                self.leave(0)
            handler = handlers.get(request[0]) if isinstance(request, tuple) and request else None
            if handler is None:
                self.answer(("nonplain", f"unknown request {request!r:.100}"))
                continue
            self.answer_encoded(handler(*request[1:]))
            try:
                sys.stdout.flush()  # the program's own output, kept in order even if the process is killed next
            except BaseException:
                pass

    def leave(self, status: int) -> None:
        try:
            sys.stdout.flush()
        except BaseException:
            pass
        os._exit(status)

    def answer(self, value) -> None:
        try:
            self.answer_encoded(encode(value, self.limit))
        except PlainDataError as e:
            self.answer_encoded(encode(("nonplain", str(e)), self.limit))

    def answer_encoded(self, encoded: bytes) -> None:
        try:
            send_encoded(self.answers, encoded)
        except BrokenPipeError:  # the judge is done (or gave up on us): nothing left to answer
            self.leave(0)

    def plain(self, tag: str, value) -> bytes:
        """``(tag, value)`` encoded, or a ``nonplain`` answer saying why `value` cannot cross."""
        try:
            encoded = encode_tuple(encode(tag), encode(value, self.limit))
            if len(encoded) > self.limit:
                raise PlainDataError(f"larger than {self.limit} bytes")
            return encoded
        except (PlainDataError, RecursionError) as e:
            return encode(("nonplain", str(e) if isinstance(e, PlainDataError) else "nested too deeply"))

    def failure(self, exc: BaseException) -> tuple:
        import traceback
        if isinstance(exc, MemoryError):
            _memory_exit()
        if isinstance(exc, SystemExit):
            return ("exit", _short(repr(exc.code), 200))
        text = "".join(traceback.format_exception(type(exc), exc, _program_traceback(exc, self.program_path)))
        try:
            message = str(exc)
        except BaseException:
            message = "<the exception's message could not be formatted>"
        return ("raise", type(exc).__name__, _short(message, 2000), _short(text, 8000))

    def lookup(self, names) -> bytes:
        import types
        found = {}
        for name in names:
            if not isinstance(name, str) or name not in self.namespace:
                continue
            value = self.namespace[name]
            if isinstance(value, types.ModuleType):
                found[name] = ("module", value.__name__)
            elif callable(value):
                found[name] = ("callable",)
            else:
                try:
                    found[name] = ("value", decode(encode(value, self.limit)))
                except (PlainDataError, RecursionError):
                    found[name] = ("other", _type_name(value))
        return self.plain("names", found)

    def call(self, name, args, kwargs) -> bytes:
        try:
            if name not in self.namespace:
                raise NameError(f"name {name!r} is not defined")
            result = self.namespace[name](*args, **kwargs)
        except BaseException as exc:
            return encode(self.failure(exc))
        return self.plain("ok", result)

    def fresh_doctest_globals(self) -> bytes:
        self.doctest_globals = dict(self.namespace)  # each definition's doctests get a copy, as doctest gives
        return encode(("ok", None))

    def doctest_example(self, source, filename) -> bytes:
        return encode(_run_example(source, filename, self.doctest_globals, self.failure))


def _run_example(source: str, filename: str, globs: dict, failure) -> tuple:
    """One doctest example, as doctest.DocTestRunner runs it: compiled in "single" mode (an expression's
    value is printed by displayhook), its output captured. Returns ("ok", output) or
    ("raised", output, the exception's last line) or an exit/memory failure."""
    import io
    import traceback
    captured = io.StringIO()
    real_stdout, real_displayhook = sys.stdout, sys.displayhook
    sys.stdout = captured
    sys.displayhook = sys.__displayhook__
    try:
        exec(compile(source, filename, "single", dont_inherit=True), globs)
    except BaseException as exc:
        if isinstance(exc, (SystemExit, MemoryError)):
            sys.stdout = real_stdout
            return failure(exc)
        try:
            last = traceback.format_exception_only(type(exc), exc)[-1]
        except BaseException:
            last = type(exc).__name__ + "\n"
        return ("raised", _short(captured.getvalue(), 100_000), _short(last, 10_000))
    finally:
        sys.stdout, sys.displayhook = real_stdout, real_displayhook
    return ("ok", _short(captured.getvalue(), 100_000))


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + "...[truncated]"


class SolutionFault(BaseException):
    """The candidate's process broke the protocol, returned something that is not plain data, exited
    or died. A BaseException, so that ``except Exception`` in a test does not swallow it; the judge
    records it too, so that no ``except`` can turn it into a pass."""


class SolutionError(Exception):
    """An exception the solution raised whose type is not a builtin exception of the same name."""


class Judge:
    """The test side of the channel: `call` crosses to the candidate and returns the plain value."""

    def __init__(self, cfg: dict):
        self.requests, self.answers = cfg["channel"]["requests"], cfg["channel"]["answers"]
        self.limit = cfg["max_message_bytes"]
        self.fault: str | None = None
        self.calls = 0

    def _fail(self, reason: str):
        reason = _short(reason, 2000)  # its text is partly the solution's (a type's name): bounded here
        if self.fault is None:
            self.fault = reason
        raise SolutionFault(reason)

    def exchange(self, request, what):
        """Send `request` (a value, or its encoding) and return the answer; `what` names the request in a
        failure (a string, or a function making it: a call's arguments are only described if needed)."""
        if self.fault is not None:
            raise SolutionFault(self.fault)
        describe = what if callable(what) else (lambda: what)
        try:
            send_encoded(self.requests, request if isinstance(request, bytes) else encode(request, self.limit))
        except BrokenPipeError:
            self._fail(f"the solution's process ended before {describe()}")
        try:
            answer = receive(self.answers, self.limit)
        except ChannelClosed:
            self._fail(f"the solution's process ended during {describe()}")
        except PlainDataError as e:
            self._fail(f"{describe()} answered with bytes that are not plain data ({e})")
        except MemoryError:
            self._fail(f"{describe()} answered with a value too large to rebuild in the tests' memory")
        if not (isinstance(answer, tuple) and answer and isinstance(answer[0], str)):
            self._fail(f"{describe()} answered with a malformed message")
        return answer

    def first_message(self) -> tuple:
        """``("ready",)``, the solution's load failure, ``("gone",)``, or ``("garbled", why)`` for anything
        else the candidate's side may have written first."""
        try:
            first = receive(self.answers, self.limit)
        except ChannelClosed:
            return ("gone",)
        except (PlainDataError, MemoryError) as e:
            return ("garbled", str(e))
        if not (isinstance(first, tuple) and first and isinstance(first[0], str)):
            return ("garbled", "not a message")
        return first

    def call(self, name: str, args: tuple, kwargs: dict):
        def what():
            return f"the call {name}({_describe_args(args, kwargs)})"
        try:
            request = encode(("call", name, tuple(args), dict(kwargs)), self.limit)
        except PlainDataError as e:
            raise TypeError(f"{what()}: an argument is not plain data ({e}); only plain data crosses to the "
                            "solution") from None
        self.calls += 1
        answer = self.exchange(request, what)
        tag = answer[0]
        if tag == "ok" and len(answer) == 2:
            return answer[1]
        if tag == "raise" and len(answer) == 4 and all(isinstance(a, str) for a in answer[1:]):
            raise _rebuild_exception(answer[1], answer[2], answer[3])
        if tag == "nonplain" and len(answer) == 2 and isinstance(answer[1], str):
            self._fail(f"{what()} returned a value that is not plain data: {answer[1]}")
        if tag == "exit" and len(answer) == 2 and isinstance(answer[1], str):
            self._fail(f"the solution exited (SystemExit {answer[1]}) during {what()}")
        self._fail(f"{what()} answered with a malformed message")


def _describe_args(args, kwargs) -> str:
    parts = [_short(repr(a), 60) for a in args] + [f"{k}={_short(repr(v), 60)}" for k, v in kwargs.items()]
    return _short(", ".join(parts), 200)


def _rebuild_exception(type_name: str, message: str, traceback_text: str) -> BaseException:
    """The builtin exception of that name, so tests that expect one (``except ValueError``) still work;
    anything else as SolutionError. Never StopIteration: raised inside a test's ``map`` or ``filter`` it
    would end the iteration silently, turning ``all(map(...))`` into True."""
    import builtins
    kind = getattr(builtins, type_name, None)
    exc = None
    if isinstance(kind, type) and issubclass(kind, Exception) and not issubclass(kind, (StopIteration,
                                                                                        StopAsyncIteration)):
        try:
            exc = kind(message)
        except Exception:
            exc = None
    if exc is None:
        exc = SolutionError(f"{type_name}: {message}")
    exc.solution_traceback = traceback_text
    return exc


class Remote:
    """What the tests hold instead of the solution's function: calling it runs the solution's function in
    the candidate's process; the result is the plain value rebuilt here."""

    def __init__(self, judge: Judge, name: str):
        self.__judge, self.__name__ = judge, name
        self.__qualname__ = name

    def __call__(self, *args, **kwargs):
        return self.__judge.call(self.__name__, args, kwargs)

    def __repr__(self):
        return f"<the solution's {self.__name__}>"


def _free_names(*sources: str) -> list[str]:
    """The global names the code reads and does not bind at its top level (Python's own scoping, from
    symtable), builtins excepted: those stay the real ones, whatever the solution defines."""
    import builtins
    import symtable
    read, bound = set(), set()
    for source in sources:
        if not source:
            continue
        top = symtable.symtable(source, "<tests>", "exec")
        tables = [top]
        while tables:
            table = tables.pop()
            tables.extend(table.get_children())
            for symbol in table.get_symbols():
                if table is top:
                    if symbol.is_assigned() or symbol.is_imported():
                        bound.add(symbol.get_name())
                    if symbol.is_referenced():
                        read.add(symbol.get_name())
                elif symbol.is_global() and symbol.is_referenced():
                    read.add(symbol.get_name())
    return sorted(read - bound - set(dir(builtins)))


def _report(verdict_fd: int, record: dict) -> None:
    """One JSON line to the caller: an example's outcome as soon as it is known, the verdict last."""
    import json
    data = json.dumps(record).encode() + b"\n"
    while data:
        data = data[os.write(verdict_fd, data):]


def _print_test_failure(exc: BaseException, program_path: str) -> None:
    traceback_text = getattr(exc, "solution_traceback", None)
    if traceback_text:
        sys.stderr.write(traceback_text.rstrip("\n") + "\n\nThe solution raised it in this test:\n")
    _print_exception(exc, program_path)


def judge_tests(cfg: dict, program_path: str) -> None:
    """`run_tests`: the problem's test code, run here against proxies of the solution."""
    import builtins
    verdict_fd = cfg["verdict_fd"]
    judge = Judge(cfg)
    tests = cfg["tests"]
    prompt, test_code, entry_point, test_line = tests["prompt"], tests["test"], tests["entry_point"], tests["test_line"]
    first = judge.first_message()
    if first[0] != "ready":
        reason = _load_failure(first)
        sys.stderr.write(f"sandbox: {reason}\n")
        _report(verdict_fd, {"passed": False, "reason": reason, "calls": 0})
        return
    try:
        wanted = sorted(set(_free_names(prompt, test_code)) | {entry_point})
        names = judge.exchange(("lookup", wanted), "the look-up of the names the tests use")
        if not (names[0] == "names" and len(names) == 2 and isinstance(names[1], dict)
                and all(isinstance(k, str) for k in names[1])):
            judge._fail("the look-up of names answered with a malformed message")
        namespace = {"__name__": "__tests__", "__builtins__": builtins}
        for name in wanted:  # only the names asked for: the answer cannot add any (say, a builtin's name)
            found = names[1].get(name)
            if not isinstance(found, tuple) or not found:
                continue
            if found[0] == "callable":
                namespace[name] = Remote(judge, name)
            elif found[0] == "value" and len(found) == 2:
                namespace[name] = found[1]
            elif found[0] == "module" and found == ("module", name):  # `import math` in the solution
                try:
                    namespace[name] = __import__(name)  # this side's own copy of the module
                except ImportError:
                    pass
        if prompt:
            # The problem's own prompt (its helpers, e.g. HumanEval/32's poly) runs here, trusted: a
            # solution that redefines a helper the tests call changes nothing but its own copy.
            exec(compile(prompt, program_path, "exec"), namespace)
        if names[1].get(entry_point) != ("callable",):
            raise NameError(f"the solution defines no function {entry_point!r}")
        namespace[entry_point] = Remote(judge, entry_point)
        exec(compile("\n" * (test_line - 1) + test_code, program_path, "exec"), namespace)
        check = namespace.get("check")
        if callable(check) and not isinstance(check, Remote):  # HumanEval; MBPP-style tests asserted above
            check(namespace[entry_point])
    except BaseException as exc:
        if judge.fault is None and not isinstance(exc, SolutionFault):
            _print_test_failure(exc, program_path)
        reason = judge.fault or f"{type(exc).__name__}: {_short(str(exc), 300)}"
        if judge.fault:
            sys.stderr.write(f"sandbox: {judge.fault}\n")
        _report(verdict_fd, {"passed": False, "reason": reason, "calls": judge.calls})
        return
    if judge.fault:  # a test caught the fault and went on: still a failure
        sys.stderr.write(f"sandbox: {judge.fault}\n")
        _report(verdict_fd, {"passed": False, "reason": judge.fault, "calls": judge.calls})
    else:
        _report(verdict_fd, {"passed": True, "reason": None, "calls": judge.calls})


def _load_failure(first) -> str:
    """The reason for a first message that is not ``("ready",)``; its parts are checked, and bounded: the
    text is the solution's."""
    if first[0] == "load_error" and all(isinstance(part, str) for part in first):
        if first[1] == "raise" and len(first) == 5:
            sys.stderr.write(first[4])
            return f"the solution failed while loading: {_short(first[2], 200)}: {_short(first[3], 300)}"
        if first[1] == "exit" and len(first) == 3:
            return f"the solution exited (SystemExit {_short(first[2], 200)}) while loading"
    if first[0] == "gone":
        return "the solution's process ended before the tests started"
    return "the solution's process sent a malformed first message"


def judge_doctests(cfg: dict, program_path: str) -> None:
    """`run_doctests`: every doctest example of the source's definitions, each run in the candidate's
    process, its output compared here with doctest's own checker. Reports one record per example."""
    import doctest
    verdict_fd = cfg["verdict_fd"]
    judge = Judge(cfg)
    first = judge.first_message()
    if first[0] != "ready":
        reason = _load_failure(first)
        sys.stderr.write(f"sandbox: {reason}\n")
        _report(verdict_fd, {"passed": False, "reason": reason})
        return
    plan = cfg["doctests"]
    checker = doctest.OutputChecker()
    try:
        for name, examples in plan:
            judge.exchange(("doctest_globals",), f"the set-up of {name}'s doctests")
            for index, (source, want, exc_msg, options) in enumerate(examples):
                flags = 0
                for flag_name, on in options.items():
                    flag = doctest.OPTIONFLAGS_BY_NAME[flag_name]
                    flags = flags | flag if on else flags & ~flag
                if flags & doctest.SKIP:
                    continue
                what = f"the doctest example {name}[{index}]"
                answer = judge.exchange(("doctest_example", source, f"<doctest {name}[{index}]>"), what)
                ok, got = _example_outcome(judge, answer, want, exc_msg, flags, checker, what)
                _report(verdict_fd, {"test": name, "index": index, "ok": ok, "got": got[-500:]})
    except SolutionFault:
        sys.stderr.write(f"sandbox: {judge.fault}\n")
    _report(verdict_fd, {"passed": judge.fault is None, "reason": judge.fault})


def _example_outcome(judge, answer, want, exc_msg, flags, checker, what) -> tuple[bool, str]:
    """doctest.DocTestRunner's decision for one example, on the plain output the candidate sent."""
    import doctest
    tag = answer[0]
    if tag == "ok" and len(answer) == 2 and isinstance(answer[1], str):
        got = answer[1]
        return checker.check_output(want, got, flags), got
    if tag == "raised" and len(answer) == 3 and all(isinstance(a, str) for a in answer[1:]):
        got, raised = answer[1], answer[2]
        if exc_msg is None:
            return False, got + raised
        if checker.check_output(exc_msg, raised, flags):
            return True, got + raised
        if flags & doctest.IGNORE_EXCEPTION_DETAIL:
            strip = doctest._strip_exception_details
            return checker.check_output(strip(exc_msg), strip(raised), flags), got + raised
        return False, got + raised
    if tag == "exit" and len(answer) == 2 and isinstance(answer[1], str):
        judge._fail(f"the solution exited (SystemExit {answer[1]}) during {what}")
    judge._fail(f"{what} answered with a malformed message")


# --------------------------------------------------------------------------------------------------
# Entry point (called by runner._LOADER)
# --------------------------------------------------------------------------------------------------


def main(setup: dict) -> None:
    cfg, text = setup["cfg"], setup["program"]
    role = cfg["role"]
    try:
        if cfg["root_layout"] is not None:
            build_root(cfg["root_layout"])
        if cfg["tmpfs"] is not None:
            try:
                mount_sized_tmpfs(cfg["sandbox_dir"], cfg["tmpfs"]["size_kb"], cfg["tmpfs"]["inodes"])
            except OSError:  # a kernel or a security policy that refuses it: bubblewrap's tmpfs stays, and the
                pass  # probe, which counts its files, names the storage budget as not given here
        if cfg["uid"] is not None:
            if cfg["sandbox_dir"] is not None:
                os.chown(cfg["sandbox_dir"], cfg["uid"], cfg["uid"])  # the fresh tmpfs becomes the uid's own
            drop_to_uid(cfg["uid"])
        elif cfg["drop_capabilities"]:
            drop_capabilities(cfg["nested_uid"])
        elif cfg["clear_capabilities"]:
            clear_capabilities()
        if cfg["sandbox_dir"] is not None:
            no_new_privs()
            os.chdir(cfg["sandbox_dir"])
            if cfg["seccomp"]:
                install_syscall_filter()
        workdir = os.path.realpath(os.getcwd())
        program_path = os.path.join(workdir, cfg["program"])
        # A lone surrogate (generated text may hold one) has no UTF-8: written as its own bytes, it is
        # the program's failure when compiled below, not the set-up's.
        with open(program_path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(text)
        if role == "judge":
            import ctypes
            ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no ptrace, no /proc/PID/mem by the same uid
        set_rlimits(cfg["rlimits"])
        supervise(cfg["rlimits"].get("RLIMIT_CPU"), cfg["lifeline_fd"])
        if cfg["guards"]:
            install_guards(workdir, cfg["max_procs"])
        # The set-up is complete: say so on a pipe that only the caller reads, and close the last end the
        # run holds (the supervisor closed its copy), so nothing the program does can unsay it.
        os.write(cfg["set_up_fd"], b"1")
        os.close(cfg["set_up_fd"])
    except BaseException:
        import traceback
        sys.stderr.write("sandbox setup failed:\n")
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(EXIT_SETUP)
    del setup
    if role == "program":
        try:
            code = compile(text, program_path, "exec")
        except (SyntaxError, ValueError) as exc:  # the program's failure (a lone surrogate: UnicodeEncodeError)
            _print_exception(exc, program_path)
            sys.exit(1)
        del text
        run_program(code, program_path)
    elif role == "candidate":
        serve_candidate(text, program_path, cfg)
    elif role == "judge":
        if cfg.get("doctests") is not None:
            judge_doctests(cfg, program_path)
        else:
            judge_tests(cfg, program_path)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
