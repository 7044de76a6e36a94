"""What a local stack left running: its processes and their listening sockets (the stack tests
check that nothing listens beyond loopback and nothing outlives ``odl down``)."""
from __future__ import annotations

import re
import subprocess


def stack_pids(pgids: set[int]) -> dict[int, str]:
    """Live (non-zombie) processes in the stack's process groups.  A zombie has exited; it only
    waits for its parent (or init, after a re-parenting) to reap it."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,pgid=,stat=,comm="], capture_output=True, text=True).stdout
    pids = {}
    for line in out.splitlines():
        pid, pgid, stat, comm = line.split(None, 3)
        if int(pgid) in pgids and not stat.startswith("Z"):
            pids[int(pid)] = comm
    return pids


def listeners_of(pids: set[int]) -> list[str]:
    """The TCP addresses (host:port) that any of ``pids`` listens on."""
    out = subprocess.run(["ss", "-tlnpH"], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            found.append(line.split()[3])
    return found
