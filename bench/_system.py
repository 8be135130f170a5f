"""What the machine and our processes are doing, read from /proc: memory, CPU, load."""

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int, field_name: str) -> int | None:
    """A memory field of /proc/PID/status in KiB (VmRSS, VmHWM); None once the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in lines:
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds the process has used; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name in parentheses may contain spaces; the fields after it do not.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def machine_cpu_ticks() -> tuple[int, int, int]:
    """(busy, total, stolen) jiffies of all cores since boot, from /proc/stat.

    Stolen time is what the hypervisor gave to other machines: not busy here, not ours.
    """
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    steal = values[7]
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle - steal, total, steal


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    return os.getloadavg()


_POSTGRES = "postgres"


def _all_processes() -> dict[int, tuple[str, int, float]]:
    """Every process: its command name, its parent and the CPU seconds it has used."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        name, _, rest = stat.partition(" (")[2].rpartition(")")
        fields = rest.split()
        seconds = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
        found[int(entry.name)] = (name, int(fields[1]), seconds)
    return found


def _family(root: int, processes: dict[int, tuple[str, int, float]]) -> set[int]:
    family = {root}
    grew = True
    while grew:
        grew = False
        for pid, (_, parent, _) in processes.items():
            if parent in family and pid not in family:
                family.add(pid)
                grew = True
    return family


@dataclass
class CpuWindow:
    """CPU use over one interval: named processes, PostgreSQL, the machine, everyone else.

    `postgres` adds up every PostgreSQL process (the bench's backends and anyone else's);
    `others` is every process outside the bench and its servers (the pids given, PostgreSQL,
    the bench's own children): other people's test suites, which make the numbers noisy.
    """

    pids: dict[str, int]
    _start_wall: float = 0.0
    _start_cpu: dict[str, float] = field(default_factory=dict)
    _start_machine: tuple[int, int, int] = (0, 0, 0)
    _start_all: dict[int, tuple[str, int, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._start_wall = time.monotonic()
        self._start_cpu = {name: cpu_seconds(pid) or 0.0 for name, pid in self.pids.items()}
        self._start_machine = machine_cpu_ticks()
        self._start_all = _all_processes()

    def finish(self) -> dict[str, float]:
        """Percent of one core per named process, `postgres` and `others`; `machine` (busy)
        and `stolen` (by the hypervisor) are percent of all cores together."""
        wall = time.monotonic() - self._start_wall
        result = {}
        for name, pid in self.pids.items():
            now = cpu_seconds(pid)
            if now is not None:
                result[name] = round(100 * (now - self._start_cpu[name]) / wall, 1)
        busy, total, steal = machine_cpu_ticks()
        elapsed = total - self._start_machine[1]
        if elapsed > 0:
            result["machine"] = round(100 * (busy - self._start_machine[0]) / elapsed, 1)
            result["stolen"] = round(100 * (steal - self._start_machine[2]) / elapsed, 1)
        current = _all_processes()
        ours = _family(os.getpid(), current) | set(self.pids.values())
        postgres = others = 0.0
        for pid, (name, _, seconds) in current.items():
            before = self._start_all.get(pid, (name, 0, 0.0))[2]
            used = seconds - before if seconds >= before else seconds  # else a reused pid
            if name == _POSTGRES:
                postgres += used
            elif pid not in ours:
                others += used
        result["postgres"] = round(100 * postgres / wall, 1)
        result["others"] = round(100 * others / wall, 1)
        return result


class RssSampler:
    """Samples a process's resident memory in the background, for peaks and for flatness."""

    def __init__(self, pid: int, interval_seconds: float = 0.2) -> None:
        self.pid = pid
        self._interval = interval_seconds
        self.samples: list[tuple[float, int]] = []
        self._started = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin sampling."""
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            rss = memory_kib(self.pid, "VmRSS")
            if rss is None:
                return
            self.samples.append((time.monotonic() - self._started, rss))
            await asyncio.sleep(self._interval)

    async def stop(self) -> None:
        """Stop sampling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def peak_kib(self) -> int:
        """The highest resident set seen: the kernel's high-water mark while the process lives."""
        hwm = memory_kib(self.pid, "VmHWM")
        sampled = max((rss for _, rss in self.samples), default=0)
        return max(hwm or 0, sampled)
