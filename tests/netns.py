"""A throw-away network of Linux network namespaces for multi-host tests.

Every "host" is a network namespace with one veth interface (``eth0``) whose
peer sits on a bridge inside a separate "switch" namespace. Nothing is created
in the test process's own namespace: no interface, no route, no address, so
the test never sends a packet to a real network. Namespace names carry a
random per-run prefix, and :meth:`Net.close` kills every process inside them
and deletes them, even when the test failed.

Needs root and ``ip netns``; :func:`netns_unavailable` says why not, for a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path

SUBNET = "10.123.0"


def netns_unavailable() -> str | None:
    """Why network-namespace tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns add)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    name = f"dcprobe{uuid.uuid4().hex[:6]}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True,
                           check=False)
    if probe.returncode != 0:
        return f"`ip netns add` does not work here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return None


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


class Net:
    """Hosts on one private bridge: ``net.add("head", 1)`` -> namespace at 10.123.0.1."""

    def __init__(self) -> None:
        self.prefix = f"dc{uuid.uuid4().hex[:6]}"
        self.switch = f"{self.prefix}-sw"
        self.hosts: dict[str, str] = {}  # short name -> namespace
        self.addresses: dict[str, str] = {}
        self._namespaces: list[str] = []
        _ip("netns", "add", self.switch)
        self._namespaces.append(self.switch)
        self.run(self.switch, ["ip", "link", "set", "lo", "up"])
        self.run(self.switch, ["ip", "link", "add", "br0", "type", "bridge"])
        self.run(self.switch, ["ip", "link", "set", "br0", "up"])

    def add(self, short: str, host_number: int) -> str:
        """A new host namespace with address 10.123.0.<host_number>; returns the address."""
        ns = f"{self.prefix}-{short}"
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        peer = f"v{self.prefix[2:]}{short}"[:15]
        # Created inside the host namespace with its peer placed straight into the
        # switch namespace: the pair never exists in the test's own namespace.
        self.run(ns, ["ip", "link", "add", "eth0", "type", "veth", "peer", "name", peer,
                      "netns", self.switch])
        self.run(self.switch, ["ip", "link", "set", peer, "master", "br0", "up"])
        address = f"{SUBNET}.{host_number}"
        self.run(ns, ["ip", "addr", "add", f"{address}/24", "dev", "eth0"])
        self.run(ns, ["ip", "link", "set", "eth0", "up"])
        self.run(ns, ["ip", "link", "set", "lo", "up"])
        self.hosts[short] = ns
        self.addresses[short] = address
        return address

    def cmd(self, short: str, args: Sequence[str]) -> list[str]:
        """``args`` run inside host ``short`` (exec'd: the pid is the command's own)."""
        return ["ip", "netns", "exec", self.hosts.get(short, short), *args]

    def run(self, ns: str, args: Sequence[str]) -> None:
        proc = subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} in {ns}: {proc.stderr.strip()}")

    def link(self, short: str, up: bool) -> None:
        """Partition (down) or heal (up) a host: its only link to the others."""
        self.run(self.hosts[short], ["ip", "link", "set", "eth0", "up" if up else "down"])

    def pids(self, short: str) -> list[int]:
        ns = self.hosts.get(short, short)
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                             check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    def kill_all(self, short: str) -> None:
        """Node loss: SIGKILL every process in the host (``ip netns pids NS | xargs kill -9``)."""
        for pid in self.pids(short):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def task_pids(self, short: str, task_id: str) -> list[int]:
        """Processes in host ``short`` that belong to task ``task_id`` (by environment)."""
        marker = f"DISTCOMP_TASK_ID={task_id}".encode()
        found: list[int] = []
        for pid in self.pids(short):
            with contextlib.suppress(OSError):
                if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    found.append(pid)
        return found

    def close(self) -> None:
        """Kill everything inside, then delete the namespaces (safe to call twice)."""
        for ns in self._namespaces:
            self.kill_all(ns)
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self._namespaces.clear()
