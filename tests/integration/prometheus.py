"""A real Prometheus (Debian's ``prometheus`` package, installed by ``make setup``) scraping the
deployment's own config, deploy/prometheus/prometheus.yml, with each target moved to where a
test runs that process on loopback.  Jobs, labels and metrics paths stay as the file has them;
only the addresses change (and the scrape interval, to 1 s, so that a test waits seconds).

    with Prometheus(tmp_path, {"odl": {"trainer:9302": "127.0.0.2:41302", ...}}) as prom:
        prom.wait_all_up(60)
        prom.value('odl_trainer_up{component="trainer"}')
"""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import requests
import yaml

from tests.conftest import free_port
from tests.deploy_files import PROMETHEUS_YML, prometheus_targets

BINARY = "prometheus"


class Prometheus:
    def __init__(self, root: Path, where: dict[str, dict[str, str]]):
        """``where``: job -> {target as the config names it: the address it runs at here}.  A
        job left out is not scraped; a target the config names but ``where`` lacks is an error:
        every target of a job under test runs."""
        binary = shutil.which(BINARY)
        if binary is None:
            raise AssertionError("no prometheus binary: `make setup` installs Debian's package")
        named = prometheus_targets()
        for job, moved in where.items():
            missing = {t for t, _ in named[job]} - set(moved)
            assert not missing, f"job {job}: targets the config names but the test does not run: {missing}"
        raw = yaml.safe_load(PROMETHEUS_YML.read_text())
        raw["global"]["scrape_interval"] = "1s"
        raw["global"]["scrape_timeout"] = "1s"
        jobs = []
        for job in raw["scrape_configs"]:
            if job["job_name"] not in where:
                continue
            for sc in job["static_configs"]:
                sc["targets"] = [where[job["job_name"]][t] for t in sc["targets"]]
            jobs.append(job)
        raw["scrape_configs"] = jobs
        self.expected = sum(len(m) for m in where.values())
        root.mkdir(parents=True, exist_ok=True)
        (root / "prometheus.yml").write_text(yaml.safe_dump(raw))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = root / "prometheus.log"
        self.proc = subprocess.Popen(
            [binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'tsdb'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> "Prometheus":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def _api(self, path: str, **params) -> dict:
        body = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=5).json()
        assert body["status"] == "success", body
        return body["data"]

    def targets(self) -> list[dict]:
        """Prometheus's view of each target: labels, scrapeUrl, health, lastError."""
        return self._api("targets", state="active")["activeTargets"]

    def wait_all_up(self, timeout_s: float) -> list[dict]:
        """Until every target's last scrape succeeded; fails naming the ones that did not."""
        deadline = time.monotonic() + timeout_s
        seen: list[dict] = []
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                seen = self.targets()
            except (requests.RequestException, ValueError):
                seen = []
            if len(seen) == self.expected and all(t["health"] == "up" for t in seen):
                return seen
            time.sleep(1)
        down = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in seen if t["health"] != "up"]
        raise AssertionError(f"targets not up after {timeout_s} s ({len(seen)} of {self.expected} "
                             f"known): {down}")

    def value(self, expr: str) -> float | None:
        """An instant query's value (the first series'), None when it has none."""
        result = self._api("query", query=expr)["result"]
        return float(result[0]["value"][1]) if result else None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
