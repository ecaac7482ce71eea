"""Run a command confined: Linux namespaces and an allow-list root, made with ctypes.

    python -I .../hauler/security/sandbox.py [--ro PATH]... [--rw PATH]... -- COMMAND...

`confined_command` returns that argv; the server runs it as an ordinary child, so nothing
happens in the server's own (multi-threaded) process. The launcher uses only the standard
library, and `-I` keeps the server's environment and working directory out of it.

How. The launcher unshares a user, PID, network, IPC and UTS namespace, maps the caller's uid
and gid to 0 inside, and forks. The child is PID 1 of the new PID namespace: it unshares a mount
namespace, builds a root on a tmpfs, `pivot_root`s into it, detaches the old root, drops every
capability and execs the command with a minimal environment. The launcher waits for it, kills it
if it is itself told to stop (SIGKILL also reaches it: PR_SET_PDEATHSIG), and exits with its
status. Killing PID 1 kills the namespace, so when the launcher returns no process of the
command is left, and the files it wrote can no longer change.

Why a user namespace even as root: the command ends with no capability at all (bounding set
dropped before exec, no_new_privs), so it cannot mount, unmount, remount rw, mknod, ptrace or
change uid; the capabilities the setup needs exist only in that namespace, over what it owns.

Why an allow-list root rather than hiding paths: a deny-list misses what nobody thought of (a
new key, a socket, a mounted secret). The new root holds only /usr and its merged-/usr links,
a few /etc files, the Python installation (prefixes and the sys.path entries outside them;
an entry holding the hauler package, such as a repository of an editable install, is narrowed
to the package directory), the package directory, and the caller's paths. Everything is bound
at its own absolute path, read-only, nosuid, nodev, except the `--rw` paths; /tmp and /dev/shm
are fresh tmpfs, /dev holds null, zero, random and urandom; / itself is read-only.

Why a PID namespace: the fresh, read-only /proc shows the namespace's own processes only, so
the server's /proc/PID/root (a door to every file it sees), fd, environ and mem do not exist.
The network namespace has a loopback that is down: no connection anywhere, the server's own
ports and abstract unix sockets included.

Not protected: CPU, memory and the disk under a `--rw` path are bounded only by rlimits and
the file system (no cgroup); time is the caller's to bound; there is no seccomp filter, so a
kernel bug reachable from a user namespace is an escape. The command runs as the caller's uid
outside, so what it writes belongs to the caller, and must be read as hostile input.

Fails closed: when the kernel refuses any step (user namespaces disabled or restricted by
AppArmor, an unsupported architecture) the launcher exits CANNOT_CONFINE with the reason on
stderr, and never runs the command unconfined; a command's own CANNOT_CONFINE becomes 1.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import platform
import resource
import select
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from hauler.core.errors import SecurityError

CANNOT_CONFINE = 125  # the launcher's status when it could not confine; never the command's
_LAUNCHER = Path(__file__).resolve()
_HAULER_DIR = _LAUNCHER.parent.parent
_TAIL_BYTES = 4096

_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 1, 2, 4, 8, 32
_MS_NOATIME, _MS_NODIRATIME, _MS_BIND, _MS_REC = 1 << 10, 1 << 11, 1 << 12, 1 << 14
_MS_PRIVATE, _MS_RELATIME, _MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
_MNT_DETACH = 2
_PR_SET_PDEATHSIG, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 1, 24, 38
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "arm64": 41, "riscv64": 41}
_SYS_KEYCTL = {"x86_64": 250, "aarch64": 219, "arm64": 219, "riscv64": 219}
_KEYCTL_JOIN_SESSION_KEYRING = 1
# statvfs reports a mount's flags with its own bit values; a remount must repeat those the
# user namespace locked (ro, nosuid, nodev, noexec, atime), or the kernel refuses it
_KEPT_FLAGS = (
    (os.ST_RDONLY, _MS_RDONLY),
    (os.ST_NOSUID, _MS_NOSUID),
    (os.ST_NODEV, _MS_NODEV),
    (os.ST_NOEXEC, _MS_NOEXEC),
    (os.ST_NOATIME, _MS_NOATIME),
    (os.ST_NODIRATIME, _MS_NODIRATIME),
    (os.ST_RELATIME, _MS_RELATIME),
)

_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
_ETC = ("ld.so.cache", "localtime", "passwd", "group", "nsswitch.conf")
_DEVICES = ("null", "zero", "random", "urandom")
_REFUSED = ("/proc", "/sys", "/dev")  # never bound from the host
_BASE, _OLD, _NEW = "/tmp", "/oldroot", "/newroot"  # the scaffold between the two pivots


def confined_command(
    argv: Sequence[str], *, readable: Sequence[Path] = (), writable: Sequence[Path] = ()
) -> list[str]:
    """The argv that runs `argv` confined: it sees the Python installation and `readable`
    read-only, `writable` read-write, and nothing else (no network, no other process)."""
    options: list[str] = []
    for flag, paths in (("--ro", readable), ("--rw", writable)):
        for path in map(Path, paths):
            if not path.is_absolute() or not path.exists():
                raise ValueError(f"{path}: a confined command's paths must exist and be absolute")
            options += [flag, str(path)]
    return [sys.executable, "-I", str(_LAUNCHER), *options, "--", *argv]


def check_available() -> None:
    """Raise SecurityError if commands cannot be confined here (tried once, then cached)."""
    reason = _unavailable_reason()
    if reason is not None:
        raise unavailable(reason)


def unavailable(detail: str) -> SecurityError:
    """The error for a server that cannot confine job code, and what to do about it."""
    from hauler.core.errors import SecurityError  # here: the launcher runs without the package

    return SecurityError(
        f"this server cannot confine job code here ({detail.strip() or 'no reason given'}), so "
        "it runs none: build round 0 where the job is submitted (the default: leave out [model] "
        'build = "server"), or upload it with `hauler submit --initial-model FILE`; or let the '
        "server confine job code by enabling unprivileged user namespaces (user."
        "max_user_namespaces > 0, kernel.unprivileged_userns_clone = 1 where it exists, and no "
        "AppArmor restriction: kernel.apparmor_restrict_unprivileged_userns = 0)"
    )


@functools.cache
def _unavailable_reason() -> str | None:
    try:
        done = subprocess.run(
            confined_command([sys.executable, "-c", "pass"]),
            timeout=120,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    except (OSError, subprocess.SubprocessError) as error:
        return f"the launcher did not run: {error}"
    if done.returncode == 0:
        return None
    tail = done.stderr[-_TAIL_BYTES:].decode(errors="replace").strip()
    return tail or f"the launcher exited {done.returncode}"


# The launcher: everything below runs in `python -I sandbox.py`, standard library only.

_libc = ctypes.CDLL(None, use_errno=True)


def _failed(what: str) -> OSError:
    """The error of the libc call that just failed, saying which step it was."""
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}")


def _call(result: int, what: str) -> None:
    if result != 0:
        raise _failed(what)


def _c(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


def _mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    _call(
        _libc.mount(_c(source), _c(target), _c(fstype), ctypes.c_ulong(flags), _c(data)),
        f"mount {target}",
    )


def _prctl(option: int, value: int) -> int:
    args = (ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    return _libc.prctl(ctypes.c_int(option), *args)


def _pivot_root(new_root: str, put_old: str) -> None:
    number = _SYS_PIVOT_ROOT[platform.machine()]
    _call(
        _libc.syscall(ctypes.c_long(number), new_root.encode(), put_old.encode()),
        f"pivot_root {new_root}",
    )


def _mirror(path: str, links: dict[str, str], depth: int = 0) -> str:
    """The real path behind `path`; each symbolic link met on the way goes into `links` (path:
    its text), so that recreated in the new root they resolve as they do outside."""
    parts, current = [p for p in path.split("/") if p not in ("", ".")], "/"
    for index, part in enumerate(parts):
        if part == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        if os.path.islink(candidate):
            if depth > 40:
                raise OSError(errno.ELOOP, f"{path}: too many levels of symbolic links")
            links[candidate] = target = os.readlink(candidate)
            base = "" if target.startswith("/") else current
            return _mirror("/".join([base, target, *parts[index + 1 :]]), links, depth + 1)
        current = candidate
    return current


def _python_paths() -> list[str]:
    """What the child's Python needs: its installation, its sys.path, the hauler package."""
    paths = [sys.base_prefix, sys.prefix, sys.executable, str(_HAULER_DIR)]
    inside = str(_HAULER_DIR) + "/"
    return paths + [
        entry
        for entry in sys.path
        if os.path.exists(entry) and not inside.startswith(os.path.join(os.path.abspath(entry), ""))
    ]


def _plan(readable: list[str], writable: list[str]) -> tuple[dict[str, bool], dict[str, str]]:
    """Real paths to bind (path: writable) and the symbolic links leading to them."""
    system = [p for p in _SYSTEM if os.path.lexists(p)]
    system += [p for name in _ETC if os.path.exists(p := f"/etc/{name}")]
    binds: dict[str, bool] = {}
    links: dict[str, str] = {}
    for path, rw in [(p, False) for p in system + _python_paths() + readable] + [
        (p, True) for p in writable
    ]:
        real = _mirror(path, links)
        if real == "/" or any(real == r or real.startswith(r + "/") for r in _REFUSED):
            raise ValueError(f"{path}: refusing to bind {real} into a confined root")
        if not os.path.exists(real):
            raise FileNotFoundError(2, f"{path}: no such file or directory")
        binds[real] = binds.get(real, False) or rw
    return binds, links


def _bind(source: str, target: str, *, writable: bool, devices: bool = False) -> None:
    """Bind `source` on `target`, then remount it ro (unless writable), nosuid, nodev."""
    if os.path.isdir(source):
        os.makedirs(target, 0o755, exist_ok=True)
    elif not os.path.exists(target):
        os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
    _mount(source, target, None, _MS_BIND)
    found = os.statvfs(target).f_flag
    flags = sum(ms for st, ms in _KEPT_FLAGS if found & st)
    if not flags & (_MS_NOATIME | _MS_RELATIME):
        flags |= _MS_STRICTATIME
    flags |= _MS_NOSUID | (0 if devices else _MS_NODEV) | (0 if writable else _MS_RDONLY)
    _mount(None, target, None, _MS_BIND | _MS_REMOUNT | flags)


def _fresh_mounts() -> None:
    """The new root's own file systems: /tmp, /dev and its few devices, /dev/shm, /proc."""
    _mount("tmpfs", _NEW + "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=1777,size=512m")
    _mount("tmpfs", _NEW + "/dev", "tmpfs", _MS_NOSUID | _MS_NOEXEC, "mode=0755,size=64k")
    for name in _DEVICES:
        _bind(f"{_OLD}/dev/{name}", f"{_NEW}/dev/{name}", writable=True, devices=True)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"{_NEW}/dev/{name}")
    os.mkdir(_NEW + "/dev/shm")
    _mount("tmpfs", _NEW + "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=1777,size=64m")
    try:  # read-only, so root-owned files in it (sysctls, sysrq-trigger) cannot be written
        _mount("proc", _NEW + "/proc", "proc", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    except OSError:
        pass  # some containers forbid a new proc; an empty /proc gives the command less


def _build_root(binds: dict[str, bool], links: dict[str, str]) -> None:
    """Pivot into a scaffold tmpfs holding the old root, fill a new root from it, pivot again."""
    _call(_libc.unshare(_CLONE_NEWNS), "unshare mount namespace")
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    _mount("tmpfs", _BASE, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0700,size=1m")
    for folder in (_OLD, _NEW):
        os.mkdir(_BASE + folder, 0o755)
    _pivot_root(_BASE, _BASE + _OLD)
    os.chdir("/")
    _mount("tmpfs", _NEW, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=4m")
    for folder in ("tmp", "dev", "proc"):
        os.mkdir(f"{_NEW}/{folder}", 0o755)
    _fresh_mounts()
    _bind_all(binds)
    for path, target in links.items():
        if not any(path.startswith(b + "/") for b in binds) and not os.path.lexists(_NEW + path):
            os.makedirs(os.path.dirname(_NEW + path), 0o755, exist_ok=True)
            os.symlink(target, _NEW + path)
    os.mkdir(_NEW + _OLD)
    _pivot_root(_NEW, _NEW + _OLD)
    os.chdir("/")
    _call(_libc.umount2(_OLD.encode(), _MNT_DETACH), "umount the old root")
    os.rmdir(_OLD)
    _mount(None, "/", None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)


def _bind_all(binds: dict[str, bool]) -> None:
    """Bind parents before children; skip a path its nearest bound parent already gives."""
    done: list[tuple[str, bool]] = []
    for path in sorted(binds):
        rw = binds[path]
        parents = [mode for bound, mode in done if path.startswith(bound + "/")]
        if not (parents and parents[-1] == rw):
            _bind(_OLD + path, _NEW + path, writable=rw)
            done.append((path, rw))


def _leave_session_keyring() -> None:
    """A new, empty session keyring: the caller's keys are not the command's to possess."""
    number = _SYS_KEYCTL[platform.machine()]
    if _libc.syscall(ctypes.c_long(number), _KEYCTL_JOIN_SESSION_KEYRING, None) < 0:
        if ctypes.get_errno() != errno.ENOSYS:  # without keyrings there is nothing to leave
            raise _failed("keyctl(KEYCTL_JOIN_SESSION_KEYRING)")


def _drop_privileges() -> None:
    """No capability survives exec, none can be regained; rlimits bound a little damage."""
    for capability in range(64):
        if _prctl(_PR_CAPBSET_DROP, capability) != 0:
            if ctypes.get_errno() != errno.EINVAL:
                raise _failed(f"prctl(PR_CAPBSET_DROP, {capability})")
            break  # EINVAL: past the last capability this kernel knows
    _call(_prctl(_PR_SET_NO_NEW_PRIVS, 1), "prctl(PR_SET_NO_NEW_PRIVS)")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    files = 1024 if hard == resource.RLIM_INFINITY else min(1024, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))


def _environment() -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1",
        "PYTHONPATH": str(_HAULER_DIR.parent),
    }


def _enter_namespaces() -> None:
    """Unshare every namespace but the mount one (the child's), and map our ids to 0 inside."""
    uid, gid = os.getuid(), os.getgid()
    flags = _CLONE_NEWUSER | _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS
    _call(_libc.unshare(ctypes.c_int(flags)), "unshare user, PID and network namespaces")
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as handle:
            handle.write(text)


def _child(
    command: list[str], plan: tuple[dict[str, bool], dict[str, str]], errors: int, alive: int
) -> NoReturn:
    """PID 1 of the namespace: build the root, drop privileges, exec; or say why not."""
    try:
        _call(_prctl(_PR_SET_PDEATHSIG, signal.SIGKILL), "prctl(PR_SET_PDEATHSIG)")
        if select.select([alive], [], [], 0)[0]:
            os._exit(CANNOT_CONFINE)  # the launcher died before PR_SET_PDEATHSIG took hold
        os.close(alive)
        os.setsid()  # no controlling terminal: no TIOCSTI into the operator's shell
        _call(_libc.sethostname(b"sandbox", 7), "sethostname")
        _leave_session_keyring()
        _build_root(*plan)
        _drop_privileges()
        os.closerange(3, errors)
        os.closerange(errors + 1, 2**31 - 1)
        os.execvpe(command[0], command, _environment())
    except BaseException as error:  # noqa: BLE001 - whatever failed, the command must not run
        os.write(errors, _reason(error).encode(errors="replace"))
    os._exit(CANNOT_CONFINE)


def _supervise(pid: int, errors: int) -> int:
    """Relay PID 1's status; SIGKILL it if we are told to stop; say why setup failed."""
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, lambda *_: _kill(pid))
    message = b""
    while chunk := os.read(errors, 4096):  # closed by exec, or written on failure
        message += chunk
    _, status = os.waitpid(pid, 0)
    if message:
        return _refuse(message.decode(errors="replace"))
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else (1 if code == CANNOT_CONFINE else code)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already reaped
        os.kill(pid, signal.SIGKILL)


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return str(error) or type(error).__name__


def _refuse(reason: str) -> int:
    print(f"hauler sandbox: {reason}", file=sys.stderr, flush=True)
    return CANNOT_CONFINE


def _parse(args: list[str]) -> tuple[list[str], list[str], list[str]]:
    readable: list[str] = []
    writable: list[str] = []
    while args and args[0] in ("--ro", "--rw") and len(args) > 1:
        (readable if args[0] == "--ro" else writable).append(args[1])
        args = args[2:]
    if len(args) < 2 or args[0] != "--":
        raise ValueError("usage: sandbox.py [--ro PATH]... [--rw PATH]... -- COMMAND...")
    return readable, writable, args[1:]


def main(args: list[str]) -> int:
    """The launcher: confine and run the command, or exit CANNOT_CONFINE saying why."""
    try:
        readable, writable, command = _parse(args)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    if sys.platform != "linux" or platform.machine() not in _SYS_PIVOT_ROOT:
        return _refuse(f"unsupported platform {sys.platform} {platform.machine()}")
    try:
        plan = _plan(readable, writable)
        _enter_namespaces()
        errors_r, errors_w = os.pipe()
        alive_r, alive_w = os.pipe()
        pid = os.fork()
    except (OSError, ValueError) as error:
        return _refuse(_reason(error))
    if pid == 0:
        os.close(errors_r)
        os.close(alive_w)
        _child(command, plan, errors_w, alive_r)
    os.close(errors_w)
    os.close(alive_r)
    return _supervise(pid, errors_r)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
