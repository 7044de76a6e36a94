"""One typed configuration for every ODL process.

A config is a YAML file (optional: the defaults run the local stack with no editing) plus
environment overrides of the form ``ODL__SECTION__FIELD=value`` (values are parsed as YAML, so
``ODL__SOURCE__RATE=500`` gives an int).  Unknown fields are errors, and every error names the
field, because a silently ignored typo in a streaming deployment costs hours.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "ODL__"
REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(_Section):
    state_dir: Path = REPO_ROOT / "var"
    cache_dir: Path = REPO_ROOT / ".cache" / "odl"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def model_store(self) -> Path:
        return self.state_dir / "models"

    @property
    def checkpoints(self) -> Path:
        return self.state_dir / "checkpoints"

    @property
    def run(self) -> Path:
        return self.state_dir / "run"

    @property
    def tansu_binary(self) -> Path:
        return self.cache_dir / "bin" / "tansu"

    @property
    def flink_jars(self) -> list[Path]:
        return [self.cache_dir / "jars" / "flink-connector-kafka.jar",
                self.cache_dir / "jars" / "kafka-clients.jar"]


class KafkaConfig(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    partitions: int = Field(4, ge=1)
    # tansu joins a group in session_timeout/2, so keep it short locally.
    session_timeout_ms: int = Field(6000, ge=1000)
    topic_prefix: str = ""
    offset_gap_wait_ms: int = Field(10_000, ge=0, description=(
        "how long ODL's consumers (trainer, feature-store writer) wait for a missing offset "
        "before stepping over it: tansu 0.6 can expose a batch before an earlier one is stored "
        "(odl/offset_gaps.py). 0: no wait, for topics with transaction markers or compaction"))

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.bootstrap_servers.split(",")[0].rpartition(":")
        return host, int(port)


class RedisConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(6390, ge=1, le=65535)
    password: str | None = None
    db: int = Field(0, ge=0)
    cluster: bool = Field(False, description="host:port is a node of a Redis Cluster: clients "
                          "follow its slot map (odl/redis_conn.py); db must be 0")

    @model_validator(mode="after")
    def _cluster_db(self) -> "RedisConfig":
        if self.cluster and self.db != 0:
            raise ValueError("redis.db: a Redis Cluster has only database 0")
        return self


class RayConfig(_Section):
    # None: start/attach to the local head that `odl up` runs on 127.0.0.1:port.
    address: str | None = None
    port: int = Field(6479, ge=1, le=65535)
    loopback: bool = Field(True, description="every Ray process on 127.0.0.1 (the local stack); "
                           "false on a real cluster (containers, KubeRay)")
    num_cpus: int = Field(2, ge=1)


class SourceConfig(_Section):
    kind: Literal["synthetic", "movielens", "log"] = "synthetic"
    rate: float = Field(400.0, gt=0, description="impressions per second")
    num_users: int = Field(500, ge=1)
    num_items: int = Field(500, ge=2)
    items_per_request: int = Field(5, ge=1, le=100)
    latent_dim: int = Field(8, ge=1)
    drift_per_minute: float = Field(0.3, ge=0, description="std of the preference random walk")
    malformed_rate: float = Field(0.002, ge=0, le=1, description="share of deliberately bad events")
    click_delay_s: tuple[float, float] = (0.2, 2.0)
    movielens_dir: Path = REPO_ROOT.parent / "shared" / "data" / "movielens-small"
    movielens_speedup: float = Field(2_000_000.0, gt=0, description="dataset seconds per wall second")
    max_events: int | None = Field(None, ge=1, description="stop after this many impressions")
    seed: int = 7
    # kind log (pipeline/replay.py): a CSV or Parquet log replayed through a feature spec
    log_path: Path | None = Field(None, description="the log to replay (kind: log)")
    log_spec: Path | None = Field(None, description="the spec the log's rows are read and "
                                  "checked by; default: the pipeline's (spec)")
    log_columns: dict[str, str] = Field(default_factory=dict, description="log column -> field")
    log_speedup: float = Field(1000.0, gt=0, description="log seconds per wall second")

    @model_validator(mode="after")
    def _log_needs_a_path(self) -> "SourceConfig":
        if self.kind == "log" and self.log_path is None:
            raise ValueError("source.kind log needs source.log_path (a .csv or .parquet log)")
        return self


class FeatureJobConfig(_Section):
    parallelism: int = Field(1, ge=1)
    attribution_window_s: int = Field(10, ge=1)
    watermark_delay_ms: int = Field(1000, ge=0, description="event-time out-of-orderness allowed; "
                                    "later events go to the DLQ as late_event")
    # A partition to which nothing was produced for this long stops holding the watermark back:
    # the job's driver appends a watermark tick to it (pipeline.watermark_ticks), which Flink
    # reads after the partition's last record, so a partition with unread records is never
    # passed.  (Flink's own idleness, which judged by read time, passed backlogs during a
    # catch-up on a busy machine and sent valid events to the DLQ as late_event;
    # docs/features.md#idleness-and-catch-up.)  The price: a really quiet partition's windows
    # close up to this much (plus one tick interval) later.
    idle_timeout_s: int = Field(5, ge=1, description="seconds with nothing produced to a Kafka "
                                "partition before it stops holding the event-time watermark back")
    idleness: Literal["ticks", "flink"] = Field(
        "ticks", description="ticks: the driver ticks quiet partitions (needs write access to "
        "the events topic); flink: Flink's source idle-timeout, which can pass unread records "
        "during a catch-up (late_event)")
    operator_chaining: bool = Field(True, description="false: every operator in its own task "
                                    "(each a thread; more hand-overs)")
    # Off by default: on Flink 2.0 the SQL parse (one JSON_VALUE per field, each re-reading the
    # payload) is no faster than the Python UDF (docs/features.md#throughput)
    sql_parse: bool = Field(False, description="a spec's events that SQL proves valid skip "
                            "the Python parse (pipeline.spec_parse_sql)")
    # Click -> positive sample waits on both: a record in a network buffer between operators,
    # and the impression in the temporal joins until the watermark passes it.  Below Flink's
    # defaults (100 ms, 200 ms) to shorten that path (docs/features.md#throughput)
    buffer_timeout_ms: int = Field(10, ge=0, description="longest wait of a record in a network "
                                   "buffer between operators (execution.buffer-timeout.interval)")
    watermark_interval_ms: int = Field(50, ge=1, description="how often sources emit event-time "
                                       "watermarks (pipeline.auto-watermark-interval)")
    flink_settings: dict[str, str] = Field(
        default_factory=dict, description="more Flink configuration (key: value), applied last "
        "over ODL's own settings (pipeline.feature_job.flink_settings)")
    checkpoint_interval_s: int = Field(10, ge=1)
    restore: bool = Field(True, description="restart from the newest retained checkpoint")
    rest_ports: str = Field("8081-8099", pattern=r"^\d+(-\d+)?$",
                            description="Flink REST API port range (loopback); job metrics come from it")

    @field_validator("flink_settings", mode="before")
    @classmethod
    def _flink_scalars(cls, v: Any) -> Any:
        """Values as Flink reads them, text: a YAML number or boolean is written out."""
        if not isinstance(v, dict):
            return v
        out = {}
        for key, val in v.items():
            if not isinstance(key, str) or not key.strip() or key != key.strip():
                raise ValueError(f"Flink setting name {key!r} must be non-empty text")
            if isinstance(val, bool):
                val = str(val).lower()
            elif isinstance(val, (int, float)):
                val = str(val)
            out[key] = val
        return out

    @field_validator("rest_ports", mode="before")
    @classmethod
    def _one_port(cls, v):
        """One port (``ODL__FEATURE_JOB__REST_PORTS=8081``, read as a number) is a range of one."""
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v
    group_id: str = "odl-feature-job"
    store_group_id: str = Field("odl-feature-store", description="consumer group of the writer "
                                "that materialises feature updates into Redis")
    store_ttl_s: int = Field(7200, ge=60, description="Redis expiry of an entity's features; "
                             "longer than the longest feature window")
    # local: `odl run feature-job` runs the job in its own mini-cluster, every listener on
    # loopback; cluster: the job is submitted to a Flink cluster (docker-compose, the Flink
    # Kubernetes operator) by `python -m pipeline.feature_job`, which the cluster configures
    deployment: Literal["local", "cluster"] = "local"
    checkpoint_dir: str | None = Field(None, description="checkpoint storage URI (cluster: a shared "
                                       "volume or object store); default <state_dir>/checkpoints/flink")


class EmbeddingTableConfig(_Section):
    """One dynamic embedding table: its size, who gets a row, and when a row leaves."""
    dim: int = Field(16, ge=1)
    initial_rows: int = Field(1024, ge=2, description="rows allocated at start (at most "
                              "capacity + 1); doubles as needed")
    capacity: int = Field(1 << 20, ge=2, description="cap on trainable rows; beyond it the least "
                          "frequently used rows are evicted")
    admit_min_count: int = Field(1, ge=1, description="an id gets its own row once seen this often")
    admit_probability: float = Field(1.0, gt=0, le=1, description="or, per sighting, with this "
                                     "probability (deterministic in id and sighting)")
    filter_capacity: int = Field(1 << 18, ge=16, description="ids counted while waiting for "
                                 "admission; the stalest are forgotten beyond it")
    ttl_s: float | None = Field(None, gt=0, description="evict rows not seen for this long, in "
                                "event time; None keeps them")
    init_stddev: float = Field(0.05, ge=0)


class TrainerCheckpointConfig(_Section):
    full_interval_s: float = Field(600.0, gt=0, description="a full checkpoint this often")
    incremental_interval_s: float = Field(30.0, gt=0, description="changed rows only, in between")
    keep_full: int = Field(3, ge=1, description="full checkpoints retained, with their increments")
    restore: bool = Field(True, description="resume from the newest valid checkpoint")
    ledger: bool = Field(False, description="store the hashes of the sample ids trained since "
                         "the previous checkpoint in each one (an audit trail; tests use it)")


class TrainerScaleConfig(_Section):
    """Data-parallel scale-out (docs/training.md, "Scale-out").  ``trainers: 1, ps_shards: 0`` is
    one trainer with its tables in-process; anything else is a training group."""
    trainers: int = Field(1, ge=1, description="trainer actors, each on disjoint partitions")
    ps_shards: int = Field(0, ge=0, description="parameter-server actors holding the embedding "
                           "tables, split by id hash; 0 = tables inside the (single) trainer")
    sync_every_steps: int = Field(20, ge=1, description="steps between a trainer's dense-weight "
                                  "exchanges with the averager")
    trainer_cpus: float = Field(1.0, gt=0, description="Ray CPUs each trainer actor asks for")
    placement: Literal["spread", "pack"] = Field(
        "spread", description="the group's trainers and shards on the Ray cluster's nodes: "
        "spread (Ray's SPREAD: across the nodes, so every node's CPUs train and a lost node "
        "takes part of the group, which restarts from its epoch) or pack (Ray's default)")

    @property
    def grouped(self) -> bool:
        return self.trainers > 1 or self.ps_shards > 0

    @model_validator(mode="after")
    def _shards(self) -> "TrainerScaleConfig":
        if self.trainers > 1 and self.ps_shards == 0:
            raise ValueError("trainers > 1 share their embeddings through parameter servers: "
                             "set ps_shards >= 1")
        return self


def _default_tables() -> dict[str, EmbeddingTableConfig]:
    return {"user": EmbeddingTableConfig(), "item": EmbeddingTableConfig()}


class TrainerConfig(_Section):
    group_id: str = "odl-trainer"
    batch_size: int = Field(128, ge=1)
    max_batch_wait_ms: int = Field(
        500, ge=1,
        description="a partial batch is trained once the stream, caught up, is quiet this long")
    decode_process: bool = Field(
        True, description="fetch and decode sample records in a child process, off the "
                          "training process's GIL (trainers/decode_process.py)")
    intra_op_threads: int | None = Field(
        None, ge=1, description="TensorFlow intra-op threads of a trainer process; default: "
                                "every core but one, which the stream keeps (trainers/tf_threads.py)")
    tables: dict[str, EmbeddingTableConfig] = Field(default_factory=_default_tables)
    sparse_optimizer: Literal["adagrad", "adam", "ftrl"] = "adagrad"
    sparse_learning_rate: float = Field(0.2, gt=0)
    sparse_rate_inputs: int = Field(
        4, ge=0, description="a feature spec's table without its own learning_rate steps at "
        "sparse_learning_rate while a row feeds the network at most this many embedding inputs, "
        "and at sparse_learning_rate * this / n with n > this inputs (each input's update moves "
        "the same logit); 0: never scaled (odl.spec.net.table_learning_rate)")
    dense_learning_rate: float = Field(0.002, gt=0)
    cross_layers: int = Field(2, ge=0, description="DCN-v2 cross layers")
    hidden_units: tuple[int, ...] = (64, 32)
    batch_norm: bool = False
    auc_window: int = Field(5000, ge=100, description="samples in the progressive AUC window")
    align_labels: bool | None = Field(
        None, description="train an impression only once its label is final (trainers/align.py); "
        "None = auto: on for the bursty MovieLens replay (without it live AUC fell to 0.22), off "
        "for the synthetic stream, where it costs freshness (click to served score after "
        "Config.label_hold_ms, 41 s by default, instead of ~3-4 s) and, measured, AUC; see "
        "Config.label_alignment")
    delayed_feedback: bool | None = Field(
        None, description="train each impression at once as a provisional negative and its click "
        "as an importance-weighted positive (trainers/delayed_feedback.py); the feature job then "
        "emits provisional samples.  None = auto: on unless align_labels is true; see "
        "Config.delayed_feedback")
    frozen_baseline_after: int | None = Field(
        20000, ge=1, description="samples after which a frozen copy is scored beside the live model")
    dedup_window: int = Field(200_000, ge=1, description="recent sample ids remembered to drop "
                              "at-least-once repeats")
    num_positions: int = Field(100, ge=1)
    checkpoint: TrainerCheckpointConfig = TrainerCheckpointConfig()
    scale: TrainerScaleConfig = TrainerScaleConfig()
    seed: int = 7

    @model_validator(mode="after")
    def _tables(self) -> "TrainerConfig":
        missing = {"user", "item"} - set(self.tables)
        if missing:
            raise ValueError(f"tables must define {sorted(missing)}")
        dims = {t.dim for t in self.tables.values()}
        if len(dims) != 1:
            raise ValueError("user and item tables need one dim (the model multiplies them)")
        small = [n for n, t in self.tables.items() if t.capacity < self.batch_size]
        if small:  # one batch's distinct ids must fit, or eviction cannot make room
            raise ValueError(f"tables {small}: capacity must be at least batch_size ({self.batch_size})")
        return self

    @property
    def embedding_dim(self) -> int:
        return self.tables["user"].dim


class ExporterConfig(_Section):
    delta_interval_s: float = Field(1.0, gt=0, description="sparse deltas to Redis this often")
    dense_interval_s: float = Field(5.0, gt=0, description="dense-weight refreshes this often")
    version_interval_s: float = Field(30.0, gt=0, description="full versions this often")
    min_samples_per_version: int = Field(500, ge=0)
    keep_versions: int = Field(5, ge=1, description="versions kept in the store (retention)")
    optimised_graph: bool = Field(True, description="publish the optimised serving graph")
    precision: Literal["float32", "bfloat16"] = Field(
        "float32", description="a declared spec's optimised graph: the dense layers' arithmetic "
                               "(exporters/spec_savedmodel.py; checked per version)")
    precision_tolerance: float = Field(
        0.02, gt=0, description="largest probability difference from float32 a reduced "
                                "precision may make on the probe request, else float32 is published")
    cache_every_n_calls: int = Field(1000, ge=1, description="CallGraphOp cache refresh: calls")
    cache_every_s: float = Field(5.0, gt=0, description="CallGraphOp cache refresh: seconds")
    embedding_dtype: Literal["float32", "float16"] = "float32"
    hot_rows_per_table: int = Field(1_000_000, ge=100, description="hot-set bound in Redis")
    retire_generation_after_s: float = Field(10.0, gt=0)
    gate_auc_margin: float = Field(0.02, ge=0, le=1, description="allowed AUC drop vs served")
    gate_logloss_margin: float = Field(0.05, ge=0, description="allowed relative log-loss rise vs "
                                       "served, on the same samples (the trainer's shadow)")
    freeze_on_regression: bool = Field(
        False, description="a version refused for quality (AUC / log-loss) also freezes deltas "
        "and dense refreshes, as one refused for non-finite values always does")
    gate_min_paired: int = Field(500, ge=1, description="samples scored by both the candidate and "
                                 "the served version before the gate compares them on those")
    gate_max_row_norm: float | None = Field(
        1000.0, gt=0, description="an embedding row longer than this (L2) is refused like a "
        "non-finite one: a poisoned or diverged row; None: finiteness only")


class ServingConfig(_Section):
    host: str = "127.0.0.1"
    ports: tuple[int, ...] = (8501, 8502)
    model_name: str = "ctr"
    xla: Literal["auto", "on", "off"] = Field(
        "auto", description="serve the optimised graph's XLA twins (compiled per batch bucket "
        "when the model loads): auto = when this replica sees a GPU")
    max_instances: int = Field(1000, ge=1)
    max_candidates: int = Field(1000, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    poll_interval_s: float = Field(1.0, gt=0)
    # request batching (serving.batching): rows per model call, how long a request waits for
    # company, inference worker threads sharing the loaded model; batching off = one call each
    batching: bool = True
    batch_max_rows: int = Field(1024, ge=1)
    batch_max_wait_ms: float = Field(2.0, ge=0)
    inference_workers: int = Field(2, ge=1, le=64)
    # local embedding cache (serving.embedding_cache) and degraded mode (serving.guard)
    cache_rows_per_table: int = Field(200_000, ge=0)
    cache_ttl_s: float = Field(30.0, gt=0)
    item_features_ttl_s: float = Field(1.0, ge=0, description="an item's request-time features are "
                                       "reused this long within their minute (serving.features); 0: never")
    redis_timeout_s: float = Field(0.25, gt=0)
    redis_retry_s: float = Field(1.0, gt=0)


class ControlConfig(_Section):
    heartbeat_interval_s: float = Field(2.0, gt=0)
    heartbeat_ttl_s: int = Field(15, ge=2)


class SupervisionConfig(_Section):
    """Restart budgets (``odl.supervision.RestartBudget``): a rate, so rare failures over weeks
    never add up to a give-up while a crash loop still ends visibly."""
    max_restarts: int = Field(10, ge=0, description="restarts allowed within window_s")
    window_s: float = Field(3600.0, gt=0, description="the budget's sliding window")
    reconnect_timeout_s: float = Field(300.0, gt=0, description="longest wait for a restarting "
                                       "actor to answer again before the supervisor gives up")


class MetricsConfig(_Section):
    enabled: bool = True
    host: str = Field("127.0.0.1", description="Prometheus endpoints bind here (0.0.0.0 in containers)")
    # Each component instance gets base_port + offset (odl.runtime.metrics_port).
    base_port: int = Field(9300, ge=1024, le=65000)
    stall_s: float = Field(120.0, gt=0, description="liveness (/healthz) fails once a work loop "
                           "made no progress this long (odl.probes)")


class Config(_Section):
    # the feature spec the stages run (odl.spec): its events, features and label.  The default
    # shape runs the whole stack; another spec runs source, feature job and trainer
    # (docs/features.md#running-a-spec)
    spec: Path = Field(REPO_ROOT / "specs" / "default.yaml", description="the feature spec "
                       "the pipeline runs, e.g. specs/adlog.yaml")
    paths: PathsConfig = PathsConfig()
    kafka: KafkaConfig = KafkaConfig()
    redis: RedisConfig = RedisConfig()
    ray: RayConfig = RayConfig()
    source: SourceConfig = SourceConfig()
    feature_job: FeatureJobConfig = FeatureJobConfig()
    trainer: TrainerConfig = TrainerConfig()
    exporter: ExporterConfig = ExporterConfig()
    serving: ServingConfig = ServingConfig()
    control: ControlConfig = ControlConfig()
    supervision: SupervisionConfig = SupervisionConfig()
    metrics: MetricsConfig = MetricsConfig()

    @field_validator("spec")
    @classmethod
    def _spec_path(cls, v: Path) -> Path:
        """Absolute, so every process of a stack reads the same file whatever its working
        directory: relative to the working directory if the file is there, else to the
        repository (``specs/adlog.yaml`` works from anywhere)."""
        if v.is_absolute():
            return v
        here = Path.cwd() / v
        return here.resolve() if here.exists() else (REPO_ROOT / v).resolve()

    @model_validator(mode="after")
    def _ports_distinct(self) -> "Config":
        if len(set(self.serving.ports)) != len(self.serving.ports):
            raise ValueError("serving.ports must be distinct")
        if self.trainer.scale.trainers > self.kafka.partitions:
            raise ValueError(f"trainer.scale.trainers ({self.trainer.scale.trainers}) exceeds the "
                             f"samples topic's kafka.partitions ({self.kafka.partitions}): a "
                             "trainer would have no partition")
        if self.trainer.delayed_feedback and self.trainer.align_labels:
            raise ValueError("trainer.delayed_feedback trains impressions before their labels are "
                             "final: it cannot be combined with trainer.align_labels: true")
        return self

    @property
    def delayed_feedback(self) -> bool:
        """Whether impressions are trained at once as provisional negatives
        (``trainer.delayed_feedback`` resolved: auto means on unless labels are aligned, which
        it replaces -- the same calibration without the alignment's hold; docs/evaluation.md)."""
        if self.trainer.delayed_feedback is not None:
            return self.trainer.delayed_feedback
        return self.trainer.align_labels is not True

    @property
    def label_alignment(self) -> bool:
        """Whether the trainer holds samples for their final labels (``trainer.align_labels``,
        resolved: auto means on for the MovieLens replay only)."""
        if self.delayed_feedback:
            return False
        if self.trainer.align_labels is not None:
            return self.trainer.align_labels
        return self.source.kind == "movielens"

    @property
    def label_hold_ms(self) -> int:
        """How long an impression's label may still change: the attribution window, the idle
        timeout that closes a quiet partition's window, and the watermark delay."""
        fj = self.feature_job
        return 1000 * (fj.attribution_window_s + fj.idle_timeout_s) + fj.watermark_delay_ms


def _set_path(tree: dict[str, Any], dotted: list[str], value: Any) -> None:
    node = tree
    for part in dotted[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(dotted)}: cannot override inside a scalar")
    node[dotted[-1]] = value


def _format_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {field}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, env: dict[str, str] | None = None) -> Config:
    """Load YAML (if given), apply ``ODL__A__B`` env overrides, validate.  Raises ConfigError."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    origin = "defaults"
    path = path or env.get("ODL_CONFIG")
    if path:
        p = Path(path)
        origin = str(p)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        raw = loaded
    overrides = sorted(k for k in env if k.startswith(ENV_PREFIX))
    for key in overrides:
        dotted = [part.lower() for part in key[len(ENV_PREFIX):].split("__")]
        try:
            value = yaml.safe_load(env[key])
        except yaml.YAMLError:
            value = env[key]
        _set_path(raw, dotted, value)
    if overrides:
        origin += " + env " + ", ".join(overrides)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, origin)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
