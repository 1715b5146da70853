"""What a worker process costs: CPU seconds and resident memory, read from /proc."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MB = 2**20


@dataclass(frozen=True)
class Usage:
    """A process's CPU seconds so far (user + system) and resident set size in bytes."""

    cpu_seconds: float
    rss: int


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (a broker's start script and its VM, say)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds ``pids`` used so far, together (those gone meanwhile count nothing)."""
    total = 0.0
    for pid in pids:
        try:
            total += usage(pid).cpu_seconds
        except OSError:
            continue
    return total


def usage(pid: int) -> Usage:
    """Read ``pid``'s :class:`Usage` now."""
    # The command name in parentheses may hold spaces: the fields follow its last ")".
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return Usage(ticks / os.sysconf("SC_CLK_TCK"), pages * os.sysconf("SC_PAGE_SIZE"))


def peak_rss(pid: int) -> int:
    """The most resident memory ``pid`` has held, in bytes (the kernel's high-water mark)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no VmHWM for process {pid}")
