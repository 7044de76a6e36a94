"""Private servers for benchmarks: each benchmark starts what it measures against on a free
loopback port and stops it again, so a running stack is never disturbed."""
from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import tempfile
import time
from typing import IO, Callable, Iterator

from odl.config import Config
from odl.launcher import port_open


# Ray hands its workers ports 10002-19999 by default; above that and below the kernel's ephemeral
# range, no process of a stack gets a port it did not ask for.
_ASSIGNED_LOW = 20000
_handed_out: set[int] = set()


def _assigned_range() -> range:
    """Ports that nothing binds by chance: above Ray's worker ports, below the ephemeral range
    (``ip_local_port_range``) that every bind to port 0 and every outgoing connection draws
    from.  A private stack binds many of those (Ray, Flink, clients) while it starts, and one of
    them once took a metrics port picked from that range before its component was up."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(_ASSIGNED_LOW, low) if low > _ASSIGNED_LOW + 1000 else range(0)


def free_port() -> int:
    return free_port_block(1)


def free_port_block(n: int) -> int:
    """The first of ``n`` consecutive free loopback ports (a stack's metrics ports are one base
    plus offsets), outside the ephemeral range where the system allows, and none handed out
    before by this process (a stack's ports are all picked before any of them is bound)."""
    span = _assigned_range()
    for _ in range(200):
        if len(span) > n:
            base = random.randrange(span.start, span.stop - n)
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                base = s.getsockname()[1]
        block = range(base, base + n)
        if (base + n < 65000 and not _handed_out.intersection(block)
                and all(_port_free(p) for p in block)):
            _handed_out.update(block)
            return base
    raise RuntimeError(f"no block of {n} free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@contextlib.contextmanager
def managed_process(argv: list[str], ready: Callable[[], bool], what: str, timeout_s: float = 15,
                    stdout: IO | int = subprocess.DEVNULL) -> Iterator[subprocess.Popen]:
    """Start ``argv``, wait until ``ready()`` (or fail if it exits or ``timeout_s`` passes),
    and terminate it (then kill) when the block ends."""
    proc = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.STDOUT if stdout is not
                            subprocess.DEVNULL else subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start (exit code {proc.poll()})")
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def _server(argv: list[str], port: int, what: str) -> Iterator[int]:
    with managed_process(argv, lambda: port_open("127.0.0.1", port), f"{what} on 127.0.0.1:{port}"):
        yield port


@contextlib.contextmanager
def private_redis() -> Iterator[int]:
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        with _server(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                      "--appendonly", "no", "--dir", d], port, "redis-server") as p:
            yield p


@contextlib.contextmanager
def private_broker(cfg: Config) -> Iterator[str]:
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    with _server([str(cfg.paths.tansu_binary), "broker", "--listener-url", url,
                  "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
                 port, "tansu broker"):
        yield f"127.0.0.1:{port}"


def synthetic_samples(n: int, seed: int = 11, num_users: int = 3000, num_items: int = 800) -> list[dict]:
    """Sample records as the feature job writes them, with a learnable (user, item) pattern and
    impression times 20 ms apart; shared by the trainer benchmark and the trainer tests."""
    import numpy as np
    rng = np.random.default_rng(seed)
    users = rng.integers(0, num_users, n)
    items = rng.integers(0, num_items, n)
    p = 0.1 + 0.3 * ((users + items) % 3 == 0)
    labels = rng.random(n) < p
    return [{"sample_id": f"r{k}:{i}", "request_id": f"r{k}", "user_id": int(u), "item_id": int(i),
             "position": k % 5, "hour": (k // 500) % 24, "category": 0, "label": int(y),
             "impression_ts_ms": 1_700_000_000_000 + 20 * k, "label_ts_ms": 0}
            for k, (u, i, y) in enumerate(zip(users.tolist(), items.tolist(), labels.tolist()))]
