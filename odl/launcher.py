"""The local stack: every server and component as a process on loopback, started and stopped
as a group.

Each process runs in its own session (process group), logs to ``var/logs/<name>.log`` and is
recorded in ``var/run/stack.json`` so that ``odl down`` from any shell can stop exactly what
``odl up`` started: SIGTERM to each group, then SIGKILL to what is left.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import redis

from odl.config import Config
from odl.kafka_util import ensure_topics
from odl.ray_util import LOOPBACK_ENV, ray_temp_dir


@dataclass
class ProcSpec:
    name: str
    argv: list[str]
    ready: Callable[[], bool] | None = None
    ready_timeout_s: float = 60.0
    env: dict[str, str] = field(default_factory=dict)
    restart: bool = False    # run under odl.keeper: restarted when it dies (a container's policy)


@dataclass
class ProcState:
    name: str
    pid: int
    log: str
    argv: list[str]
    started: float


class StackError(RuntimeError):
    pass


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def group_alive(pgid: int) -> bool:
    """True while any non-zombie process is in the group (a zombie has finished; its parent
    may simply not have reaped it yet, e.g. when another shell runs `odl down`)."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: fall back to signal 0
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def tail(path: str | Path, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


MAY_FINISH = {"source"}      # components whose work can end (a replayed log)


class LocalStack:
    def __init__(self, cfg: Config, config_path: str | None = None):
        self.cfg = cfg
        self.config_path = config_path
        self.state_file = cfg.paths.run / "stack.json"
        self.procs: dict[str, subprocess.Popen] = {}

    # --- what runs -----------------------------------------------------------------------------
    def _odl(self, *args: str) -> list[str]:
        argv = [sys.executable, "-m", "odl.cli", "run", *args]
        return argv + (["--config", self.config_path] if self.config_path else [])

    def specs(self) -> list[ProcSpec]:
        c = self.cfg
        host, kport = c.kafka.host_port
        tansu = c.paths.tansu_binary
        if not tansu.is_file():
            raise StackError(f"broker binary missing at {tansu}: run `make setup`")
        r = redis.Redis(host=c.redis.host, port=c.redis.port, password=c.redis.password,
                        socket_connect_timeout=0.5)

        def redis_ready() -> bool:
            try:
                return bool(r.ping())
            except redis.RedisError:
                return False

        redis_argv = ["redis-server", "--bind", c.redis.host, "--port", str(c.redis.port),
                      "--save", "", "--appendonly", "no", "--dir", str(c.paths.state_dir)]
        if c.redis.password:
            redis_argv += ["--requirepass", c.redis.password]
        specs = [
            ProcSpec("broker", [str(tansu), "broker", "--listener-url", f"tcp://{host}:{kport}",
                                "--advertised-listener-url", f"tcp://{host}:{kport}",
                                "--storage-engine", "memory://tansu/"],
                     ready=lambda: port_open(host, kport)),
            ProcSpec("redis", redis_argv, ready=redis_ready, restart=True),
            ProcSpec("ray", [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", f"--port={c.ray.port}",
                             f"--num-cpus={c.ray.num_cpus}", "--include-dashboard=false",
                             "--disable-usage-stats", f"--temp-dir={ray_temp_dir(c)}"],
                     ready=lambda: port_open("127.0.0.1", c.ray.port), ready_timeout_s=90,
                     # a local head has no Serve replicas to drain: stop at once on SIGTERM
                     env={"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}),
            ProcSpec("feature-job", self._odl("feature-job"), restart=True),
            ProcSpec("feature-store", self._odl("feature-store"), restart=True),
            ProcSpec("trainer", self._odl("trainer"), restart=True),
            ProcSpec("exporter", self._odl("exporter"), restart=True),
        ]
        for n, port in enumerate(c.serving.ports):
            specs.append(ProcSpec(f"serving-{n}", self._odl("serving", "--replica", str(n)),
                                  ready=lambda port=port: port_open(c.serving.host, port),
                                  ready_timeout_s=120, restart=True))
        specs.append(ProcSpec("source", self._odl("source")))
        return specs

    # --- lifecycle -----------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(LOOPBACK_ENV)
        env.update({"PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"})
        repo = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        # resolved once here: the components' working directories differ
        env["ODL__SPEC"] = str(self.cfg.spec)
        if self.cfg.source.log_path is not None:
            env["ODL__SOURCE__LOG_PATH"] = str(self.cfg.source.log_path.resolve())
        return env

    def _argv(self, spec: ProcSpec) -> list[str]:
        if not spec.restart:
            return spec.argv
        keeper = [sys.executable, "-m", "odl.keeper", spec.name]
        return keeper + (["--config", self.config_path] if self.config_path else []) + ["--", *spec.argv]

    def _read_state(self) -> dict[str, ProcState]:
        if not self.state_file.is_file():
            return {}
        return {k: ProcState(**v) for k, v in json.loads(self.state_file.read_text()).items()}

    def _write_state(self, states: dict[str, ProcState]) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: asdict(v) for k, v in states.items()}, indent=1))
        tmp.rename(self.state_file)

    def running(self) -> dict[str, ProcState]:
        return {k: s for k, s in self._read_state().items() if group_alive(s.pid)}

    def up(self, progress: Callable[[str], None] = print) -> None:
        if self.running():
            raise StackError(f"a stack is already running ({self.state_file}); run `odl down` first")
        for d in (self.cfg.paths.logs, self.cfg.paths.run, self.cfg.paths.model_store):
            d.mkdir(parents=True, exist_ok=True)
        # The local broker keeps nothing across `odl up`s, so Flink checkpoints of an earlier
        # stack point at offsets that no longer exist; restarts within one stack restore them.
        shutil.rmtree(self.cfg.paths.checkpoints / "flink", ignore_errors=True)
        shutil.rmtree(self.cfg.paths.checkpoints / "trainer", ignore_errors=True)
        states: dict[str, ProcState] = {}
        env = self._env()
        try:
            for spec in self.specs():
                log = self.cfg.paths.logs / f"{spec.name}.log"
                fh = open(log, "ab")
                argv = self._argv(spec)
                proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env={**env, **spec.env},
                                        start_new_session=True, cwd=self.cfg.paths.state_dir)
                fh.close()
                self.procs[spec.name] = proc
                states[spec.name] = ProcState(spec.name, proc.pid, str(log), argv, time.time())
                self._write_state(states)
                progress(f"started {spec.name:<12} pid {proc.pid:<7} log {log}")
                if spec.ready:
                    self._wait_ready(spec, proc, log)
                if spec.name == "broker":
                    created = ensure_topics(self.cfg)
                    if created:
                        progress(f"created topics {', '.join(created)}")
        except BaseException:
            self.down(progress)
            raise

    def _wait_ready(self, spec: ProcSpec, proc: subprocess.Popen, log: Path) -> None:
        deadline = time.monotonic() + spec.ready_timeout_s
        while not spec.ready():
            if proc.poll() is not None:
                raise StackError(f"{spec.name} exited with {proc.returncode} while starting:\n{tail(log)}")
            if time.monotonic() > deadline:
                raise StackError(f"{spec.name} not ready after {spec.ready_timeout_s}s:\n{tail(log)}")
            time.sleep(0.2)

    def crashed(self) -> list[tuple[str, int | None, str]]:
        """(name, exit code or None if unknown, log tail) of processes that are gone.  A
        bounded source (a replayed log, ``source.max_events``) that ran out and exited 0 has
        finished, not crashed."""
        out = []
        for name, st in self._read_state().items():
            proc = self.procs.get(name)
            if proc is not None:
                if proc.poll() is not None and not (name in MAY_FINISH and proc.returncode == 0):
                    out.append((name, proc.returncode, tail(st.log)))
            elif not group_alive(st.pid):
                out.append((name, None, tail(st.log)))
        return out

    def down(self, progress: Callable[[str], None] = print, timeout_s: float = 30.0) -> list[str]:
        """Stop every recorded process group, newest first; returns the names it had to kill."""
        states = self._read_state()
        killed = []
        for name, st in reversed(list(states.items())):
            if not group_alive(st.pid):
                continue
            try:
                os.killpg(st.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + (timeout_s if name != "source" else 5)
            while group_alive(st.pid) and time.monotonic() < deadline:
                self._reap(name)
                time.sleep(0.1)
            if group_alive(st.pid):
                killed.append(name)
                try:
                    os.killpg(st.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._reap(name)
            progress(f"stopped {name}" + (" (killed)" if name in killed else ""))
        if self.state_file.exists():
            self.state_file.unlink()
        return killed

    def _reap(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is not None:
            proc.poll()
