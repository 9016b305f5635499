"""Several hosts emulated on one Linux machine, for tests and benchmarks of what one host cannot
show.

Each emulated host is a network namespace joined to a bridge in this namespace by a veth pair
(its own interface, its own address, its own link), so Spark workers, a driver or a parameter
server started in one reach the others over a real network stack, never over loopback. Links can
be shaped to a bandwidth with ``tc``'s token bucket (``tbf``) on both ends, so each host's link is
a full-duplex link of that rate, as a host's network card is::

    with EmulatedNetwork(hosts=2) as network:       # bridge at 198.18.0.1, hosts at .2 and .3
        network.shape("1gbit")
        server = subprocess.Popen(network.hosts[0].command(["python", "serve.py"]))
        ...

Addresses come from 198.18.0.0/15, the range set aside for benchmark networks (RFC 2544), so they
never collide with a range this machine's own interfaces use. Needs root and iproute2;
:class:`EmulatedNetwork` raises :class:`~kerasonspark.SparkEnvironmentError` naming which is
missing. Everything it creates is removed on exit, also when the body fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from kerasonspark import ConfigurationError, SparkEnvironmentError

__all__ = ["EmulatedHost", "EmulatedNetwork", "Relay", "goodput"]


@dataclass(frozen=True)
class EmulatedHost:
    """One emulated host: its network namespace, its address, and its link's name on the bridge
    side."""

    namespace: str
    address: str
    link: str

    def command(self, command: Sequence[str]) -> list[str]:
        """``command`` run in this host's namespace (``ip netns exec`` execs it: same process
        id)."""
        return ["ip", "netns", "exec", self.namespace, *command]


class EmulatedNetwork:
    """A bridge at ``<subnet>.1`` in this namespace and ``hosts`` namespaces at ``<subnet>.2`` on.

    Args:
        hosts: how many emulated hosts (namespaces).
        subnet: the first three octets of their /24, inside 198.18.0.0/15.
        tag: a short prefix for the devices and namespaces (unique per network on the machine);
            by default ``kos`` and this process's id.
    """

    def __init__(self, hosts: int, subnet: str = "198.18.0", tag: str | None = None) -> None:
        if not isinstance(hosts, int) or not 1 <= hosts <= 200:
            raise ConfigurationError(
                f"Expected `hosts` between 1 and 200. Received: hosts={hosts!r}."
            )
        octets = subnet.split(".")
        if (
            len(octets) != 3
            or octets[:1] != ["198"]
            or octets[1] not in ("18", "19")
            or not octets[2].isdigit()
        ):
            raise ConfigurationError(
                f"Expected `subnet` inside 198.18.0.0/15, like '198.18.0'. Received: "
                f"subnet={subnet!r}."
            )
        self.tag = tag or f"kos{os.getpid() % 100000}"
        self.bridge, self.address = f"{self.tag}br", f"{subnet}.1"
        self.hosts = [
            EmulatedHost(f"{self.tag}h{i}", f"{subnet}.{i + 1}", f"{self.tag}v{i}")
            for i in range(1, hosts + 1)
        ]

    def __enter__(self) -> EmulatedNetwork:
        if os.geteuid() != 0:
            raise SparkEnvironmentError(
                "Emulated hosts need root: network namespaces and veth links are "
                "created with `ip`. Run as root, or where that is not allowed, on real hosts."
            )
        if shutil.which("ip") is None or shutil.which("tc") is None:
            raise SparkEnvironmentError(
                "Emulated hosts need iproute2 (`ip` and `tc`); install it "
                "(apt-get install iproute2)."
            )
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for host in self.hosts:
                _ip("netns", "add", host.namespace)
                _ip(
                    "link",
                    "add",
                    host.link,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    host.namespace,
                )
                _ip("link", "set", host.link, "master", self.bridge, "up")
                _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
                _ip("-n", host.namespace, "link", "set", "eth0", "up")
                _ip("-n", host.namespace, "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.remove()

    def shape(self, rate: str | None) -> None:
        """Limit every host's link to ``rate`` (``tc`` units: ``"100mbit"``, ``"1gbit"``) in each
        direction; ``None`` removes the limit. The bridge's own address stays unshaped: put the
        hosts whose links matter (a driver, workers) in namespaces."""
        for host in self.hosts:
            for prefix, device in ((["-n", host.namespace], "eth0"), ([], host.link)):
                subprocess.run(
                    ["tc", *prefix, "qdisc", "del", "dev", device, "root"], capture_output=True
                )
                if rate is not None:
                    # A bucket of 1 ms at the rate (at least 64 KiB, one segmentation-offload
                    # packet) and a queue of 100 ms: TCP sees a link of that speed, not drops.
                    burst = max(_bits_per_second(rate) // 8 // 1000, 65536)
                    _run(
                        [
                            "tc",
                            *prefix,
                            "qdisc",
                            "add",
                            "dev",
                            device,
                            "root",
                            "tbf",
                            "rate",
                            rate,
                            "burst",
                            str(burst),
                            "latency",
                            "100ms",
                        ]
                    )

    def remove(self) -> None:
        """Delete the namespaces, the links and the bridge (what is already gone is skipped)."""
        for host in self.hosts:
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
            subprocess.run(["ip", "link", "del", host.link], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


_SINK = r"""
import socket, sys
with socket.create_server((sys.argv[1], int(sys.argv[2]))) as server:
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    connection, _ = server.accept()
    while connection.recv(1 << 20):
        pass
    connection.sendall(b"ok")
"""
_SOURCE = r"""
import socket, sys, time
size, transfers = int(sys.argv[3]), int(sys.argv[4])
with socket.create_connection((sys.argv[1], int(sys.argv[2]))) as sock:
    data = bytes(size)
    sock.sendall(data)  # the first transfer grows TCP's window
    started = time.perf_counter()
    for _ in range(transfers):
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    sock.recv(2)
    sys.stdout.write(f"{size * transfers / (time.perf_counter() - started)}\n")
"""


def goodput(
    sender: EmulatedHost,
    receiver: EmulatedHost,
    size: int = 4_200_000,
    transfers: int = 10,
    port: int = 5201,
) -> float:
    """Bytes per second a bulk TCP transfer carries from ``sender`` to ``receiver``: ``transfers``
    messages of ``size`` bytes (by default the reference CNN's 4.2 MB) after one to warm up."""
    sink = subprocess.Popen(
        receiver.command([sys.executable, "-c", _SINK, receiver.address, str(port)]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if sink.stdout is None or sink.stdout.readline().strip() != "ready":
            raise SparkEnvironmentError(
                f"The goodput receiver in {receiver.namespace} did not start."
            )
        source = subprocess.run(
            sender.command(
                [
                    sys.executable,
                    "-c",
                    _SOURCE,
                    receiver.address,
                    str(port),
                    str(size),
                    str(transfers),
                ]
            ),
            capture_output=True,
            text=True,
            timeout=600,
        )
        if source.returncode:
            raise SparkEnvironmentError(
                f"The goodput transfer from {sender.namespace} failed: {source.stderr[-2000:]}"
            )
        return float(source.stdout)
    finally:
        try:
            sink.wait(timeout=10)
        except subprocess.TimeoutExpired:  # the transfer failed before it connected
            sink.kill()
            sink.wait()


def _bits_per_second(rate: str) -> int:
    units = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "bit": 1}
    for unit, factor in units.items():
        if rate.endswith(unit) and rate[: -len(unit)].replace(".", "", 1).isdigit():
            return int(float(rate[: -len(unit)]) * factor)
    raise ConfigurationError(f"Expected a rate like '100mbit' or '1gbit'. Received: rate={rate!r}.")


def _ip(*args: str) -> None:
    _run(["ip", *args])


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SparkEnvironmentError(f"`{' '.join(command)}` failed: {done.stderr.strip()}")


_RELAY = r"""
import socket, sys, threading
listen = socket.create_server((sys.argv[1], 0))
target = (sys.argv[2], int(sys.argv[3]))
sys.stdout.write(f"{listen.getsockname()[1]}\n")
sys.stdout.flush()
def pump(source, sink):
    try:
        while data := source.recv(1 << 16):
            sink.sendall(data)
    except OSError:
        pass
    for end in (source, sink):
        try:
            end.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
while True:
    near, _ = listen.accept()
    far = socket.create_connection(target)
    for ends in ((near, far), (far, near)):
        threading.Thread(target=pump, args=ends, daemon=True).start()
"""


class Relay:
    """A TCP relay in this namespace: connections to ``listen_host`` (on a port it picks,
    :attr:`port`) are carried to ``target_host:target_port``, as a NAT gateway carries a laptop's
    connections to a cluster. The target's side sees only the relay, so a host behind it can
    reach the target while the target cannot reach that host. A process of its own, stopped by
    its process id on exit.
    """

    def __init__(self, listen_host: str, target_host: str, target_port: int) -> None:
        self.listen_host, self.target = listen_host, (target_host, target_port)
        self.process: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> Relay:
        host, port = self.target
        self.process = subprocess.Popen(
            [sys.executable, "-c", _RELAY, self.listen_host, host, str(port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline() if self.process.stdout is not None else ""
        if not line.strip().isdigit():
            self.__exit__(None, None, None)
            raise SparkEnvironmentError(f"The relay on {self.listen_host} did not start.")
        self.port = int(line)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
