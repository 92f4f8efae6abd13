"""Test helper: hosts as Linux network namespaces on one virtual switch.

``Lab`` builds, for one test, a namespace ``<tag>-net`` holding a Linux bridge (the
switch, addressed ``198.18.0.1``: the test drives its traffic from there) and one
namespace per host, each joined to the bridge by a veth pair (``eth0`` inside the host).
Addresses come only from 198.18.0.0/15 (RFC 2544, reserved for benchmarking), no
namespace has a default route and IPv6 is off, so nothing can leave the lab; the root
namespace is never touched (every link is created inside the lab's namespaces).

Processes run inside a host with ``ip netns exec``; the test process itself talks from
inside a namespace by running code in a fresh thread that first ``setns``-es into it
(``call_in``, ``run_in``): a network namespace belongs to a thread, and sockets to the
namespace they were created in. ``Lab.cut`` partitions one host from another address
silently — packets in both directions are dropped at the host's ``eth0`` by tc filters,
without an RST or ICMP error, as when a cable or a switch fails — and ``Lab.heal`` undoes
it. Everything is removed by ``Lab.close`` (processes killed, namespaces deleted), also
when the set-up itself fails half-way.

Requires root and iproute2 (``ip``, ``tc``); ``unavailable`` skips locally and fails in
CI (``CI=true``), like ``tests.conftest.require_binary``.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tests.conftest import require_binary, unavailable

T = TypeVar("T")

#: the lab's /24, inside 198.18.0.0/15 (RFC 2544 benchmarking range)
SUBNET = "198.18.0"
SWITCH_ADDRESS = f"{SUBNET}.1"
CLONE_NEWNET = 0x40000000
#: bound on every ``ip``/``tc`` command
COMMAND_TIMEOUT_S = 10.0
#: SIGTERM, then SIGKILL after this long
STOP_GRACE_S = 3.0

_libc = ctypes.CDLL(None, use_errno=True)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment (PATH included) without SDPROXY_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDPROXY_")}
    env.update(extra or {})
    return env


def enter(namespace: str) -> None:
    """Move the calling thread (never the main thread) into network namespace ``namespace``."""
    if threading.current_thread() is threading.main_thread():
        raise RuntimeError("only a dedicated thread may change its network namespace")
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno), namespace)
    finally:
        os.close(fd)


def call_in(namespace: str, fn: Callable[[], T], *, timeout_s: float) -> T:
    """``fn()`` run in a fresh thread inside ``namespace``; TimeoutError after ``timeout_s``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            enter(namespace)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{namespace}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"{fn!r} in {namespace} still running after {timeout_s} s")
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


def run_in(namespace: str, make: Callable[[], Coroutine[Any, Any, T]], *, timeout_s: float) -> T:
    """``asyncio.run(make())`` inside ``namespace``, bounded by ``timeout_s``."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout_s):
            return await make()

    return call_in(namespace, lambda: asyncio.run(bounded()), timeout_s=timeout_s + 10)


@dataclass(frozen=True, kw_only=True)
class Host:
    role: str
    namespace: str
    address: str
    #: the veth end on the bridge, in the switch's namespace
    port: str


@dataclass(kw_only=True)
class Process:
    label: str
    popen: subprocess.Popen[bytes]
    log: Path


class Lab:
    """One test's network: a switch namespace and host namespaces (see the module doc)."""

    def __init__(self, logdir: Path) -> None:
        self.tag = f"sdpt{os.getpid()}{secrets.token_hex(2)}"
        self.net = f"{self.tag}-net"
        self.logdir = logdir
        self.hosts: dict[str, Host] = {}
        self.processes: list[Process] = []
        self._namespaces: list[str] = []

    @classmethod
    def build(cls, logdir: Path, roles: Sequence[str]) -> Lab:
        """Hosts ``roles`` (addresses .11, .12, … in order) on one switch; skips (fails
        in CI) when this machine cannot build network namespaces."""
        if os.geteuid() != 0:
            unavailable("network namespaces need root (ip netns, veth, tc)")
        require_binary("ip", install="apt-get install -y iproute2")
        require_binary("tc", install="apt-get install -y iproute2")
        lab = cls(logdir)
        try:
            lab._add_namespace(lab.net)
        except (subprocess.CalledProcessError, OSError) as exc:
            lab.close()
            unavailable(f"cannot create a network namespace: {_describe(exc)}")
        try:
            lab._ip("-n", lab.net, "link", "add", "br0", "type", "bridge")
            lab._ip("-n", lab.net, "addr", "add", f"{SWITCH_ADDRESS}/24", "dev", "br0")
            lab._ip("-n", lab.net, "link", "set", "br0", "up")
            for index, role in enumerate(roles):
                lab._add_host(role, f"{SUBNET}.{11 + index}", f"p{index}")
            if len(roles) > 1:  # can this kernel drop silently? (tc clsact, u32, mirred)
                first, second = roles[0], roles[1]
                lab.cut(first, lab.hosts[second].address)
                lab.heal(first)
        except (subprocess.CalledProcessError, OSError) as exc:
            lab.close()
            unavailable(f"cannot build the network namespaces: {_describe(exc)}")
        except BaseException:
            lab.close()
            raise
        return lab

    def _add_namespace(self, namespace: str) -> None:
        self._ip("netns", "add", namespace)
        self._namespaces.append(namespace)
        # no IPv6 (no link-local addresses, no router solicitations): only 198.18/15
        call_in(namespace, _disable_ipv6, timeout_s=COMMAND_TIMEOUT_S)
        self._ip("-n", namespace, "link", "set", "lo", "up")

    def _add_host(self, role: str, address: str, port: str) -> None:
        namespace = f"{self.tag}-{role}"
        self._add_namespace(namespace)
        self._ip(
            "-n", self.net, "link", "add", port, "type", "veth",
            "peer", "name", "eth0", "netns", namespace,
        )  # fmt: skip
        self._ip("-n", self.net, "link", "set", port, "master", "br0", "up")
        self._ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        self._ip("-n", namespace, "link", "set", "eth0", "up")
        # a veth left down: what the cut's filters redirect to (the kernel drops them)
        self._ip("-n", namespace, "link", "add", "sink0", "type", "veth", "peer", "name", "sink1")
        self.hosts[role] = Host(role=role, namespace=namespace, address=address, port=port)

    # ---- processes --------------------------------------------------------------------

    def start(self, role: str, label: str, argv: Sequence[str], *, cwd: Path) -> Process:
        """Run ``argv`` inside host ``role``; its output goes to ``<logdir>/<label>.log``."""
        log = self.logdir / f"{label}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", self.hosts[role].namespace, *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=child_env({"PYTHONUNBUFFERED": "1"}),
            )
        process = Process(label=label, popen=popen, log=log)
        self.processes.append(process)
        return process

    def dead(self) -> list[str]:
        """Processes that exited (with their exit codes)."""
        return [
            f"{p.label} (exit {p.popen.returncode})"
            for p in self.processes
            if p.popen.poll() is not None
        ]

    def log_tails(self, lines: int = 25) -> str:
        parts = []
        for process in self.processes:
            text = process.log.read_text(errors="replace") if process.log.exists() else ""
            tail = "\n".join(text.splitlines()[-lines:])
            parts.append(f"--- {process.label} (last {lines} lines of {process.log})\n{tail}")
        return "\n".join(parts)

    # ---- partitions -------------------------------------------------------------------

    def cut(self, role: str, peer: str) -> None:
        """Silently drop every packet between host ``role`` and address ``peer``, both
        ways, at the host's eth0: no RST, no ICMP — its connections simply go quiet.

        (tc redirects the matching packets to a veth that is down, which discards them;
        the plain ``drop`` action, act_gact, is not built into every kernel.)"""
        host = self.hosts[role]
        self._tc(host, "qdisc", "add", "dev", "eth0", "clsact")
        for direction, field in (("egress", "dst"), ("ingress", "src")):
            self._tc(
                host, "filter", "add", "dev", "eth0", direction, "protocol", "ip",
                "prio", "1", "u32", "match", "ip", field, f"{peer}/32",
                "action", "mirred", "egress", "redirect", "dev", "sink0",
            )  # fmt: skip

    def heal(self, role: str) -> None:
        """Undo ``cut`` (the filters go with the qdisc)."""
        self._tc(self.hosts[role], "qdisc", "del", "dev", "eth0", "clsact")

    # ---- teardown ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL) and delete every namespace (their
        links go with them). Safe to call more than once."""
        for process in self.processes:
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for process in self.processes:
            try:
                process.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait(COMMAND_TIMEOUT_S)
        errors = []
        for namespace in reversed(self._namespaces):
            result = subprocess.run(
                ["ip", "netns", "del", namespace],
                capture_output=True,
                timeout=COMMAND_TIMEOUT_S,
                check=False,
            )
            if result.returncode != 0:
                errors.append(f"ip netns del {namespace}: {result.stderr.decode().strip()}")
        self._namespaces.clear()
        if errors:
            raise RuntimeError("; ".join(errors))

    # ---- internals --------------------------------------------------------------------

    def _ip(self, *args: str) -> None:
        _run(["ip", *args])

    def _tc(self, host: Host, *args: str) -> None:
        _run(["ip", "netns", "exec", host.namespace, "tc", *args])


def _run(argv: list[str]) -> None:
    subprocess.run(argv, capture_output=True, timeout=COMMAND_TIMEOUT_S, check=True)


def _disable_ipv6() -> None:
    for scope in ("all", "default", "lo"):
        path = Path(f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6")
        if path.exists():
            path.write_text("1\n")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        stderr = exc.stderr.decode(errors="replace").strip() if exc.stderr else ""
        return f"`{' '.join(exc.cmd)}` exited {exc.returncode}: {stderr}"
    return repr(exc)
