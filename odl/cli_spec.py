"""``odl spec``: check a feature spec and show what it declares (``odl.spec``)."""
from __future__ import annotations

import json
from collections import Counter

import click

from odl.config import ConfigError, TrainerConfig, load_config
from odl.spec import FeatureSpec, SpecError, load_spec


def _tables(spec: FeatureSpec, trainer: TrainerConfig | None) -> dict[str, dict]:
    """Each table's dim and capacity; with ``trainer``, its sparse learning rate as the trainer
    will use it (``odl.spec.net.table_learning_rate``)."""
    tables = {n: {"dim": t.dim, "capacity": t.capacity} for n, t in spec.tables.items()}
    if trainer is not None:
        from odl.spec.net import SpecNet, table_learning_rate
        inputs = len(SpecNet.of(spec).inputs)
        for n, t in spec.tables.items():
            tables[n]["learning_rate"] = round(table_learning_rate(
                t, inputs, trainer.sparse_learning_rate, trainer.sparse_rate_inputs), 6)
    return tables


def summary(spec: FeatureSpec, trainer: TrainerConfig | None = None) -> dict:
    """What a spec declares, in the terms an operator checks it by; with ``trainer`` (the
    config's section), each table's sparse learning rate as the trainer will use it."""
    rt = spec.realtime
    from pipeline.spec_parse_sql import sql_parse_gap
    from pipeline.spec_sql import SpecJobError, check_streamable
    gap = sql_parse_gap(spec)
    try:
        check_streamable(spec)
        stream = ("runs it: `spec: FILE` in the config (or ODL__SPEC=FILE) and the feature job, "
                  "trainer, exporter and serving derive from it")
    except SpecJobError as exc:
        stream = f"refuses it: {exc}" + ("; odl eval --spec evaluates it" if spec.label.field else "")
    return {
        "name": spec.name, "hash": spec.hash,
        "fields": {n: f.type + (" (required)" if f.required is True else
                                f" (required for {', '.join(f.required)})" if f.required else "")
                   for n, f in spec.events.fields.items()},
        "tables": _tables(spec, trainer),
        "sparse": {n: f"{'x'.join(s.inputs)} -> {s.table}" for n, s in spec.sparse.items()},
        "numeric": {n: f"{f.field} ({f.transform})" for n, f in spec.numeric.items()},
        "counts": {n: f"{'x'.join(c.key)}: {', '.join(c.values)} over {', '.join(c.windows)}"
                   for n, c in rt.counts.items()},
        "sequences": {n: f"last {s.length} {s.value} of a {s.key} -> {s.table} ({s.pooling})"
                      for n, s in rt.sequences.items()},
        "label": (f"join {spec.label.join.impression}/{spec.label.join.click} on "
                  f"{'+'.join(spec.label.join.key)} within {spec.label.join.attribution_window_s} s"
                  if spec.label.join else f"field {spec.label.field}"),
        "serving": (f"predict takes {', '.join(spec.serving.request) or 'no fields'}"
                    + (f"; recommend scores candidates of {', '.join(spec.serving.candidates)}"
                       if spec.serving.candidates else "; no recommend (serving.candidates unset)")),
        "live_pipeline": stream,
        "event_parse": ("in Python; with feature_job.sql_parse, valid events are proven in SQL "
                        "and skip it" if gap is None else f"in Python only: {gap}"),
    }


@click.group("spec")
def spec() -> None:
    """Feature specs: the events, tables and features of a log (specs/*.yaml)."""


def log_report(spec: FeatureSpec, path: str, columns: dict[str, str], examples: int = 3) -> dict:
    """How a log reads through a spec: rows, refusals by reason (first row numbers), columns
    the spec ignores, rows behind the log's clock."""
    from odl.spec.logs import log_columns, read_log
    header = log_columns(path, columns)
    fields = spec.events.fields
    reasons: Counter[str] = Counter()
    first: dict[str, list[int]] = {}
    rows = behind = 0
    clock = None
    tf = spec.events.time_field
    for row in read_log(spec, path, columns):
        rows += 1
        if row.reason is not None:
            reasons[row.reason] += 1
            first.setdefault(row.reason, [])
            if len(first[row.reason]) < examples:
                first[row.reason].append(row.number)
            continue
        ts = row.values[tf]
        behind += clock is not None and ts < clock
        clock = ts if clock is None else max(clock, ts)
    return {"log": path, "rows": rows, "valid": rows - sum(reasons.values()),
            "refused": {r: {"rows": c, "first": first[r]} for r, c in reasons.most_common()},
            "ignored_columns": [c for c in header if c not in fields
                                and c not in (spec.events.type_field, spec.events.version_field)],
            "missing_required_columns": [n for n, f in fields.items()
                                         if f.required is True and not f.path and n not in header],
            "out_of_time_order": int(behind)}


@spec.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--log", "log_path", type=click.Path(dir_okay=False, exists=True),
              help="also read this CSV / Parquet log through the spec")
@click.option("--column", "renames", multiple=True, metavar="LOG=FIELD",
              help="a log column that carries a field under another name")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def check(path: str, log_path: str | None, renames: tuple[str, ...], as_json: bool) -> None:
    """Validate a spec; every problem is named.  Exit 1 if it cannot work, or if a --log has
    no valid row."""
    try:
        s = load_spec(path)
        trainer = load_config().trainer    # the rates the trainer will use (ODL__TRAINER__*)
    except (SpecError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from None
    out = summary(s, trainer)
    if log_path:
        bad = [r for r in renames if r.count("=") != 1]
        if bad:
            raise click.ClickException(f"--column {bad[0]!r}: give LOG=FIELD")
        try:
            out["log"] = log_report(s, log_path, dict(r.split("=") for r in renames))
        except (OSError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(out, indent=1))
        if "log" in out and out["log"]["valid"] == 0:
            raise SystemExit(1)
        return
    click.echo(f"spec {out['name']} ({out['hash']}): ok")
    for section in ("fields", "tables", "sparse", "numeric", "counts", "sequences"):
        if out[section]:
            click.echo(f"  {section}:")
            for k, v in out[section].items():
                click.echo(f"    {k}: {v}")
    click.echo(f"  label: {out['label']}")
    click.echo(f"  serving: {out['serving']}")
    click.echo(f"  live pipeline: {out['live_pipeline']}")
    click.echo(f"  event parse: {out['event_parse']}")
    if "log" in out:
        lg = out["log"]
        click.echo(f"log {lg['log']}: {lg['rows']:,} rows, {lg['valid']:,} valid, "
                   f"{lg['out_of_time_order']:,} behind the log's clock")
        for reason, r in lg["refused"].items():
            click.echo(f"  refused {reason}: {r['rows']:,} (rows {', '.join(map(str, r['first']))}...)")
        for key in ("ignored_columns", "missing_required_columns"):
            if lg[key]:
                click.echo(f"  {key.replace('_', ' ')}: {', '.join(lg[key])}")
    if "log" in out and out["log"]["valid"] == 0:
        raise click.ClickException("no row of the log is valid under this spec")
