"""Pinning training processes to CPUs (WORKER_CPUS): the CPU-list syntax, and which CPUs the next worker gets.

Why pin: a worker talking to a simulation hands every Session-stream message between gRPC's threads and the
training thread, and on a busy machine the kernel moves those threads between cores, so each hand-off also pays
for a cross-core wake-up and the GIL's convoy. A worker kept on one CPU, and the simulation kept off it, paid 28 %
less per round trip (benchmarks/RESULTS.md, simulation speed: the bare echo, pinned and not).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

MAX_CPU_ID = 4095  # Linux's default CONFIG_NR_CPUS ceiling on x86-64 is 8192; 4096 CPUs is far beyond any host here


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """'0-3,6' as (0, 1, 2, 3, 6), in the order given; () for an empty list. ValueError names the bad part."""
    cpus: list[int] = []
    seen: set[int] = set()
    for part in (piece.strip() for piece in text.split(",")):
        if not part:
            if text.strip():
                raise ValueError("has an empty entry (write CPUs as 0-3,6)")
            continue
        first, dash, last = part.partition("-")
        try:
            low = int(first)
            high = int(last) if dash else low
        except ValueError:
            raise ValueError(f"{part[:20]!r} is not a CPU number or a range such as 0-3") from None
        if low < 0 or high > MAX_CPU_ID:
            raise ValueError(f"{part[:20]!r}: CPU numbers run from 0 to {MAX_CPU_ID}")
        if high < low:
            raise ValueError(f"{part[:20]!r}: a range runs from the lower CPU to the higher")
        for cpu in range(low, high + 1):
            if cpu in seen:
                raise ValueError(f"CPU {cpu} is listed twice")
            seen.add(cpu)
            cpus.append(cpu)
    return tuple(cpus)


def format_cpu_list(cpus: set[int] | frozenset[int]) -> str:
    """CPUs written as parse_cpu_list reads them, runs collapsed: {0, 1, 2, 5} as '0-2,5'."""
    parts: list[str] = []
    ordered = sorted(cpus)
    start = 0
    for index, cpu in enumerate(ordered):
        if index + 1 == len(ordered) or ordered[index + 1] != cpu + 1:
            low = ordered[start]
            parts.append(str(low) if low == cpu else f"{low}-{cpu}")
            start = index + 1
    return ",".join(parts)


def usable_cpus() -> set[int] | None:
    """The CPUs this process may run on, or None where the platform cannot pin (no sched_setaffinity)."""
    if not hasattr(os, "sched_getaffinity") or not hasattr(os, "sched_setaffinity"):
        return None
    return set(os.sched_getaffinity(0))


def pin_this_process(cpus: frozenset[int]) -> None:
    """Keep every thread of this process, and each it starts from now on, on `cpus`.

    sched_setaffinity applies to one thread; an import may already have started others (a BLAS pool, gRPC's), so
    each thread listed in /proc/self/task is pinned too.
    """
    os.sched_setaffinity(0, cpus)  # this thread first: what it starts later inherits its set
    try:
        threads = [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: only this thread could be pinned
        return
    for thread in threads:
        try:
            os.sched_setaffinity(thread, cpus)
        except OSError:  # ended in the meantime
            continue


class CpuPlacement:
    """Hands each worker the `per_worker` least-used CPUs of a fixed list and takes them back when it ends.

    Ties go to the CPU listed first, so one run at a time always lands on the first CPU of the list.
    """

    def __init__(self, cpus: Sequence[int], per_worker: int = 1) -> None:
        self._cpus = tuple(cpus)
        self._per_worker = max(1, min(per_worker, len(self._cpus))) if self._cpus else 0
        self._users = dict.fromkeys(self._cpus, 0)  # CPU -> workers holding it
        self._held: dict[str, frozenset[int]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> frozenset[int] | None:
        """The CPUs for worker `key` (None: no list, do not pin); a key already holding CPUs gives them back first."""
        if not self._cpus:
            return None
        with self._lock:
            self._give_back(key)
            order = sorted(self._cpus, key=lambda cpu: (self._users[cpu], self._cpus.index(cpu)))
            chosen = frozenset(order[:self._per_worker])
            for cpu in chosen:
                self._users[cpu] += 1
            self._held[key] = chosen
            return chosen

    def release(self, key: str) -> None:
        """Worker `key` has ended: its CPUs count one user fewer (nothing if it held none)."""
        with self._lock:
            self._give_back(key)

    def _give_back(self, key: str) -> None:
        for cpu in self._held.pop(key, frozenset()):
            self._users[cpu] -= 1
