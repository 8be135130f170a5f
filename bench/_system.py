"""What the machine and our processes are doing: memory, CPU, load (psutil).

psutil reads /proc for us; the one figure it does not give, a process's peak resident
memory (the kernel's high-water mark), is read from /proc/<pid>/status here.
"""

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil


def rss_kib(pid: int) -> int | None:
    """A process's resident memory in KiB; None once it is gone."""
    try:
        return int(psutil.Process(pid).memory_info().rss // 1024)
    except psutil.NoSuchProcess:
        return None


def peak_rss_kib(pid: int) -> int | None:
    """The most resident memory the process has had (VmHWM), in KiB; None once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in lines:
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds the process has used; None once it is gone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return None
    return float(times.user + times.system)


def machine_cpu_seconds() -> tuple[float, float, float]:
    """(busy, total, stolen) CPU seconds of all cores since boot.

    Stolen time is what the hypervisor gave to other machines: not busy here, not ours.
    """
    times = psutil.cpu_times()
    idle = times.idle + times.iowait
    total = sum(times) - times.guest - times.guest_nice  # guest time is counted in user
    return total - idle - times.steal, total, times.steal


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    return os.getloadavg()


_POSTGRES = "postgres"


def _all_processes() -> dict[int, tuple[str, float]]:
    """Every process: its command name and the CPU seconds it has used."""
    found = {}
    for process in psutil.process_iter(["name", "cpu_times"]):
        times = process.info["cpu_times"]
        if times is not None:  # gone, or not ours to read
            found[process.pid] = (process.info["name"], times.user + times.system)
    return found


def _family(root: int) -> set[int]:
    """A process and all its descendants."""
    family = {root}
    with contextlib.suppress(psutil.NoSuchProcess):
        family.update(child.pid for child in psutil.Process(root).children(recursive=True))
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
    _start_machine: tuple[float, float, float] = (0.0, 0.0, 0.0)
    _start_all: dict[int, tuple[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._start_wall = time.monotonic()
        self._start_cpu = {name: cpu_seconds(pid) or 0.0 for name, pid in self.pids.items()}
        self._start_machine = machine_cpu_seconds()
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
        busy, total, steal = machine_cpu_seconds()
        elapsed = total - self._start_machine[1]
        if elapsed > 0:
            result["machine"] = round(100 * (busy - self._start_machine[0]) / elapsed, 1)
            result["stolen"] = round(100 * (steal - self._start_machine[2]) / elapsed, 1)
        current = _all_processes()
        ours = _family(os.getpid()) | set(self.pids.values())
        postgres = others = 0.0
        for pid, (name, seconds) in current.items():
            before = self._start_all.get(pid, (name, 0.0))[1]
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
            rss = rss_kib(self.pid)
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
        hwm = peak_rss_kib(self.pid)
        sampled = max((rss for _, rss in self.samples), default=0)
        return max(hwm or 0, sampled)
