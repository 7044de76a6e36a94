"""Shared fixtures: real servers on loopback (tansu broker, redis-server, a Redis Cluster) started per session on
free ports and stopped at its end, and configs pointing at them."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.common import free_port  # noqa: E402,F401 - the tests' import of it
from odl.config import Config, load_config  # noqa: E402
from odl.launcher import port_open  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not port_open("127.0.0.1", port):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {port}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="session")
def redis_port(tmp_path_factory):
    port = free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", str(d)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc, "redis-server")
    yield port
    stop(proc)


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 <= 65535 and not port_open("127.0.0.1", port + 10000):
            return port


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A Redis Cluster of three primaries on loopback (no replicas, no persistence), built as an
    operator builds one: three ``redis-server --cluster-enabled yes`` and ``redis-cli --cluster
    create``.  Yields the first node's port; a client given it discovers the rest."""
    procs, ports = [], []
    try:
        for _ in range(3):
            port = _cluster_port()
            d = tmp_path_factory.mktemp(f"redis-cluster-{port}")
            procs.append(subprocess.Popen(
                ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                 "--appendonly", "no", "--dir", str(d), "--cluster-enabled", "yes",
                 "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_port(port, procs[-1], "redis-server (cluster node)")
            ports.append(port)
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while not all("cluster_state:ok" in subprocess.run(
                ["redis-cli", "-p", str(p), "cluster", "info"], capture_output=True, text=True,
                timeout=10).stdout for p in ports):
            assert time.monotonic() < deadline, "the Redis Cluster did not reach cluster_state:ok"
            time.sleep(0.2)
        yield ports[0]
    finally:
        for proc in procs:
            stop(proc)


@pytest.fixture(scope="session")
def broker_port():
    cfg = load_config(env={})
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([str(cfg.paths.tansu_binary), "broker", "--listener-url", url,
                             "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc, "tansu broker")
    yield port
    stop(proc)


def make_config(tmp_path: Path, **sections) -> Config:
    """A config whose state lives in tmp_path; ``sections`` override fields per section."""
    raw = {"paths": {"state_dir": str(tmp_path / "var")}, "metrics": {"enabled": False}}
    for section, fields in sections.items():
        raw.setdefault(section, {}).update(fields)
    return Config.model_validate(raw)


@pytest.fixture
def redis_cfg(tmp_path, redis_port) -> Config:
    import redis
    redis.Redis(port=redis_port).flushall()
    return make_config(tmp_path, redis={"port": redis_port})
