"""One `odl eval` run: build the contestants, replay the log, report side by side."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable


from odl.config import Config
from trainers.evaluation import learners as L
from trainers.evaluation.protocol import ReplayLog, replay
from trainers.evaluation.report import figures, plot, result_line, table


@dataclass(frozen=True)
class EvalOptions:
    delay: bool = False             # labels after the click delay / attribution window
    warmup: float = 0.1             # share of rows scored but left out of the figures
    period_ms: int | None = None    # daily retrain period; None: learners.default_period_ms
    epochs: int = 3                 # passes of each daily retrain
    peers: bool = True              # River and VW (when installed)
    per_row_peers: bool = True      # the peers again, learning after every row (their best case)
    out_dir: Path | None = None     # where the PNG and the table go


@dataclass
class EvalResult:
    log: str
    rows: int
    options: dict[str, Any]
    overall: dict[str, dict[str, float]]
    per_slice: dict[str, list[dict[str, float]]]
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)
    plot: str | None = None
    result_line: str = ""
    table: str = ""


def trainer_mode(cfg: Config) -> str:
    """The label timing the live trainer uses with this config."""
    if cfg.delayed_feedback:
        return "delayed"
    return "aligned" if cfg.label_alignment else "unaligned"


def evaluate(cfg: Config, log: ReplayLog, opts: EvalOptions,
             progress: Callable[[str], None] = lambda _: None) -> EvalResult:
    tcfg = cfg.trainer.model_copy(update={"frozen_baseline_after": None})
    window_ms = cfg.feature_job.attribution_window_s * 1000 if opts.delay else 0
    peer_timing = "unaligned" if opts.delay else "immediate"
    mode = trainer_mode(cfg) if opts.delay else "immediate"
    def make():
        return log.make_model(tcfg)
    online = L.OnlineODL(make, mode)
    frozen = L.FrozenODL(online)
    period = opts.period_ms or L.default_period_ms(log.span_ms)
    daily = L.DailyODL(make, tcfg, period, window_ms, opts.epochs)
    learners: list = [online, frozen, daily, L.Popularity(peer_timing)]
    if opts.delay:   # the trainer's other label modes, on the same rows
        learners += [L.OnlineODL(make, m, f"online_{m}")
                     for m in ("delayed", "aligned", "unaligned") if m != mode]
    every = f"{period / 3_600_000:,.1f} h" if period >= 3_600_000 else f"{period / 1000:,.1f} s"
    notes = [f"daily: retrained every {every} of event time "
             f"({opts.epochs} epochs, from scratch)",
             f"labels: {'click delay and a ' + str(window_ms // 1000) + ' s attribution window' if opts.delay else 'right after each batch is scored'}; "
             f"rows are scored in batches of trainer.batch_size={tcfg.batch_size}; "
             f"online = the trainer's configured label mode ({mode})"]
    peers = []
    if opts.peers:
        peers, missing = L.optional_peers(peer_timing)
        learners += peers
        notes += missing
    t0 = time.perf_counter()
    last = [0.0]

    def tick(done: int, n: int) -> None:
        if time.perf_counter() - last[0] > 5:
            last[0] = time.perf_counter()
            progress(f"  {done:,}/{n:,} rows, {time.perf_counter() - t0:.0f} s")

    res = replay(log, learners, tcfg.batch_size, window_ms, on_half=frozen.freeze, progress=tick)
    scores, seconds = res.scores, res.seconds
    if opts.per_row_peers and peers:
        progress("  the peers again, learning after every row")
        row_peers, _ = L.optional_peers(peer_timing)
        for p in row_peers:
            p.name += "_per_row"
        more = replay(log, row_peers, 1, window_ms)
        scores.update(more.scores)
        seconds.update(more.seconds)
    overall, per_slice = figures(scores, log.label, opts.warmup)
    out = EvalResult(log.name, len(log), {**asdict(opts), "out_dir": str(opts.out_dir),
                                          "period_ms": period, "window_ms": window_ms},
                     {n: asdict(f) for n, f in overall.items()},
                     {n: [asdict(f) for f in fs] for n, fs in per_slice.items()},
                     {n: round(s, 2) for n, s in seconds.items()}, notes)
    out.table = table(overall, seconds)
    out.result_line = result_line(overall)
    if opts.out_dir is not None:
        shown = {n: per_slice[n] for n in per_slice if not n.endswith("_per_row")}
        png = plot(shown, f"odl eval: {log.name}, {len(log):,} rows", opts.out_dir / f"eval-{log.name}.png")
        out.plot = str(png) if png else None
        if png is None:
            notes.append("no PNG: matplotlib is not installed (pip install -e '.[eval]')")
        (opts.out_dir / f"eval-{log.name}.txt").write_text(out.table + "\n" + "\n".join(notes) + "\n")
    return out
