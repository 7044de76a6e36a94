"""A standalone Flink cluster on loopback, built from the PyFlink distribution's own scripts the
way the ``flink`` image runs one: a JobManager (``standalone-job.sh start-foreground`` with the
PythonDriver, application mode: docker-compose's ``flink-jobmanager``) and TaskManagers
(``taskmanager.sh start-foreground``), each its own process tree.

The Flink home is assembled as the Dockerfile's ``flink`` target assembles ``/opt/flink``: the
distribution's ``lib/`` plus ``opt/flink-python-*.jar`` and the Kafka connector jars.  Its
``config.yaml`` holds what docker-compose's ``FLINK_PROPERTIES`` hold, with every listener on
127.0.0.1; the job's own settings come from the ``ODL__`` environment, as in the containers.
"""
from __future__ import annotations

import os
import signal
import site
import subprocess
import sys
import time
from pathlib import Path

import pyflink
import requests
import yaml

from odl.config import Config
from tests.conftest import free_port

PYFLINK = Path(pyflink.__file__).resolve().parent


class FlinkCluster:
    def __init__(self, root: Path, cfg: Config, env: dict[str, str], slots: int = 2):
        self.root, self.env = root, env
        self.home, self.conf, self.logs = root / "flink", root / "conf", root / "log"
        self.checkpoints = root / "checkpoints"         # the volume both containers mount
        for d in (self.home / "lib", self.conf, self.logs, self.checkpoints):
            d.mkdir(parents=True, exist_ok=True)
        for name in ("bin", "opt", "plugins"):
            (self.home / name).symlink_to(PYFLINK / name)
        jars = [*(PYFLINK / "lib").glob("*.jar"), *(PYFLINK / "opt").glob("flink-python-*.jar"),
                *cfg.paths.flink_jars]
        for jar in jars:
            (self.home / "lib" / jar.name).symlink_to(jar.resolve())
        self.rest_port = free_port()
        base = yaml.safe_load((PYFLINK / "conf" / "config.yaml").read_text())
        props = {
            "env.java.opts.all": base["env"]["java"]["opts"]["all"],
            "jobmanager.rpc.address": "127.0.0.1", "jobmanager.rpc.port": free_port(),
            "jobmanager.bind-host": "127.0.0.1", "taskmanager.bind-host": "127.0.0.1",
            "taskmanager.host": "127.0.0.1", "rest.address": "127.0.0.1",
            "rest.bind-address": "127.0.0.1", "rest.port": self.rest_port,
            "blob.server.port": free_port(),
            "jobmanager.memory.process.size": "1024m", "taskmanager.memory.process.size": "1536m",
            "taskmanager.numberOfTaskSlots": slots,
            "parallelism.default": cfg.feature_job.parallelism,
            "execution.checkpointing.dir": self.checkpoints.resolve().as_uri(),
            "python.executable": sys.executable, "python.client.executable": sys.executable,
            # a lost TaskManager is replaced within seconds (docker's restart policy, k8s)
            "restart-strategy.type": "fixed-delay",
            "restart-strategy.fixed-delay.attempts": 1000,
            "restart-strategy.fixed-delay.delay": "2 s",
            "heartbeat.timeout": 10000, "heartbeat.interval": 2000,
        }
        (self.conf / "config.yaml").write_text(yaml.safe_dump(props))
        for f in ("log4j-console.properties", "log4j.properties"):
            (self.conf / f).symlink_to(PYFLINK / "conf" / f)
        self.jobmanager: subprocess.Popen | None = None
        self.taskmanagers: list[subprocess.Popen] = []

    def _env(self) -> dict[str, str]:
        repo = str(Path(__file__).resolve().parents[2])
        env = {k: v for k, v in os.environ.items() if not k.startswith("ODL__")}
        env.update(self.env)
        env.update({"FLINK_HOME": str(self.home), "FLINK_CONF_DIR": str(self.conf),
                    "FLINK_LOG_DIR": str(self.logs),
                    # config.sh takes the home from bin/'s resolved path (the wheel's): name the
                    # assembled lib/ and plugins/ themselves
                    "FLINK_LIB_DIR": str(self.home / "lib"),
                    "FLINK_PLUGINS_DIR": str(self.home / "plugins"),
                    # as the image's PYTHONPATH (/opt/odl:/opt/venv/site-packages): the code,
                    # and the venv's packages for the TaskManager's embedded Python (PEMJA does
                    # not read the venv)
                    "PYTHONPATH": os.pathsep.join([repo, *site.getsitepackages()]),
                    "ODL__FEATURE_JOB__DEPLOYMENT": "cluster",
                    # where the job's driver finds this JobManager's REST API (8081 in a container)
                    "ODL__FEATURE_JOB__REST_PORTS": str(self.rest_port),
                    "ODL__FEATURE_JOB__CHECKPOINT_DIR": self.checkpoints.resolve().as_uri()})
        return env

    def _spawn(self, argv: list[str], log: str) -> subprocess.Popen:
        return subprocess.Popen([str(self.home / "bin" / argv[0]), *argv[1:]], env=self._env(),
                                stdout=open(self.logs / log, "ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)

    def start_jobmanager(self) -> None:
        """docker-compose's ``standalone-job --job-classname ...PythonDriver -pym
        pipeline.feature_job``."""
        self.jobmanager = self._spawn(
            ["standalone-job.sh", "start-foreground", "--job-classname",
             "org.apache.flink.client.python.PythonDriver", "-pym", "pipeline.feature_job"],
            "jobmanager.out")

    def start_taskmanager(self) -> subprocess.Popen:
        tm = self._spawn(["taskmanager.sh", "start-foreground"],
                         f"taskmanager-{len(self.taskmanagers)}.out")
        self.taskmanagers.append(tm)
        return tm

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL a process tree (a container killed): no chance to clean up."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)

    def rest(self, path: str) -> dict:
        return requests.get(f"http://127.0.0.1:{self.rest_port}{path}", timeout=5).json()

    def job(self) -> dict | None:
        """The one job's overview (id, state), None before it is submitted."""
        try:
            jobs = self.rest("/jobs/overview")["jobs"]
        except (requests.RequestException, ValueError, KeyError):
            return None
        return jobs[0] if jobs else None

    def wait_running(self, timeout_s: float, since_restarts: int = -1) -> dict:
        """Until the job is RUNNING with every task running (after more than ``since_restarts``
        restarts, when given)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for proc in (self.jobmanager, *self.taskmanagers[-1:]):
                if proc is not None and proc.poll() is not None:
                    raise AssertionError(f"a Flink process exited ({proc.args[0]}): see "
                                         f"{self.logs}")
            j = self.job()
            if j and j["state"] == "RUNNING":
                detail = self.rest(f"/jobs/{j['jid']}")
                tasks = detail.get("status-counts", {})
                if tasks and set(k for k, v in tasks.items() if v) == {"RUNNING"} and \
                        self.restarts(j["jid"]) > since_restarts:
                    return j
            time.sleep(0.5)
        raise AssertionError(f"the job is not running after {timeout_s} s: {self.job()} "
                             f"(logs in {self.logs})")

    def restarts(self, jid: str) -> int:
        try:
            return int(self.rest(f"/jobs/{jid}/metrics?get=numRestarts")[0]["value"])
        except (requests.RequestException, ValueError, KeyError, IndexError):
            return 0

    def close(self) -> None:
        for proc in (*self.taskmanagers, self.jobmanager):
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(30)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    self.kill(proc)
