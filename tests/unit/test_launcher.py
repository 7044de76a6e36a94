"""The launcher's process handling with ordinary processes: a crash is reported with its exit
code and log, and `down` leaves nothing running (including children of a process)."""
import subprocess
import time

from odl.launcher import LocalStack, ProcSpec, group_alive
from tests.conftest import make_config


class TinyStack(LocalStack):
    def specs(self):
        return [ProcSpec("sleeper", ["sh", "-c", "sleep 60 & sleep 60"]),
                ProcSpec("crasher", ["sh", "-c", "echo dying; sleep 0.5; exit 3"])]


def test_crash_is_reported_and_down_stops_everything(tmp_path):
    stack = TinyStack(make_config(tmp_path))
    stack.up(lambda _: None)
    states = stack._read_state()
    time.sleep(1.5)
    crashed = {name: (code, log) for name, code, log in stack.crashed()}
    assert crashed["crasher"][0] == 3 and "dying" in crashed["crasher"][1]
    assert "sleeper" not in crashed
    # a second launcher (another shell running `odl down`) sees the same state
    other = TinyStack(make_config(tmp_path))
    assert set(other.running()) == {"sleeper"}
    other.down(lambda _: None)
    assert not group_alive(states["sleeper"].pid)
    ps = subprocess.run(["ps", "-e", "-o", "pgid=,stat="], capture_output=True, text=True).stdout
    live = [line for line in ps.splitlines()
            if line.split()[0] == str(states["sleeper"].pid) and not line.split()[1].startswith("Z")]
    assert not live  # the backgrounded child is gone too
    assert not stack.state_file.exists()


def test_up_refuses_when_a_stack_runs(tmp_path):
    stack = TinyStack(make_config(tmp_path))
    stack.up(lambda _: None)
    try:
        try:
            TinyStack(make_config(tmp_path)).up(lambda _: None)
            raise AssertionError("second up should fail")
        except RuntimeError as exc:
            assert "already running" in str(exc)
    finally:
        stack.down(lambda _: None)
