from odl.config import Config
from pipeline.feature_job import JobTopics, statements


def test_job_sql_routes_rejects_and_joins_within_the_window():
    cfg = Config.model_validate({"feature_job": {"attribution_window_s": 17, "watermark_delay_s": 3}})
    ddl, inserts = statements(cfg, JobTopics("ev", "sa", "dl"))
    text = "\n".join(ddl + inserts)
    assert "'topic' = 'ev'" in text and "'topic' = 'sa'" in text and "'topic' = 'dl'" in text
    assert "INTERVAL '17' SECOND" in inserts[0] and "LEFT JOIN" in inserts[0]
    assert "INTERVAL '3' SECOND" in ddl[0]
    assert "reason IS NOT NULL" in inserts[1]
