"""The orphan sweep asks the history's leases (issue 14): on an engine shared by two checkouts or hosts, a
container whose run's lease is alive is left alone; one whose run is gone is removed; for a run the history does
not know, the container's own host and pid labels decide."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from orchestrator.docker_executor import sweep_orphans
from orchestrator.executor import LABEL_HOST, LABEL_MANAGED, LABEL_PID, LABEL_PIPELINE, LABEL_RUN
from orchestrator.results import RunStatus
from orchestrator.store.store import Store
from tests.conftest import BUSYBOX, wait_for
from tests.unit.test_store import begin, subprocess_pid


def test_sweep_removes_containers_of_dead_runs_and_keeps_those_of_live_leases(docker: Any, tmp_path: Path) -> None:
    owner = str(tmp_path / "runs")
    host = os.uname().nodename
    with Store(f"sqlite:///{tmp_path / 'shared.db'}", lease_s=3) as store:
        live = begin(store)  # another host's run: its lease is renewed below, so it lives
        store.lease(live, interval_s=0.2)
        expiring = begin(store)  # another host's run that nobody renews
        finished = begin(store)
        store.finish_run(finished, RunStatus.FAILED, 1)
        wait_for(lambda: store.run_alive(expiring) is False, timeout=30, what="the unrenewed lease to expire")
        ended = subprocess_pid()
        containers = {
            live: {},
            expiring: {},
            finished: {},
            "unknown-dead-pid": {LABEL_HOST: host, LABEL_PID: str(ended)},
            "unknown-live-pid": {LABEL_HOST: host, LABEL_PID: str(os.getpid())},
            "unknown-other-host": {LABEL_HOST: "elsewhere", LABEL_PID: str(ended)},
            "unknown-no-pid": {},
        }
        for run_id, labels in containers.items():
            docker.containers.create(BUSYBOX, ["sleep", "30"], labels={
                LABEL_MANAGED: "1", LABEL_PIPELINE: owner, LABEL_RUN: run_id, **labels})

        removed = sweep_orphans(docker, owner, is_alive=store.run_alive)

        assert removed == sorted([expiring, finished, "unknown-dead-pid", "unknown-no-pid"])
        left = docker.containers.list(all=True, ignore_removed=True, filters={"label": f"{LABEL_PIPELINE}={owner}"})
        assert sorted(c.labels[LABEL_RUN] for c in left) == sorted([live, "unknown-live-pid", "unknown-other-host"])
        assert store.run_alive(live) is True
        for container in left:
            container.remove(force=True)
