"""Job metrics from Flink's REST API (the local mini-cluster serves it on loopback too):
input throughput at the source and watermark lag at the label join."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any


def _get(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


def port_range(spec: str) -> list[int]:
    lo, _, hi = spec.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


class FlinkJobMetrics:
    """Finds the REST port that knows ``job_id`` (Flink takes the first free port of a range)."""

    def __init__(self, host: str, ports: list[int], job_id: str):
        self.host, self.ports, self.job_id = host, ports, job_id
        self.base: str | None = None

    def _discover(self) -> str | None:
        for port in self.ports:
            base = f"http://{self.host}:{port}"
            try:
                _get(f"{base}/jobs/{self.job_id}", timeout=0.5)
                return base
            except (urllib.error.URLError, OSError, ValueError):
                continue
        return None

    def sample(self) -> dict[str, float]:
        """{'events_in_per_s', 'watermark_lag_s'}; empty until the REST endpoint answers."""
        if self.base is None:
            self.base = self._discover()
            if self.base is None:
                return {}
        job = _get(f"{self.base}/jobs/{self.job_id}")
        out: dict[str, float] = {}
        for v in job.get("vertices", []):
            vid, name = v["id"], v["name"]
            if name.startswith("Source"):
                rows = _get(f"{self.base}/jobs/{self.job_id}/vertices/{vid}/subtasks/metrics"
                            f"?get=numRecordsOutPerSecond")
                out["events_in_per_s"] = round(sum(r.get("sum", 0.0) for r in rows), 1)
            if "Join" in name:
                marks = _get(f"{self.base}/jobs/{self.job_id}/vertices/{vid}/watermarks")
                values = [int(float(m["value"])) for m in marks
                          if m["id"].endswith("currentInputWatermark")]
                if values and min(values) > 0:
                    out["watermark_lag_s"] = round(time.time() - min(values) / 1000.0, 2)
        return out
