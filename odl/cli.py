"""`odl`: run a component, bring the local stack up or down, and steer a running deployment."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import click

from odl.config import ConfigError, dump_config, load_config

COMPONENTS = ("source", "feature-job", "feature-store", "trainer", "exporter", "serving")
# The feature job follows its input: pausing the source pauses it.  (Pausing Flink itself means
# stop-with-savepoint and resume-from-savepoint; that belongs to the feature-pipeline work.)
PAUSABLE = ("source", "trainer", "exporter")


def _cfg(config: str | None):
    try:
        return load_config(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


config_option = click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
                             envvar="ODL_CONFIG", help="YAML config file (default: local defaults)")


@click.group()
def main() -> None:
    """ODL: streaming online learning for recommendation."""


@main.command()
@click.argument("component", type=click.Choice(COMPONENTS))
@click.option("--replica", type=int, default=0, help="serving replica index")
@click.option("--no-ray", is_flag=True, help="trainer: run in this process instead of a Ray actor")
@config_option
def run(component: str, replica: int, no_ray: bool, config: str | None) -> None:
    """Run one long-lived component in the foreground."""
    cfg = _cfg(config)
    from odl.spec import SpecError, running_spec
    try:
        running_spec(cfg)
    except SpecError as exc:
        raise click.ClickException(str(exc)) from None
    if component == "source":
        from pipeline.source import run as fn
        rc = fn(cfg)
    elif component == "feature-job":
        from pipeline.feature_job import run as fn
        rc = fn(cfg)
    elif component == "feature-store":
        from pipeline.feature_store_writer import run as fn
        rc = fn(cfg)
    elif component == "trainer" and no_ray:
        from trainers.loop import run_standalone
        rc = run_standalone(cfg)
    elif component == "trainer":
        from trainers.actor import run as fn
        rc = fn(cfg)
    elif component == "exporter":
        from exporters.exporter import run as fn
        rc = fn(cfg)
    else:
        from serving.run import run as fn
        rc = fn(cfg, replica)
    sys.exit(rc)


@main.command()
@config_option
def config(config: str | None) -> None:
    """Print the effective configuration (file + ODL__ environment overrides)."""
    click.echo(dump_config(_cfg(config)), nl=False)


@main.command()
@config_option
def up(config: str | None) -> None:
    """Start broker, Redis, Ray and every component on loopback; returns when all are started."""
    from odl.launcher import LocalStack, StackError
    stack = LocalStack(_cfg(config), config)
    try:
        stack.up(click.echo)
    except StackError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("stack is up: `odl status` to watch, `odl down` to stop")


@main.command()
@config_option
def down(config: str | None) -> None:
    """Stop everything `odl up` started."""
    from odl.launcher import LocalStack
    LocalStack(_cfg(config), config).down(click.echo)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


KEY_METRICS = {"source": ("impression", "click", "malformed", "events_per_s"),
               "feature-job": ("events_in_per_s", "watermark_lag_s", "positives", "negatives",
                               "dlq", "dlq_reasons"),
               "feature-store": ("updates_per_s", "written", "malformed", "redis_errors"),
               "trainer": ("samples_trained", "auc", "auc_live_vs_frozen", "auc_frozen", "logloss", "calibration", "samples_per_s", "duplicates",
                           "rows_user", "rows_item", "checkpoint"),
               "exporter": ("latest_version", "generation", "refresh_seq", "rows_pushed",
                            "hot_rows_user", "hot_rows_item", "redis_used_memory_bytes", "refused",
                            "restored_for"),
               "serving": ("generation", "requests", "qps", "p50_ms", "p99_ms", "mean_batch_rows", "cache_rows",
                           "dense_refresh", "degraded", "model_age_s", "data_age_s", "xla", "port")}


@main.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@config_option
def status(as_json: bool, config: str | None) -> None:
    """A table of every component: state, heartbeat age, version, key metrics."""
    from odl.control import ControlPlane
    from odl.launcher import LocalStack
    cfg = _cfg(config)
    cp = ControlPlane(cfg)
    try:
        beats = cp.heartbeats()
        paused, served, refused = cp.paused(), cp.served_version(), cp.refused()[:3]
        frozen = cp.frozen()
        restarts = cp.restarts()
    except Exception as exc:  # noqa: BLE001
        raise click.ClickException(f"control plane (Redis {cfg.redis.host}:{cfg.redis.port}) "
                                   f"unreachable: {exc}") from None
    stack = LocalStack(cfg, config)
    dead = {name: code for name, code, _ in stack.crashed()}
    rows = []
    for hb in beats:
        stale = hb.age_s > 3 * cfg.control.heartbeat_interval_s
        state = hb.state + (" (stale)" if stale else "")
        if hb.instance in dead:
            state = "EXITED"
        metrics = {k: hb.metrics.get(k) for k in KEY_METRICS.get(hb.component, ()) if k in hb.metrics}
        if restarts.get(hb.instance):
            metrics["restarts"] = restarts[hb.instance]
        rows.append({"instance": hb.instance, "state": state, "age_s": round(hb.age_s, 1),
                     "paused": hb.component in paused, "version": hb.version, "metrics": metrics})
    for name in dead:
        if not any(r["instance"] == name for r in rows):
            rows.append({"instance": name, "state": "EXITED", "age_s": None, "paused": False,
                         "version": None, "metrics": {}})
    if as_json:
        click.echo(json.dumps({"components": rows, "served_version": served,
                               "paused": sorted(paused), "refused": refused,
                               "frozen": frozen}, indent=1))
        return
    click.echo(f"served version: {served or '-'}   paused: {', '.join(sorted(paused)) or '-'}")
    click.echo(f"{'INSTANCE':<14} {'STATE':<20} {'AGE':>6}  {'VERSION':<10} METRICS")
    for r in rows:
        m = " ".join(f"{k}={_fmt(v)}" for k, v in r["metrics"].items())
        age = "-" if r["age_s"] is None else f"{r['age_s']}s"
        ver = (r["version"] or "-")[:10]
        click.echo(f"{r['instance']:<14} {r['state']:<20} {age:>6}  {ver:<10} {m}")
    for name, code in dead.items():
        click.echo(f"!! {name} exited (code {code if code is not None else '?'}); "
                   f"see {cfg.paths.logs / (name + '.log')}")
    for rec in refused:
        click.echo(f"refused version {rec.get('version')}: {rec.get('reason')}")
    if frozen:
        click.echo(f"FROZEN: the gate refused {frozen.get('what')}: {frozen.get('reason')}; sparse "
                   "and dense publishing held until a version passes, `odl publish --skip-gate` "
                   "or `odl resume exporter`")


def _set_paused(component: str, config: str | None, paused: bool) -> None:
    from odl.control import ControlPlane
    cp = ControlPlane(_cfg(config))
    (cp.pause if paused else cp.resume)(component)
    click.echo(f"{'paused' if paused else 'resumed'} {component}")


@main.command()
@click.argument("component", type=click.Choice(PAUSABLE))
@config_option
def pause(component: str, config: str | None) -> None:
    """Pause a component (it keeps its position and heartbeat)."""
    _set_paused(component, config, True)


@main.command()
@click.argument("component", type=click.Choice(PAUSABLE))
@config_option
def resume(component: str, config: str | None) -> None:
    """Resume a paused component (for the exporter: also lift a gate freeze)."""
    _set_paused(component, config, False)


@main.command()
@config_option
def versions(config: str | None) -> None:
    """Registered model versions, newest last."""
    from odl.control import ControlPlane
    cp = ControlPlane(_cfg(config))
    served = cp.served_version()
    for m in cp.versions():
        mark = "*" if m["version"] == served else " "
        created = time.strftime("%H:%M:%S", time.localtime(m["created_at"]))
        click.echo(f"{mark} {m['version']:>5}  {created}  step={m['trainer_step']:<7} "
                   f"auc={_fmt(m['metrics'].get('auc'))}  parent={m['parent']}  "
                   f"generation={m.get('embedding_generation')}  "
                   f"rows={sum((m.get('embedding_rows') or {}).values())}")
    for rec in cp.refused()[:5]:
        click.echo(f"  refused {rec.get('version')} (step {rec.get('step')}): {rec.get('reason')}")


@main.command()
@click.option("--skip-gate", is_flag=True, help="publish even if the quality gate refuses")
@config_option
def publish(skip_gate: bool, config: str | None) -> None:
    """Ask the exporter for a full version now (it answers within a second)."""
    from odl.control import ControlPlane
    ControlPlane(_cfg(config)).request_publish(skip_gate)
    click.echo("publish requested" + (" (quality gate skipped)" if skip_gate else ""))


def _rollout(fleet, cp, target: str | None, timeout: float, wait: bool) -> None:
    """Wait until every live serving replica reports ``target`` and Redis holds the rows it
    must be served with; exit 1 naming what did not happen."""
    if target is None:
        click.echo("no version registered yet")
        return
    if not wait:
        return
    wanted = fleet.embeddings_wanted(cp, target)
    out = fleet.wait_for(cp, target, timeout_s=timeout, embeddings=wanted)
    for inst, v in sorted(out.reached.items()):
        click.echo(f"  {inst:<12} serves {v} (dense version/embedding generation)")
    for inst in out.stale:
        click.echo(f"  {inst:<12} no recent heartbeat (down?): will load {target} when it is back")
    if not out.reached and not out.lagging:
        click.echo("  no live serving replica reports a heartbeat")
    if out.lagging:
        for inst, v in sorted(out.lagging.items()):
            click.echo(f"  {inst:<12} still serves {v or '-'}", err=True)
        gen = (out.embeddings_record or {}).get("generation") if out.embeddings else None
        pair = f"{target}/g{gen}" if gen is not None else f"version {target}"
        raise click.ClickException(f"{len(out.lagging)} replica(s) did not reach {pair} "
                                   f"within {timeout:g} s")
    if out.embeddings is not True:
        rec = out.embeddings_record or {}
        why = (rec.get("reason") or "the exporter recorded a failure") if out.embeddings is False \
            else f"the exporter did not confirm within {timeout:g} s (is it running?)"
        raise click.ClickException(
            f"every live replica serves version {target}, but Redis does not hold "
            f"{'its embeddings' if wanted.source == 'version' else 'the trainer rows'}: {why}; "
            "serving reads the rows Redis holds now")
    held = f" with its own embeddings (generation {out.embeddings_record.get('generation')})" \
        if wanted.source == "version" else ""
    click.echo(f"every live replica serves version {target}{held} ({out.waited_s:.1f} s)")


def _steer(config: str | None, timeout: float, no_wait: bool, action: str, message: str, *args,
           trainer: tuple[bool] | None = None) -> None:
    """Apply the fleet action ``odl.fleet.<action>(cp, *args)`` (it returns the version the fleet
    must serve), say what was done (``message`` may name {target}), then wait for every replica.
    ``trainer``: (skip_ahead,) to roll the trainer back to the target's checkpoint too."""
    from odl import fleet
    from odl.control import ControlPlane
    cp = ControlPlane(_cfg(config))
    try:
        target = getattr(fleet, action)(cp, *args)
    except fleet.FleetError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(message.format(target=target or "-"))
    if trainer is not None:
        try:
            done = fleet.rollback_trainer(cp, target, trainer[0], timeout_s=timeout)
        except fleet.FleetError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"trainer rolled back to {done['checkpoint']} (step {done['step']}), "
                   f"{'skipping ahead to the newest samples' if done['mode'] == 'skip-ahead' else 'replaying the samples since'}; "
                   f"new checkpoint {done['written']}")
    _rollout(fleet, cp, target, timeout, not no_wait)


def _with_wait(fn):
    """The options every fleet command shares."""
    fn = click.option("--no-wait", is_flag=True, help="return once the control plane is set")(fn)
    return click.option("--timeout", type=float, default=60.0, show_default=True,
                        help="seconds to wait for every replica")(fn)


@main.command()
@click.option("--to", "to", default=None, help="version to roll back to (default: the one before "
                                               "the version served now)")
@click.option("--trainer", "with_trainer", is_flag=True,
              help="also roll the trainer back to the checkpoint the version was cut from")
@click.option("--skip-ahead", is_flag=True,
              help="with --trainer: go on from the newest samples instead of replaying those "
                   "since that checkpoint")
@_with_wait
@config_option
def rollback(to: str | None, with_trainer: bool, skip_ahead: bool, timeout: float, no_wait: bool,
             config: str | None) -> None:
    """Pin every replica to an earlier version and pause publishing (until `odl resume exporter`)."""
    from odl.fleet import ROLLBACK_PAUSES
    if skip_ahead and not with_trainer:
        raise click.UsageError("--skip-ahead goes with --trainer")
    _steer(config, timeout, no_wait, "rollback",
           "rolling back to version {target}: pinned; " + ROLLBACK_PAUSES + " paused (the exporter "
           "restores that version's embeddings); `odl unpin` and `odl resume exporter` to roll forward", to,
           trainer=(skip_ahead,) if with_trainer else None)


@main.command()
@click.argument("version")
@_with_wait
@config_option
def pin(version: str, timeout: float, no_wait: bool, config: str | None) -> None:
    """Serve VERSION on every replica until `odl unpin` (publishing goes on)."""
    _steer(config, timeout, no_wait, "pin", "pinned to version {target}", version)


@main.command()
@_with_wait
@config_option
def unpin(timeout: float, no_wait: bool, config: str | None) -> None:
    """Follow the newest version again."""
    _steer(config, timeout, no_wait, "unpin", "unpinned: serving follows the newest version ({target})")


@main.command()
@click.argument("version")
@_with_wait
@config_option
def promote(version: str, timeout: float, no_wait: bool, config: str | None) -> None:
    """Serve VERSION as the newest version (unpinned: the next published version replaces it)."""
    _steer(config, timeout, no_wait, "promote", "promoted version {target}", version)


@main.command()
@click.option("--duration", type=float, default=180.0, show_default=True, help="seconds to run")
@config_option
def demo(duration: float, config: str | None) -> None:
    """Bring the stack up, run it with live progress, print a report, bring it down."""
    from odl.demo import run_demo
    sys.exit(run_demo(_cfg(config), config, duration))


@main.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.option("--list", "list_", is_flag=True, help="list the benchmarks")
@click.option("--scale", type=click.IntRange(2, 16), default=None,
              help="trainer: N trainers (with N parameter-server shards) vs 1 on the same samples")
@click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="trainer, serving-graph, feature-job, spec-parse: the model, samples or generated job of "
                   "this feature spec, e.g. specs/adlog.yaml (trainer, feature-job: a spec whose rows carry their label)")
@click.option("--seed", type=int, default=None, help="chaos: the random seed of the fault plan")
@click.option("--faults", default=None,
              help="chaos: fault counts in place of the default plan's, e.g. 'feature-job=3,redis=0'")
@config_option
def bench(name: str | None, as_json: bool, list_: bool, scale: int | None,
          spec_path: str | None, seed: int | None, faults: str | None,
          config: str | None) -> None:
    """Run a benchmark under bench/ (ratios measured side by side in one run)."""
    from bench import registry
    from odl.spec import SpecError
    if list_ or not name:
        for n, doc in registry.available().items():
            click.echo(f"{n:<20} {doc}")
        return
    try:
        options = {k: v for k, v in (("scale", scale), ("spec", spec_path), ("seed", seed),
                                     ("faults", faults)) if v is not None}
        result = registry.run(name, _cfg(config), **options)
    except KeyError:
        raise click.ClickException(f"unknown benchmark {name!r}; `odl bench --list`") from None
    except (TypeError, RuntimeError, SpecError) as exc:   # bad options or spec, or what it needs is not running
        raise click.ClickException(f"{name}: {exc}") from None
    click.echo(registry.render(name, result, as_json))


def _spec_log(spec_path, log_path, renames, synthetic, no_features, click_delay_s, seed):
    """The log of ``odl eval --spec``, or a ClickException saying which option does not fit."""
    from odl.spec import SpecError, load_spec
    from trainers.evaluation.spec_log import load_spec_log
    clash = [o for o, on in (("--synthetic", synthetic), ("--no-features", no_features)) if on]
    if clash:
        raise click.ClickException(f"--spec: {clash[0]} does not apply (the spec declares the "
                                   "log and its features)")
    if not log_path or not Path(log_path).is_file():
        raise click.ClickException("--spec needs --log FILE: a CSV or Parquet log")
    bad = [r for r in renames if r.count("=") != 1]
    if bad:
        raise click.ClickException(f"--column {bad[0]!r}: give LOG=FIELD")
    try:
        spec = load_spec(spec_path)
    except SpecError as exc:
        raise click.ClickException(str(exc)) from None
    return load_spec_log(spec, log_path, dict(r.split("=") for r in renames), click_delay_s, seed)


@main.command("eval")
@click.option("--log", "log_dir", type=click.Path(exists=True), default=None,
              help="a MovieLens-format directory (ratings.csv; default: source.movielens_dir), "
              "or with --spec a CSV / Parquet log")
@click.option("--spec", "spec_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="a feature spec whose rows carry their label (specs/movielens.yaml): the "
              "model and the peers see the features it declares")
@click.option("--column", "renames", multiple=True, metavar="LOG=FIELD",
              help="--spec: a log column that carries a field under another name")
@click.option("--synthetic", is_flag=True, help="the synthetic stream instead of a log")
@click.option("--impressions", type=click.IntRange(1000), default=100_000, show_default=True,
              help="--synthetic: impressions to generate")
@click.option("--limit", type=click.IntRange(1000), default=None, help="only the first N rows")
@click.option("--delay", is_flag=True, help="labels after the click delay and attribution window, "
              "as in the stream (adds the aligned and delayed-feedback modes)")
@click.option("--period-h", type=float, default=None, help="daily retrain period in hours of event "
              "time (default: a tenth of the span, at least a day once the log spans ten days)")
@click.option("--epochs", type=click.IntRange(1, 20), default=3, show_default=True)
@click.option("--no-peers", is_flag=True, help="skip River and Vowpal Wabbit")
@click.option("--no-features", is_flag=True, help="ids only: leave the real-time features out")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="var/eval",
              show_default=True, help="where the PNG and the table go")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@config_option
def eval_(log_dir, spec_path, renames, synthetic, impressions, limit, delay, period_h, epochs,
          no_peers, no_features, out_dir, as_json, config) -> None:
    """Replay a time-ordered log through the trainer's model beside plain peers (no servers).

    Every row is scored before anyone learns it; prints AUC, log-loss and calibration of the
    online model, a copy frozen half-way, a periodic retrain, item popularity, River and VW."""

    from trainers.evaluation.logs import movielens_log, synthetic_log
    from trainers.evaluation.run import EvalOptions, evaluate
    cfg = _cfg(config)
    t0 = time.perf_counter()
    say = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    try:
        if spec_path:
            log = _spec_log(spec_path, log_dir, renames, synthetic, no_features,
                            cfg.source.click_delay_s if delay else None, cfg.source.seed)
        elif synthetic:
            log = synthetic_log(cfg.source, impressions)
        else:
            log = movielens_log(Path(log_dir) if log_dir else cfg.source.movielens_dir,
                                cfg.source.click_delay_s, cfg.source.seed)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if limit:
        log = log.head(limit)
    if not no_features and not spec_path:
        log = log.with_features()
    say(f"odl eval: {log.name}, {len(log):,} rows, click rate {log.label.mean():.3f}")
    if getattr(log, "refused", None):
        say(f"  rows refused by the spec: {log.refused}")
    opts = EvalOptions(delay=delay, period_ms=int(period_h * 3_600_000) if period_h else None,
                       epochs=epochs, peers=not no_peers, per_row_peers=not no_peers,
                       out_dir=Path(out_dir))
    res = evaluate(cfg, log, opts, progress=say)
    if as_json:
        from dataclasses import asdict
        click.echo(json.dumps(asdict(res), indent=1))
        return
    click.echo(res.table)
    for n in res.notes:
        click.echo(f"note: {n}")
    if res.plot:
        click.echo(f"plot: {res.plot}")
    click.echo(f"wall time {time.perf_counter() - t0:.1f} s")
    click.echo(res.result_line)


from odl.cli_spec import spec  # noqa: E402 -- registered beside the commands above

main.add_command(spec)

if __name__ == "__main__":
    main()
