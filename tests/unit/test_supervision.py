"""Restart budgets are rates, and a repeated run() joins the loop already running."""
import threading
import time

import pytest

from odl.supervision import BudgetExhausted, RestartBudget, RunOnce
from tests.unit.helpers import FakeClock


def test_budget_is_a_rate_not_a_lifetime_count():
    clock = FakeClock()
    b = RestartBudget(max_restarts=3, window_s=3600, clock=clock)
    for _ in range(30):          # one failure a day for a month: never gives up
        b.record("crash")
        clock.t += 86_400
    assert b.total == 30 and b.in_window == 0


def test_budget_gives_up_on_a_crash_loop():
    clock = FakeClock()
    b = RestartBudget(max_restarts=3, window_s=3600, clock=clock)
    for _ in range(3):
        b.record("crash")
        clock.t += 60
    with pytest.raises(BudgetExhausted, match="4 restarts within 3600 s"):
        b.record("crash")


def test_budget_window_slides():
    clock = FakeClock()
    b = RestartBudget(max_restarts=2, window_s=100, clock=clock)
    b.record("a")
    clock.t = 60
    b.record("b")
    clock.t = 101          # the first has left the window
    b.record("c")
    assert b.in_window == 2


def test_run_once_joins_the_running_call():
    once, calls, started = RunOnce(), [], threading.Event()

    def loop():
        calls.append(1)
        started.set()
        time.sleep(0.3)
        return "done"

    results = []
    t = threading.Thread(target=lambda: results.append(once(loop)))
    t.start()
    started.wait(5)
    results.append(once(loop))   # the driver's repeated call: waits, does not start a second loop
    t.join()
    assert calls == [1] and results == ["done", "done"]
