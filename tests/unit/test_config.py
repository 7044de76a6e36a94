import pytest
from pydantic import ValidationError

from odl.config import ConfigError, load_config
from tests.conftest import make_config


def test_defaults_need_no_file():
    cfg = load_config(env={})
    assert cfg.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert cfg.serving.host == "127.0.0.1"


def test_env_overrides_are_typed():
    cfg = load_config(env={"ODL__SOURCE__RATE": "123.5", "ODL__SERVING__PORTS": "[9001, 9002, 9003]"})
    assert cfg.source.rate == 123.5
    assert cfg.serving.ports == (9001, 9002, 9003)
    # one port for a port range: the variable reads as a number, the field keeps a range string
    assert load_config(env={"ODL__FEATURE_JOB__REST_PORTS": "8081"}).feature_job.rest_ports == "8081"


def test_yaml_file_then_env(tmp_path):
    p = tmp_path / "odl.yaml"
    p.write_text("trainer:\n  batch_size: 64\nsource:\n  kind: movielens\n")
    cfg = load_config(p, env={"ODL__TRAINER__BATCH_SIZE": "32"})
    assert cfg.trainer.batch_size == 32
    assert cfg.source.kind == "movielens"


@pytest.mark.parametrize("text,field", [
    ("trainer:\n  batch_size: -1\n", "trainer.batch_size"),
    ("trainer:\n  batchsize: 10\n", "trainer.batchsize"),
    ("source:\n  kind: kafka\n", "source.kind"),
    ("nosuchsection: {}\n", "nosuchsection"),
])
def test_broken_config_names_the_field(tmp_path, text, field):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(p, env={})
    assert field in str(err.value)


def test_broken_env_override_names_the_field():
    with pytest.raises(ConfigError, match="redis.port"):
        load_config(env={"ODL__REDIS__PORT": "not-a-port"})


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", env={})
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p, env={})


def test_duplicate_serving_ports_rejected():
    with pytest.raises(ConfigError, match="distinct"):
        load_config(env={"ODL__SERVING__PORTS": "[8501, 8501]"})


def test_table_capacity_below_the_batch_size_is_refused():
    from odl.config import TrainerConfig
    with pytest.raises(ValueError, match="capacity must be at least batch_size"):
        TrainerConfig(batch_size=512, tables={"user": {"capacity": 100}, "item": {}})


def test_flink_settings_are_applied_last_over_odls_own(tmp_path):
    from pipeline.feature_job import flink_settings
    cfg = make_config(tmp_path, feature_job={"flink_settings": {
        "execution.buffer-timeout.interval": "100 ms", "taskmanager.numberOfTaskSlots": 2,
        "pipeline.object-reuse": False}})
    got = flink_settings(cfg)
    assert got["execution.buffer-timeout.interval"] == "100 ms"      # replaces ODL's 10 ms
    assert got["taskmanager.numberOfTaskSlots"] == "2"                # YAML scalars as text
    assert got["pipeline.object-reuse"] == "false"
    assert got["pipeline.auto-watermark-interval"] == "50 ms"         # the rest stays ODL's
    assert flink_settings(make_config(tmp_path))["execution.buffer-timeout.interval"] == "10 ms"
    env = {"ODL__FEATURE_JOB__FLINK_SETTINGS": "{state.backend.type: rocksdb}"}
    assert load_config(env=env).feature_job.flink_settings == {"state.backend.type": "rocksdb"}
    for bad in ({" x": "1"}, {"x": {"nested": 1}}, ["x"]):
        with pytest.raises(ValidationError, match="flink_settings"):
            make_config(tmp_path, feature_job={"flink_settings": bad})
