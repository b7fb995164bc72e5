"""Peak resident memory of a MONAI Label server and of the task subprocesses it starts
(training, scoring), sampled with ``psutil`` from outside, for the benchmarks that drive the
real server (``session.py``, ``scale.py``)."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import psutil


def process_role(process: psutil.Process) -> str:
    """``train``, ``scoring``, ... for MONAI Label's task subprocesses, else ``server``.

    MONAI Label runs a task as ``python -m monailabel.interfaces.utils.app -m METHOD ...``.
    """
    try:
        command = process.cmdline()
    except psutil.Error:
        return "server"
    module = "monailabel.interfaces.utils.app"
    if module in command:
        i = command.index(module)
        if i + 2 < len(command) and command[i + 1] == "-m":
            return command[i + 2]
    return "server"


def tree_rss(process: psutil.Process) -> int:
    """Resident bytes of a process and its descendants (0 once it ended)."""
    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.Error:
        return 0
    for member in members:
        with contextlib.suppress(psutil.Error):
            total += member.memory_info().rss
    return total


class MemorySampler:
    """Peak resident memory of a server and its subprocesses, sampled in a thread.

    Each sample sums the RSS of each role: ``server`` (the server process and helpers),
    ``train`` (a training subprocess and its children), ``scoring``; :meth:`take` returns the
    peaks (MB) since the last call and :meth:`running` the roles alive at the latest sample.

    Args:
        pid: The server's process id.
        interval_s: Seconds between samples.
    """

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self._peaks: dict[str, int] = {}
        self._roles: dict[int, str] = {}
        self._latest: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def sample(self) -> dict[str, int]:
        """One sample: resident bytes per role."""
        totals: dict[str, int] = {}
        try:
            totals["server"] = self.root.memory_info().rss
            children = self.root.children()
        except psutil.Error:
            return totals
        for child in children:
            role = self._roles.get(child.pid)
            if role is None:
                role = self._roles[child.pid] = process_role(child)
            totals[role] = totals.get(role, 0) + tree_rss(child)
        return totals

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = self.sample()
            with self._lock:
                self._latest = {role for role, rss in sample.items() if rss}
                for role, rss in sample.items():
                    self._peaks[role] = max(self._peaks.get(role, 0), rss)
            self._stop.wait(self.interval_s)

    def take(self) -> dict[str, float]:
        """Peak MB per role since the last call (a role not seen is absent)."""
        with self._lock:
            peaks, self._peaks = self._peaks, {}
        return {role: round(rss / 2**20, 1) for role, rss in peaks.items()}

    def running(self, role: str) -> bool:
        """Whether a process of ``role`` was alive at the latest sample."""
        with self._lock:
            return role in self._latest

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
