"""Emulated wide-area links between network namespaces, for benchmarks and tests.

This kernel has no netem qdisc, so each link is a `linkemu` process (bench/linkemu/linkemu.c,
compiled here on first use into build/linkemu/) that owns one TUN device in each of two
namespaces and forwards IP packets between them with a one-way delay, a paced rate, random
loss and a drop-tail queue, per direction. Real TCP stacks on both ends see the real RTT.

`wan(links)` makes the topology a federation needs: a server namespace that owns one address,
SERVER_ADDRESS (on its loopback device, so one certificate names it for every site), and one
namespace per site joined to it by that site's own link:

    site-k  wan0 10.211.k.2  <-- linkemu(delay, rate, loss) -->  10.211.k.1 wank  server
    (10.210.0.1)

Everything is removed on exit: linkemu processes by PID (their devices vanish with them), then
the namespaces. Callers stop what they started inside the namespaces before that.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "bench" / "linkemu" / "linkemu.c"
BINARY = REPO / "build" / "linkemu" / "linkemu"
SERVER_ADDRESS = "10.210.0.1"
SERVER_NETWORK = "10.210.0.0/24"
CLONE_NEWNET = 0x40000000
STOP_GRACE_S = 5.0
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class LinkSpec:
    """One emulated link, the same in both directions: one-way delay, rate, loss, queue."""

    delay_ms: float
    rate_mbit: float
    loss: float = 0.0
    queue_bytes: int | None = None  # None: linkemu's default, one bandwidth-delay product

    @property
    def rate_bytes_per_s(self) -> float:
        return self.rate_mbit * 1e6 / 8

    def describe(self) -> str:
        """Short human form, e.g. `30 ms, 448 Mbit/s, 0.1 % loss`."""
        loss = f", {self.loss * 100:g} % loss" if self.loss else ""
        return f"{self.delay_ms:g} ms, {self.rate_mbit:g} Mbit/s{loss}"


@dataclass
class Link:
    """A running linkemu process between two namespaces; `stats` holds its counters once stopped."""

    spec: LinkSpec
    process: subprocess.Popen
    stats: dict[str, Any] = field(default_factory=dict)

    def stop(self) -> dict[str, Any]:
        """SIGTERM by PID (SIGKILL if it lingers); returns the per-direction counters it printed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            output, _ = self.process.communicate(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            output, _ = self.process.communicate()
        lines = [line for line in output.splitlines() if line.startswith("{")]
        self.stats = json.loads(lines[-1]) if lines else {}
        return self.stats


@dataclass
class Topology:
    """Namespaces of a server and its sites, and the link of each site (counters after exit)."""

    server: str
    sites: dict[str, str]
    links: dict[str, Link]
    server_address: str = SERVER_ADDRESS


def unavailable() -> str | None:
    """Why emulated links cannot be made here (for a test's skip), or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces and TUN devices need root"
    for tool in ("ip", "gcc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (no TUN support)"
    probe = f"hlw-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def build() -> Path:
    """Compile linkemu.c with gcc -O2 into build/linkemu/ when missing or older than the source."""
    if BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    partial = BINARY.with_name(
        f".linkemu.{os.getpid()}"
    )  # then rename: concurrent builds never see half a file
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-o", str(partial), str(SOURCE)],
        check=True,
        capture_output=True,
        text=True,
    )
    partial.replace(BINARY)
    return BINARY


def ip(*args: str) -> None:
    """Run `ip ARGS`; a failure raises with ip's own message."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def command_in(namespace: str, command: Sequence[str]) -> list[str]:
    """COMMAND run inside NAMESPACE (`ip netns exec` execs it, so the PID is the command's own)."""
    return ["ip", "netns", "exec", namespace, *command]


def run_in(namespace: str, command: Sequence[str], **options: Any) -> subprocess.CompletedProcess:
    """Run COMMAND inside NAMESPACE to completion (options as for subprocess.run)."""
    return subprocess.run(command_in(namespace, command), **options)


def start_in(namespace: str, command: Sequence[str], **options: Any) -> subprocess.Popen:
    """Start COMMAND inside NAMESPACE in the background (options as for subprocess.Popen)."""
    return subprocess.Popen(command_in(namespace, command), **options)


@contextmanager
def entered(namespace: str) -> Iterator[None]:
    """Move the calling thread into NAMESPACE and back; sockets made inside stay in it."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setns: {os.strerror(error)}")


def socket_in(namespace: str) -> socket.socket:
    """A TCP socket that lives in NAMESPACE, usable from any thread of this process."""
    with entered(namespace):
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


def start_link(spec: LinkSpec, ns_a: str, dev_a: str, ns_b: str, dev_b: str) -> Link:
    """Start linkemu with a TUN device DEV_A in NS_A and DEV_B in NS_B; returns once both exist."""
    command = [
        str(build()),
        "--ns-a",
        ns_a,
        "--dev-a",
        dev_a,
        "--ns-b",
        ns_b,
        "--dev-b",
        dev_b,
        "--delay-ms",
        str(spec.delay_ms),
        "--rate-mbit",
        str(spec.rate_mbit),
        "--loss",
        str(spec.loss),
    ]
    if spec.queue_bytes is not None:
        command += ["--queue-bytes", str(spec.queue_bytes)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if process.stdout.readline().strip() != "READY":
        _, errors = process.communicate(timeout=STOP_GRACE_S)
        raise RuntimeError(f"linkemu did not start: {errors.strip()}")
    return Link(spec, process)


def _join(server: str, site: str, index: int, spec: LinkSpec) -> Link:
    """Link SITE to SERVER (10.211.INDEX.1 <-> .2); the site routes the server's network over it."""
    server_end, site_end, device = f"10.211.{index}.1", f"10.211.{index}.2", f"wan{index}"
    link = start_link(spec, server, device, site, "wan0")
    try:
        ip("-n", server, "addr", "add", server_end, "peer", site_end, "dev", device)
        ip("-n", server, "link", "set", device, "up")
        ip("-n", site, "addr", "add", site_end, "peer", server_end, "dev", "wan0")
        ip("-n", site, "link", "set", "wan0", "up")
        ip("-n", site, "route", "add", SERVER_NETWORK, "dev", "wan0", "src", site_end)
    except RuntimeError:
        link.stop()
        raise
    return link


def _add_namespace(name: str) -> None:
    ip("netns", "add", name)
    ip("-n", name, "link", "set", "lo", "up")


@contextmanager
def wan(links: Mapping[str, LinkSpec], *, prefix: str = "hlw") -> Iterator[Topology]:
    """A server namespace owning SERVER_ADDRESS and one namespace per site, each on its own link."""
    if not 1 <= len(links) <= 254:
        raise ValueError("between 1 and 254 sites")
    tag = uuid.uuid4().hex[:6]
    topology = Topology(server=f"{prefix}-{tag}-server", sites={}, links={})
    made = [topology.server]
    try:
        _add_namespace(topology.server)
        ip("-n", topology.server, "addr", "add", f"{SERVER_ADDRESS}/32", "dev", "lo")
        for index, (site, spec) in enumerate(links.items(), start=1):
            namespace = f"{prefix}-{tag}-{site}"
            made.append(namespace)
            _add_namespace(namespace)
            topology.sites[site] = namespace
            topology.links[site] = _join(topology.server, namespace, index, spec)
        yield topology
    finally:
        for link in topology.links.values():
            link.stop()
        for namespace in made:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
