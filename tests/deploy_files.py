"""The deployment files as the tests read them: docker-compose.yml with .env interpolated (as
`docker compose` does), the compose environment, Flink properties and the Prometheus config.
The static checks (tests/unit/test_deploy.py) and the runs under the container configuration
(tests/integration/test_container_config.py, the distributed suite) read them here, once."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_YML = REPO / "deploy" / "prometheus" / "prometheus.yml"


def dotenv() -> dict[str, str]:
    out = {}
    for line in (REPO / ".env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def interpolate(text: str, env: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1)
        assert name in env, f"docker-compose.yml uses ${{{name}}}, which .env does not set"
        return env[name]
    return re.sub(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)\}", sub, text)


def compose() -> dict:
    return yaml.safe_load(interpolate((REPO / "docker-compose.yml").read_text(), dotenv()))


def odl_env() -> dict[str, str]:
    """The ``ODL__`` environment every ODL container gets (compose's ``x-odl-env``)."""
    return {k: str(v) for k, v in compose()["x-odl-env"].items()}


def flink_properties() -> dict[str, str]:
    """Compose's ``FLINK_PROPERTIES`` (what the flink image appends to its config.yaml)."""
    return {k: str(v) for k, v in yaml.safe_load(compose()["x-flink-properties"]).items()}


def prometheus_targets() -> dict[str, list[tuple[str, dict[str, str]]]]:
    """job -> [(``host:port`` as the config names it, its labels)]."""
    out: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for job in yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]:
        for sc in job["static_configs"]:
            out.setdefault(job["job_name"], []).extend((t, sc.get("labels", {})) for t in sc["targets"])
    return out
