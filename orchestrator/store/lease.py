"""The lease of a running run: who owns it, whether it is provably gone, and the heartbeat that renews it.

A run's row names its owner (host, pid, and the pid's process identity) and a lease that the owner renews
every HEARTBEAT_S seconds for LEASE_S seconds, on the database's clock. The history may be shared (one SQLite
file or one PostgreSQL for several checkouts or hosts), so liveness is judged from the row, never from a local
lock: a run is dead only when its lease expired, or its owner ran on this machine and that process has ended
(or its pid now belongs to another process). Knows no tables: the store passes the row's values in.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Self

from orchestrator.executor import pid_exists

HEARTBEAT_S = 10.0  # how often a running run renews its lease
LEASE_S = 60.0  # how long a renewal holds: a run not renewed for this long is dead, wherever it ran
STOP_WAIT_S = 30.0  # how long stop() waits for a renewal under way (the store refuses it after the run ended)

log = logging.getLogger(__name__)


def this_host() -> str:
    """The host name runs record (api.run_pipeline's `host`)."""
    return socket.gethostname()


def process_identity(pid: int) -> str | None:
    """`<boot id>/<pid namespace>/<start time>` of live process `pid` on this machine (Linux /proc): the same
    pid with another start time is another process. None when there is no such process, it is a zombie, or
    the machine has no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": comm may hold spaces and parentheses
    if len(fields) < 20 or fields[0] == "Z":
        return None
    return f"{boot}/{namespace}/{fields[19]}"  # field 22 of proc(5), starttime: clock ticks after boot


def _machine(identity: str) -> str:
    """The boot and pid namespace part of an identity: pids compare only within the same one."""
    return identity.rpartition("/")[0]


@dataclass(frozen=True)
class Owner:
    """What a run's row says of its owner and lease."""

    host: str
    pid: int
    process: str | None  # process_identity(pid) when the run began; None before schema v3 or without /proc
    lease_expires_at: datetime | None  # None: no lease (a row written before schema v3 and not upgraded)


def gone(owner: Owner, now: datetime, host: str | None = None) -> str | None:
    """Why the owner of a running run is provably gone, or None while it may be alive.

    `now` is the database's clock, the one leases are written with; `host` is this machine (this_host())."""
    if owner.lease_expires_at is not None and now > owner.lease_expires_at:
        return f"its lease expired at {owner.lease_expires_at:%Y-%m-%d %H:%M:%S} UTC"
    if owner.host != (host or this_host()):
        return None  # another machine: only its lease can tell
    if owner.process is None:
        return None if pid_exists(owner.pid) else f"its process {owner.pid} on {owner.host} has ended"
    mine = process_identity(os.getpid())
    if mine is None or _machine(mine) != _machine(owner.process):
        return None  # rebooted since, or another pid namespace (a container) with this host name: the lease tells
    current = process_identity(owner.pid)
    if current is None:
        return f"its process {owner.pid} on {owner.host} has ended"
    if current != owner.process:
        return f"its process {owner.pid} on {owner.host} has ended (the pid now belongs to another process)"
    return None


class Heartbeat:
    """Calls `renew` every `interval_s` from a daemon thread between start() and stop(); a context manager.

    `renew` returns False when the run is no longer running (then the heartbeat ends). An exception from it (the
    database briefly unavailable) is logged and the next beat retries: it never reaches the run."""

    def __init__(self, renew: Callable[[], bool], run_id: str, interval_s: float = HEARTBEAT_S) -> None:
        self._renew, self._run_id, self._interval_s = renew, run_id, interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"pipe-heartbeat-{run_id}", daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        """No renewal starts after this returns; one under way is waited for (up to STOP_WAIT_S). Idempotent."""
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(STOP_WAIT_S)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> Self:
        return self if self._thread.is_alive() else self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    def _beat(self) -> None:
        failing = False
        while not self._stopped.wait(self._interval_s):
            try:
                if not self._renew():
                    log.warning("run %s is no longer running in the history; its lease is not renewed",
                                self._run_id)
                    return
            except Exception as e:  # noqa: BLE001 - a heartbeat must never end the run; the next beat retries
                if not failing:
                    log.warning("run %s: renewing its lease failed (retrying every %gs): %s",
                                self._run_id, self._interval_s, e)
                failing = True
                continue
            if failing:
                log.warning("run %s: its lease is renewed again", self._run_id)
            failing = False


class Leases:
    """The heartbeats of the runs one store leased: `renew(run_id)` is the store's renewal of a lease."""

    def __init__(self, renew: Callable[[str], bool]) -> None:
        self._renew = renew
        self._heartbeats: dict[str, Heartbeat] = {}

    def lease(self, run_id: str, interval_s: float = HEARTBEAT_S) -> Heartbeat:
        """Start renewing the lease of `run_id` every `interval_s` (once: a second call returns the same one)."""
        if run_id not in self._heartbeats:
            self._heartbeats[run_id] = Heartbeat(lambda: self._renew(run_id), run_id, interval_s).start()
        return self._heartbeats[run_id]

    def stop(self, run_id: str) -> None:
        heartbeat = self._heartbeats.pop(run_id, None)
        if heartbeat is not None:
            heartbeat.stop()

    def stop_all(self) -> None:
        for run_id in list(self._heartbeats):
            self.stop(run_id)
