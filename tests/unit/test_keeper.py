"""The local stack's restart policy (odl.keeper): restarts what dies, stops on a clean exit or
SIGTERM, gives up past the restart budget, and sweeps what a killed component left behind."""
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from bench.chaos_faults import wait_until
from odl.keeper import Keeper, group_members, kill_component
from odl.supervision import RestartBudget
from tests.conftest import free_port

LOG = logging.getLogger("test-keeper")


def _keeper(argv, max_restarts=3):
    recorded = []
    k = Keeper("thing", argv, RestartBudget(max_restarts, 3600), lambda: recorded.append(1), LOG,
               first_delay_s=0.01)
    return k, recorded


def test_a_crash_loop_ends_when_the_budget_is_spent():
    k, recorded = _keeper([sys.executable, "-c", "raise SystemExit(3)"], max_restarts=3)
    assert k.run() == 1
    assert k.starts == 4                 # the first start and three restarts
    time.sleep(0.2)                      # the control-plane records run in threads
    assert len(recorded) == 3


def test_a_clean_exit_is_not_restarted():
    k, recorded = _keeper([sys.executable, "-c", "pass"])
    assert k.run() == 0 and k.starts == 1 and not recorded


@pytest.fixture
def keeper_group(tmp_path):
    cfg = tmp_path / "odl.yaml"   # a Redis nobody listens on: the restart record is only tried
    cfg.write_text(yaml.safe_dump({"redis": {"port": free_port()}, "paths": {"state_dir": str(tmp_path)}}))
    proc = subprocess.Popen([sys.executable, "-m", "odl.keeper", "thing", "--config", str(cfg), "--",
                             "sh", "-c", "sleep 60 & sleep 60"], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_killed_component_is_swept_and_restarted_and_sigterm_stops_all(keeper_group):
    proc = keeper_group
    first = set(wait_until(lambda: len(group_members(proc.pid)) >= 4 and group_members(proc.pid),
                           15, "the group's members", poll_s=0.05))
    # the crash: every process of the group but the keeper (sh and both sleeps)
    assert len(kill_component(proc.pid)) == 3
    again = wait_until(lambda: (set(group_members(proc.pid)) - first - {proc.pid}
                                if len(group_members(proc.pid)) >= 4 else None),
                       15, "the restarted members", poll_s=0.05)
    assert again and proc.poll() is None
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == 0
    wait_until(lambda: not group_members(proc.pid), 15, "the group to end", poll_s=0.05)
    out = proc.stdout.read()
    assert "killed by SIGKILL" in out and "restart 1" in out, out
