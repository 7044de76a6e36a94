"""Static checks of the deployment files (no Docker engine or cluster exists on these machines):
the Compose file against the Compose specification's schema and against the code (commands,
config variables, ports, metric names), the Kubernetes overlays rendered with kustomize and
validated against the Kubernetes schemas, the custom resources against what their operators
require, and the Dockerfile through hadolint."""
from __future__ import annotations

import json
import re
import tomllib
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from odl.cli import COMPONENTS
from odl.config import Config, ConfigError, load_config
from odl.probes import HEALTH_PATH, READY_PATH
from odl.runtime import metrics_port
from tests.deploy_files import compose as load_compose, dotenv, prometheus_targets

REPO = Path(__file__).resolve().parents[2]
CACHE = Config().paths.cache_dir
K8S_VERSION = "1.30.0"
OVERLAYS = ("dev", "prod")
ODL_IMAGES = ("odl", "ghcr.io/odl/odl")


# --- docker-compose ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


def _odl_argv(svc: dict) -> list[str] | None:
    """The argv of a service running the ODL image (entrypoint `odl` unless overridden)."""
    if svc.get("image") != dotenv()["ODL_IMAGE"]:
        return None
    return list(svc.get("entrypoint", ["odl"])) + list(svc.get("command", []))


def test_compose_file_validates_against_the_compose_schema(compose):
    schema = json.loads((CACHE / "schemas" / "compose_spec.json").read_text())
    jsonschema.validate(compose, schema)


def test_every_odl_service_runs_an_existing_odl_command(compose):
    ports = yaml.safe_load(compose["x-odl-env"]["ODL__SERVING__PORTS"])
    seen = set()
    for name, svc in compose["services"].items():
        argv = _odl_argv(svc)
        if argv is None or argv[0] == "ray":
            continue
        assert argv[:2] == ["odl", "run"] and argv[2] in COMPONENTS, (name, argv)
        seen.add(argv[2])
        if "--replica" in argv:
            assert int(argv[argv.index("--replica") + 1]) < len(ports)
    assert seen == set(COMPONENTS) - {"feature-job"}          # the feature job runs on Flink
    jm = compose["services"]["flink-jobmanager"]["command"]
    assert jm[0] == "standalone-job" and jm[jm.index("-pym") + 1] == "pipeline.feature_job"
    import pipeline.feature_job as job
    assert callable(job.main)
    for node in ("ray-head", "ray-worker"):
        assert compose["services"][node]["entrypoint"] == ["ray"]
        assert compose["services"][node]["command"][0] == "start"


def test_every_config_variable_compose_sets_is_understood(compose):
    for name, svc in compose["services"].items():
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items() if k.startswith("ODL__")}
        try:
            load_config(env=env)
        except ConfigError as exc:
            pytest.fail(f"service {name}: {exc}")


def test_health_checks_dependencies_and_volumes_hang_together(compose):
    services = compose["services"]
    for name in ("kafka", "redis", "flink-jobmanager", "ray-head", "serving-0", "serving-1"):
        assert "healthcheck" in services[name], name
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        for dep, cond in (deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps)):
            assert dep in services, (name, dep)
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], (name, dep)
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            assert source.startswith("./") and (REPO / source).exists() or source in compose["volumes"], vol
    assert "--requirepass" in services["redis"]["command"]
    assert services["serving-0"]["ports"] == ["8501:8501"] and services["serving-1"]["ports"] == ["8502:8502"]


def test_every_odl_service_checks_the_liveness_of_its_work(compose):
    """Not /metrics (the HTTP thread): the work loops' probe (odl.probes), on the port the
    config gives the component; serving's own health on its API port."""
    cfg = load_config(env={k: str(v) for k, v in compose["x-odl-env"].items()})
    for name, svc in compose["services"].items():
        command = svc.get("command") or []
        if command[:1] != ["run"]:
            continue
        component = command[1]
        if component == "serving":
            replica = int(command[command.index("--replica") + 1])
            url = f"http://localhost:{cfg.serving.ports[replica]}{HEALTH_PATH}"
        else:
            url = f"http://localhost:{metrics_port(cfg, component)}{HEALTH_PATH}"
        assert url in " ".join(svc["healthcheck"]["test"]), (name, svc.get("healthcheck"))


def _code_metric_names() -> set[str]:
    names = set()
    for path in REPO.glob("*/*.py"):
        names |= set(re.findall(r'(?:Counter|Gauge|Histogram)\(\s*"(odl_[a-z_]+)"', path.read_text()))
    return names


def test_prometheus_scrapes_every_component_on_its_metrics_port(compose):
    targets = {t for job in prometheus_targets().values() for t, _ in job}
    for name, svc in compose["services"].items():
        argv = _odl_argv(svc)
        if argv and argv[:2] == ["odl", "run"]:
            replica = int(argv[argv.index("--replica") + 1]) if "--replica" in argv else 0
            port = metrics_port(Config(), argv[2], replica)
            assert f"{name}:{port}" in targets, (name, port)
        if "pipeline.feature_job" in (svc.get("command") or []):     # the job's driver
            assert f"{name}:{metrics_port(Config(), 'feature-job')}" in targets, name
    assert {t.split(":")[0] for t in targets} <= set(compose["services"])


def test_grafana_dashboard_queries_metrics_the_code_exports():
    dash = json.loads((REPO / "deploy/grafana/dashboards/odl.json").read_text())
    known = _code_metric_names()
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("freshness", "auc", "throughput", "lag", "latency"):
        assert topic in titles
    for panel in dash["panels"]:
        for t in panel["targets"]:
            for metric in re.findall(r"\b(odl_[a-z_]+?)(?:_bucket|_sum|_count)?\b", t["expr"]):
                base = re.sub(r"_(bucket|sum|count)$", "", metric)
                assert base in known, (panel["title"], metric)


# --- Kubernetes ----------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is installed by `make setup` (Debian kubernetes-client)"
    out = subprocess.run([kubectl, "kustomize", str(REPO / "k8s/overlays" / request.param)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert docs
    return docs


BUILT_IN = {"v1", "apps/v1", "autoscaling/v2", "policy/v1", "networking.k8s.io/v1"}


def test_built_in_kinds_validate_against_the_kubernetes_schemas(rendered):
    for doc in rendered:
        if doc["apiVersion"] in BUILT_IN:
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def _get(doc: dict, path: str):
    cur = doc
    for part in path.split("."):
        assert isinstance(cur, dict) and part in cur, f"{doc['kind']}/{doc['metadata']['name']}: no {path}"
        cur = cur[part]
    return cur


REQUIRED = {   # what each operator needs to act on the resource
    "FlinkDeployment": ("spec.image", "spec.flinkVersion", "spec.serviceAccount", "spec.jobManager.resource",
                        "spec.taskManager.resource", "spec.job.jarURI", "spec.job.upgradeMode"),
    "RayCluster": ("spec.headGroupSpec.rayStartParams", "spec.headGroupSpec.template.spec.containers",
                   "spec.workerGroupSpecs"),
    "Kafka": ("spec.kafka.listeners", "spec.kafka.version", "metadata.annotations"),
    "KafkaNodePool": ("spec.replicas", "spec.roles", "spec.storage", "metadata.labels"),
    "KafkaTopic": ("spec.partitions", "spec.replicas", "metadata.labels"),
}


def test_custom_resources_carry_what_their_operators_require(rendered):
    kinds = {d["kind"] for d in rendered}
    assert set(REQUIRED) <= kinds
    for doc in rendered:
        for path in REQUIRED.get(doc["kind"], ()):
            _get(doc, path)
    kafka = next(d for d in rendered if d["kind"] == "Kafka")
    assert kafka["metadata"]["annotations"] == {"strimzi.io/node-pools": "enabled", "strimzi.io/kraft": "enabled"}
    pools = [d for d in rendered if d["kind"] == "KafkaNodePool"]
    assert any("controller" in p["spec"]["roles"] for p in pools)
    for d in pools + [d for d in rendered if d["kind"] == "KafkaTopic"]:
        assert d["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
    assert {d["metadata"]["name"] for d in rendered if d["kind"] == "KafkaTopic"} == \
        {"events", "events.dlq", "samples", "features"}
    flink = next(d for d in rendered if d["kind"] == "FlinkDeployment")
    assert flink["spec"]["job"]["entryClass"] == "org.apache.flink.client.python.PythonDriver"
    assert flink["spec"]["job"]["args"] == ["-pym", "pipeline.feature_job"]
    # the job's driver serves odl_feature_job_* on the feature job's port, open to Prometheus
    [main] = flink["spec"]["podTemplate"]["spec"]["containers"]
    odl_port = metrics_port(Config(), "feature-job")
    assert {"name": "odl-metrics", "containerPort": odl_port} in main["ports"]
    scrape = next(d for d in rendered if d["kind"] == "NetworkPolicy"
                  and d["metadata"]["name"] == "prometheus-scrapes-metrics")
    assert {"protocol": "TCP", "port": odl_port} in scrape["spec"]["ingress"][0]["ports"]
    ray = next(d for d in rendered if d["kind"] == "RayCluster")
    gpu = [g for g in ray["spec"]["workerGroupSpecs"]
           if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu and all(g["groupName"] and g["template"]["spec"]["containers"] for g in ray["spec"]["workerGroupSpecs"])


def _pod_specs(rendered):
    for d in rendered:
        if d["kind"] in ("Deployment", "StatefulSet"):
            yield d["metadata"]["name"], d["spec"]["template"]


def test_containers_commands_ports_probes_and_resources_agree_with_the_code(rendered):
    cm = next(d for d in rendered if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "odl-config")
    secret = next(d for d in rendered if d["kind"] == "Secret" and d["metadata"]["name"] == "odl-secrets")
    cfg = load_config(env={**cm["data"], **secret["stringData"]})   # every variable is understood
    seen = set()
    for name, tpl in _pod_specs(rendered):
        for c in tpl["spec"]["containers"]:
            res = c.get("resources", {})
            assert res.get("requests") and res.get("limits"), (name, "resources")
            assert c.get("readinessProbe") and c.get("livenessProbe"), (name, "probes")
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for probe in (c["readinessProbe"], c["livenessProbe"]):
                port = (probe.get("httpGet") or probe.get("tcpSocket") or {}).get("port")
                assert port is None or port in ports, (name, port)
            if c["image"].split(":")[0] not in ODL_IMAGES:
                continue
            args = c["args"]
            assert args[0] == "run" and args[1] in COMPONENTS, (name, args)
            seen.add(args[1])
            assert ports["metrics"] == metrics_port(cfg, args[1]), (name, ports)
            # liveness: the work loops' probe; readiness: the work's, or serving's API health
            assert c["livenessProbe"]["httpGet"] == {"path": HEALTH_PATH, "port": "metrics"}, name
            if args[1] == "serving":
                assert ports["http"] == cfg.serving.ports[0]
                assert c["readinessProbe"]["httpGet"] == {"path": HEALTH_PATH, "port": "http"}
            else:
                assert c["readinessProbe"]["httpGet"] == {"path": READY_PATH, "port": "metrics"}, name
    assert seen == set(COMPONENTS) - {"feature-job"}


def test_network_policies_admit_exactly_the_clients_that_need_redis_and_kafka(rendered):
    policies = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "NetworkPolicy"}
    assert policies["default-deny-ingress"]["spec"]["podSelector"] == {}
    redis_from = policies["redis-clients-only"]["spec"]["ingress"][0]["from"]
    assert redis_from == [{"podSelector": {"matchLabels": {"odl.io/redis-client": "true"}}}]
    kafka_from = policies["kafka-clients-only"]["spec"]["ingress"][0]["from"]
    assert {"podSelector": {"matchLabels": {"odl.io/kafka-client": "true"}}} in kafka_from
    uses_kafka = {"source", "feature-store"}
    for name, tpl in _pod_specs(rendered):
        labels = tpl["metadata"].get("labels", {})
        env_from = [e for c in tpl["spec"]["containers"] for e in c.get("envFrom", [])]
        if any(e.get("configMapRef", {}).get("name") == "odl-config" for e in env_from):
            assert labels.get("odl.io/redis-client") == "true", name      # every ODL process: control plane
        component = labels.get("app.kubernetes.io/name")
        if component in uses_kafka:
            assert labels.get("odl.io/kafka-client") == "true", name
        if component not in uses_kafka and component not in ("redis",):
            assert "odl.io/kafka-client" not in labels, name


# --- Dockerfile ----------------------------------------------------------------------------------
def test_dockerfile_passes_hadolint():
    out = subprocess.run([str(CACHE / "bin" / "hadolint"), "--no-color", str(REPO / "Dockerfile")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_copy_sources_exist_and_it_runs_as_non_root():
    text = (REPO / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY") and "--from=" not in line:
            sources = [w for w in line.split()[1:] if not w.startswith("--")][:-1]
            for src in sources:
                assert (REPO / src).exists(), f"COPY source {src} does not exist"
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    final = {s.split()[2]: s for s in stages if " AS " in s.split("\n")[0]}

    def last_user(target: str) -> str | None:
        """The user a target runs as: its own last USER, else its parent stage's."""
        users = re.findall(r"^USER (\S+)", final[target], flags=re.M)
        parent = final[target].split()[0]
        return users[-1] if users else (last_user(parent) if parent in final else None)

    for target in ("odl", "odl-gpu", "flink"):
        assert last_user(target) not in (None, "0", "root"), target
    assert stages[-1].split()[2] == "odl", "odl must stay the default (last) target"


def test_each_image_and_venv_gets_exactly_one_tensorflow_build():
    """tensorflow-cpu and tensorflow own one module: the core dependencies carry neither, the
    `cpu` and `gpu` extras one each, and every installer takes exactly one extra."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("reqs", REPO / "deploy/requirements.py")
    reqs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reqs)

    def tf_dists(lines):
        return {re.split(r"[\[<>=;]", r)[0].strip() for r in lines} & {"tensorflow", "tensorflow-cpu"}

    core = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert tf_dists(core) == set()
    assert tf_dists(reqs.requirements("cpu")) == {"tensorflow-cpu"}
    assert tf_dists(reqs.requirements("gpu")) == {"tensorflow"}
    assert any("[and-cuda]" in r for r in reqs.requirements("gpu"))
    docker = (REPO / "Dockerfile").read_text()
    assert re.findall(r"deploy/requirements.py (\w+)", docker) == ["cpu", "gpu"]
    assert "COPY --from=deps-gpu" in docker.split("AS odl-gpu")[1].split("FROM")[0]
    assert "COPY --from=deps-cpu" in docker.split("AS odl\n")[1]
    setup = (REPO / "scripts/setup.sh").read_text()
    assert '.[$tf,test,eval]' in setup and "pip uninstall" in setup
