"""``python -m odl.keeper NAME -- ARGV...``: the local stack's restart policy for one component.

In production a crashed component comes back because its container runtime restarts it
(Kubernetes' ``restartPolicy``, docker-compose's ``restart:``).  ``odl up`` runs each
restartable process under a keeper that does the same on loopback: it runs ``ARGV``, and when
it dies -- any exit but 0, or any signal -- kills what is left of it, counts the restart against
the one restart rule (:class:`odl.supervision.RestartBudget`, ``supervision`` in the config) and
in the control plane (``odl status`` shows ``restarts=N``), and starts it again after a back-off.
A component that ran for ``HEALTHY_AFTER_S`` restarts after ``FIRST_DELAY_S``; one that keeps
dying at once waits twice as long each time, up to ``MAX_DELAY_S`` (a crash loop neither spins
nor hides: the budget ends it with exit 1, which ``odl up``'s ``crashed()`` reports).

The keeper and its component share one process group (the one ``odl up`` made), so ``odl down``
still stops everything with one signal: on SIGTERM the keeper stops restarting and waits for the
component, which got the same signal.  A crash is simulated -- by ``odl bench chaos`` -- with
:func:`kill_component`: SIGKILL to every process of the group but the keeper.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from odl.supervision import BudgetExhausted, RestartBudget, note_restart

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0
HEALTHY_AFTER_S = 30.0
STOP_GRACE_S = 25.0


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids in process group ``pgid``."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def kill_component(pgid: int, keeper_pid: int | None = None) -> list[int]:
    """SIGKILL every process of the group but the keeper (whose pid is the group's id when
    ``odl up`` started it): a crash of the component, as a container's would be.  Returns the
    pids signalled."""
    keeper_pid = pgid if keeper_pid is None else keeper_pid
    killed = []
    for pid in group_members(pgid):
        if pid == keeper_pid:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed


def _describe(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with {rc}"


class Keeper:
    def __init__(self, name: str, argv: list[str], budget: RestartBudget, record: Callable[[], None],
                 log: logging.Logger, first_delay_s: float = FIRST_DELAY_S):
        self.name, self.argv, self.budget, self.record, self.log = name, argv, budget, record, log
        self.first_delay_s = first_delay_s
        self.starts = 0
        self.stopping = threading.Event()
        self.child: subprocess.Popen | None = None

    def on_signal(self, signum, _frame) -> None:
        self.stopping.set()
        child = self.child
        if child is not None and child.poll() is None:
            try:
                child.send_signal(signum)   # usually it has the signal already (same group)
            except ProcessLookupError:
                pass

    def _leftovers(self) -> None:
        """A killed component can leave children behind (the Flink JVM, Python workers): end
        them before starting again, so the new one finds its ports free."""
        me = os.getpid()
        pgid = os.getpgid(0)
        if pgid != me:   # not a group leader (run by hand): nothing of ours to sweep safely
            return
        for _ in range(50):
            if not kill_component(pgid, me):
                return
            time.sleep(0.1)

    def run(self) -> int:
        delay = self.first_delay_s
        while True:
            started = time.monotonic()
            self.child = subprocess.Popen(self.argv)
            self.starts += 1
            self.log.info("keeper: %s started, pid %d", self.name, self.child.pid)
            rc = self.child.wait()
            if self.stopping.is_set():
                try:
                    self.child.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    pass
                return 0
            if rc == 0:
                self.log.info("keeper: %s finished", self.name)
                return 0
            if self.stopping.wait(0.2):   # `odl down`'s signal may reach the keeper second
                return 0
            self._leftovers()
            ran = time.monotonic() - started
            delay = self.first_delay_s if ran >= HEALTHY_AFTER_S else min(MAX_DELAY_S, delay * 2)
            why = f"{self.name} {_describe(rc)} after {ran:.1f} s"
            try:
                self.budget.record(why)
            except BudgetExhausted as exc:
                self.log.error("keeper: %s; giving up: %s", why, exc)
                return 1
            self.log.warning("keeper: %s; restart %d (%d within %.0f s), in %.0f s", why,
                             self.budget.total, self.budget.in_window, self.budget.window_s, delay)
            threading.Thread(target=self.record, daemon=True).start()
            if self.stopping.wait(delay):
                return 0


def main(args: list[str] | None = None) -> int:
    args = sys.argv[1:] if args is None else args
    p = argparse.ArgumentParser(prog="python -m odl.keeper NAME [--config FILE] -- ARGV...",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="the component's instance name (control plane, logs)")
    p.add_argument("--config", default=None)
    if "--" not in args:
        p.error("no command to keep: give it after --")
    cut = args.index("--")
    ns, argv = p.parse_args(args[:cut]), args[cut + 1:]
    if not argv:
        p.error("no command to keep")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {ns.name} %(levelname)s %(message)s")
    log = logging.getLogger("odl.keeper")
    from odl.config import load_config
    cfg = load_config(ns.config)
    sup = cfg.supervision

    def record() -> None:   # Redis may be the one restarting: try for a while
        from odl.control import ControlPlane
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                ControlPlane(cfg).record_restart(ns.name)
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(1)
        note_restart(ControlPlane(cfg), ns.name, log)

    keeper = Keeper(ns.name, argv, RestartBudget(sup.max_restarts, sup.window_s), record, log)
    signal.signal(signal.SIGTERM, keeper.on_signal)
    signal.signal(signal.SIGINT, keeper.on_signal)
    return keeper.run()


if __name__ == "__main__":
    sys.exit(main())
