"""The memory guard's arithmetic: measured headroom, growth projection, victims.

Kept apart from the worker loop so each rule can be read (and tested) alone:

* **headroom** is the tightest of three views of "how much more can be used":
  the kernel's available memory, the worker's cgroup limit minus its usage, and
  the worker's budget (``--memory``) minus what its tasks use;
* **growth** projects each task's RSS a short horizon ahead from its recent
  slope, capped by what the task is known to need, so admission does not start
  a task into memory that running tasks are about to take;
* **victims**: which task to preempt when headroom falls below the low-water
  mark (default: the youngest, as the predecessor promised).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .resources import cgroup_memory_headroom

#: Samples after which a task's own growth rate is trusted over its job's profile.
_WATCHED = 4

#: Samples kept per task (about this many seconds at the default 0.5 s interval / 2).
_HISTORY = 20


@dataclass
class Watermarks:
    """Below ``low`` the guard preempts; a task is admitted only if ``high`` stays free."""

    low: int
    high: int

    @classmethod
    def default(cls, capacity: int) -> Watermarks:
        """10 % / 20 % of the capacity, at most 2 / 4 GiB: enough slack for a sample
        interval of growth on a small node without idling a large one."""
        gib = 1024**3
        return cls(low=min(capacity // 10, 2 * gib), high=min(capacity // 5, 4 * gib))


@dataclass
class Usage:
    """One task's measured memory: a short history of (time, RSS) samples."""

    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=_HISTORY))
    peak: int = 0

    def add(self, when: float, rss: int) -> None:
        self.samples.append((when, rss))
        self.peak = max(self.peak, rss)

    @property
    def current(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def slope(self) -> float:
        """Least-squares RSS growth in bytes per second over the recent samples."""
        if len(self.samples) < 2:
            return 0.0
        n = len(self.samples)
        mean_t = sum(t for t, _ in self.samples) / n
        mean_r = sum(r for _, r in self.samples) / n
        var = sum((t - mean_t) ** 2 for t, _ in self.samples)
        if var <= 0:
            return 0.0
        return sum((t - mean_t) * (r - mean_r) for t, r in self.samples) / var

    def projected_growth(self, horizon: float, cap: int | None) -> int:
        """How much more this task will likely use within ``horizon`` seconds."""
        grow = max(0.0, self.slope()) * horizon
        target = self.current + grow
        if cap is not None:
            target = min(target, max(cap, self.current))
        return int(max(0.0, target - self.current))


def headroom(budget: int, tasks_rss: int) -> int:
    """Memory that can still be used before anything runs out, tightest view first."""
    views = [psutil.virtual_memory().available, budget - tasks_rss]
    cgroup = cgroup_memory_headroom()
    if cgroup is not None:
        views.append(cgroup)
    return min(views)


def oom_kills() -> int:
    """Kernel OOM kills so far (node-wide, /proc/vmstat), to tell them from ours."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/vmstat").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    return 0


@dataclass
class Candidate:
    """What a victim policy sees of a running task."""

    task_id: str
    job: str
    started: float
    #: The task's current requirement (declared, or learned from a preemption).
    declared: int
    usage: Usage
    #: True if ``declared`` was learned from an observed peak: then it caps the
    #: growth projection ("capped by each task's learned peak").
    learned: bool = False


VictimPolicy = Callable[[Sequence[Candidate]], Candidate]


def youngest(candidates: Sequence[Candidate]) -> Candidate:
    """The most recently started: it has the least work to lose."""
    return max(candidates, key=lambda c: c.started)


def most_over_request(candidates: Sequence[Candidate]) -> Candidate:
    """The one using the most beyond what it declared: the one that broke the plan."""
    return max(candidates, key=lambda c: (c.usage.current - c.declared, c.started))


def fastest_growing(candidates: Sequence[Candidate]) -> Candidate:
    """The one whose RSS grows fastest: the likeliest to need even more."""
    return max(candidates, key=lambda c: (c.usage.slope(), c.started))


VICTIM_POLICIES: dict[str, VictimPolicy] = {
    "youngest": youngest,
    "most-over-request": most_over_request,
    "fastest-growing": fastest_growing,
}


#: Jobs whose profiles a guard keeps (the least recently observed go first).
MAX_PROFILES = 256


@dataclass
class Profile:
    """What the recent tasks of one job were seen to peak at.

    Tasks of one job are usually alike, so a job's first task (watched on its
    own for a moment) tells how many more of its kind fit. They are not always
    alike, so the profile keeps each task's peak: the median says what a new
    task will probably need, the maximum what a growing one may reach.
    """

    peaks: dict[str, int] = field(default_factory=dict)
    #: The median peak, kept up to date by :meth:`update` (admission reads it for
    #: every claim; updates are rarer).
    typical: int = 0

    def update(self, task_id: str, usage: Usage) -> None:
        peak = max(self.peaks.get(task_id, 0), usage.peak)
        if self.peaks.get(task_id) == peak:
            return
        self.peaks[task_id] = peak
        while len(self.peaks) > 64:
            del self.peaks[next(iter(self.peaks))]
        ordered = sorted(self.peaks.values())
        self.typical = ordered[len(ordered) // 2]

    def high_except(self, task_id: str) -> int | None:
        """The highest peak of the job's other tasks (a task's own peak so far says
        nothing about how far it will still grow)."""
        others = [p for t, p in self.peaks.items() if t != task_id]
        return max(others) if others else None


@dataclass
class Verdict:
    """A task the guard wants preempted; ``alone``: it was the only one running, so it
    does not fit this node at all."""

    task_id: str
    alone: bool
    headroom: int


class Guard:
    """Admission and preemption decisions for one worker's memory."""

    def __init__(self, capacity: int, marks: Watermarks, policy: str = "youngest",
                 horizon: float = 30.0, probation: float = 1.0, growth_aware: bool = True
                 ) -> None:
        if policy not in VICTIM_POLICIES:
            raise ValueError(f"unknown victim policy {policy!r}; choose one of "
                             f"{', '.join(VICTIM_POLICIES)}")
        self.capacity = capacity
        self.marks = marks
        self.policy = VICTIM_POLICIES[policy]
        self.horizon = horizon
        self.probation = probation
        #: False: admit on instantaneous headroom alone (for comparison).
        self.growth_aware = growth_aware
        #: Per job, most recently observed last; bounded (``MAX_PROFILES``) because a
        #: client submitting call by call makes a job per call.
        self.profiles: dict[str, Profile] = {}
        self.last_headroom = capacity
        self._measured_at = -1.0

    def observe(self, job: str, usage: Usage, task_id: str = "") -> None:
        profile = self.profiles.pop(job, None) or Profile()
        self.profiles[job] = profile  # now the most recent
        profile.update(task_id or str(id(usage)), usage)
        if len(self.profiles) > MAX_PROFILES:
            del self.profiles[next(iter(self.profiles))]

    def measure(self, tasks: Sequence[Candidate], max_age: float = 0.0) -> int:
        """Headroom now; ``max_age`` allows reusing a reading that recent (admission
        runs once per claim, and reading /proc costs ~0.1 ms)."""
        now = time.monotonic()
        if now - self._measured_at > max_age:
            self.last_headroom = headroom(self.capacity, sum(t.usage.current for t in tasks))
            self._measured_at = now
        return self.last_headroom

    def admission(self, tasks: Sequence[Candidate], now: float) -> tuple[int, int]:
        """(memory budget, number of tasks) a claim may take now; (0, 0) = wait.

        * While a task of a job not yet profiled is in its first moment (no growth
          rate measured yet), wait: it may be about to take a lot.
        * The budget is the measured headroom, less the high-water mark, less what
          running tasks are projected to grow into within the horizon (capped by a
          learned requirement).
        * The count is how many tasks of the largest peak seen among the running
          jobs fit in that budget (one, if nothing is known yet).
        """
        if not self.growth_aware:
            budget = self.measure(tasks, max_age=0.05) - self.marks.high
            return (budget, 1 << 30) if budget > 0 else (0, 0)
        for t in tasks:
            if (t.job not in self.profiles and now - t.started < self.probation
                    and len(t.usage.samples) < 2):
                return 0, 0
        budget = self.measure(tasks, max_age=0.05) - self.marks.high - sum(
            self.expected_growth(t) for t in tasks)
        if budget <= 0:
            return 0, 0
        jobs = {t.job for t in tasks}
        known = [self.profiles[j].typical for j in jobs if j in self.profiles]
        if not self.profiles:
            return budget, 1
        typical = max(known) if known else max(p.typical for p in self.profiles.values())
        count = budget // typical if typical > 0 else 1 << 30
        # With nothing running here, one task may always try: a job of huge tasks
        # seen earlier must not keep a node idle (a task that truly does not fit
        # is preempted alone and fails with a clear reason).
        return budget, max(count, 1) if not tasks else count

    def expected_growth(self, task: Candidate) -> int:
        """More memory a running task will likely take.

        Its own recent slope over the horizon, capped by its learned requirement
        or its job's highest peak (a flat task reserves nothing, a growing one up
        to what its kind reached). A task not yet watched for a couple of seconds
        reserves at least its job's median peak: it may not have started growing.
        """
        profile = self.profiles.get(task.job)
        cap = task.declared if task.learned else (
            profile.high_except(task.task_id) if profile else None)
        own = task.usage.projected_growth(self.horizon, cap)
        if profile is not None and len(task.usage.samples) < _WATCHED:
            return max(own, profile.typical - task.usage.current)
        return own

    def check(self, tasks: Sequence[Candidate], dying: int) -> list[Verdict]:
        """Victims to preempt if headroom is below the low-water mark, chosen in the
        policy's order until what they use (plus ``dying``: memory of tasks already
        being stopped) lifts headroom back above it."""
        free = self.measure(tasks) + dying
        if free >= self.marks.low or not tasks:
            return []
        out: list[Verdict] = []
        left = list(tasks)
        while left and free < self.marks.low:
            victim = self.policy(left)
            left.remove(victim)
            out.append(Verdict(victim.task_id, alone=len(tasks) == 1 and not dying,
                               headroom=free - dying))
            free += victim.usage.current
        return out
