"""The Celery app of tests/test_celery.py: its worker subprocesses import it
(``celery -A celery_app worker``), and the test process imports it to publish.

Configuration comes from the environment, set by the test for each worker:

``PGREPLICA_TEST_BROKER``   Redis URL, broker and result backend
``PGREPLICA_TEST_CONFIG``   pgreplica configuration (JSON of ``LocalCluster.config()``)
``PGREPLICA_JOBS_ENABLED``  the global switch, read by pgreplica itself

The test process calls :func:`configure` instead. Every task reads one row of
``job_rows`` written by the enqueuing code and reports what it saw, where, and why.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from celery import Celery, current_task, signals

import pgreplica
from pgreplica import jobs
from pgreplica.context import current_state
from pgreplica.contrib.celery import JobTask, install
from pgreplica.jobs import WaitPolicy

TABLE_SQL = "CREATE TABLE IF NOT EXISTS job_rows (id text PRIMARY KEY, v int NOT NULL)"
INSERT_SQL = "INSERT INTO job_rows (id, v) VALUES (%s, 1)"
SELECT_SQL = "SELECT v FROM job_rows WHERE id = %s"

#: Short waits keep a few hundred jobs fast while the replicas lag 500 ms.
FAST = WaitPolicy(tries=1, interval=0.05)

app = Celery("celery_app")
app.conf.update(
    broker_url=os.environ.get("PGREPLICA_TEST_BROKER", "memory://"),
    result_backend=os.environ.get("PGREPLICA_TEST_BROKER", "cache+memory://"),
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    result_expires=600,
    task_track_started=False,
)

_lock = threading.Lock()
_config: dict[str, Any] | None = None
_lb: pgreplica.LoadBalancer | None = None


def configure(broker_url: str, config: dict[str, Any]) -> None:
    """For the test process: the broker and the cluster, instead of the environment."""
    global _config
    app.conf.update(broker_url=broker_url, result_backend=broker_url)
    _config = config


def get_lb() -> pgreplica.LoadBalancer:
    """The process's load balancer, made on first use (in each prefork child)."""
    global _lb
    with _lock:
        if _lb is None:
            config = _config
            if config is None:
                config = json.loads(os.environ["PGREPLICA_TEST_CONFIG"])
            lb = pgreplica.LoadBalancer(config=config)
            # Opened under the lock: a thread that found another one opening the
            # balancer would not wait for the first probes, and its reads would go to
            # the primary (no replica known yet), hiding the control's stale reads.
            lb.open()
            _lb = lb
        return _lb


def shutdown() -> None:
    """Close the process's load balancer (the test process, at the end of the module)."""
    global _lb
    with _lock:
        if _lb is not None:
            _lb.close()
            _lb = None


# The routing state each task's thread or process had *before* pgreplica's prerun
# handler (connected after this one, by install() below) set up the task's own: what a
# previous task left behind.
_outer: dict[str, dict[str, Any]] = {}


@signals.task_prerun.connect(weak=False)
def _record_outer_state(task_id: str | None = None, **_: Any) -> None:
    state = current_state()
    _outer[str(task_id)] = {"token": str(state.token), "use_primary": state.use_primary}


installation = install(app, get_lb, usage_log=True)


def _observe(key: str) -> dict[str, Any]:
    """Read the row and describe the run: what was seen, on which server, and why."""
    started_at = time.time()
    with get_lb().read() as conn:
        row = conn.execute(SELECT_SQL, (key,)).fetchone()
        port = conn.raw.info.port
        on_replica = conn.on_replica
        reason = conn.reason
    decision = jobs.current_decision()
    return {
        "key": key,
        "seen": None if row is None else row[0],
        "port": port,
        "on_replica": on_replica,
        "reason": reason,
        "outcome": None if decision is None else decision.outcome,
        "token": None if decision is None else str(decision.token),
        "retries": current_task.request.retries,
        "started_at": started_at,
        "pid": os.getpid(),
        "thread": threading.get_ident(),
    }


@app.task(base=JobTask, data_consistency="always")
def read_always(key: str) -> dict[str, Any]:
    return _observe(key)


@app.task(base=JobTask, data_consistency="sticky", data_consistency_wait=FAST)
def read_sticky(key: str) -> dict[str, Any]:
    return _observe(key)


@app.task(
    base=JobTask,
    data_consistency="delayed",
    data_consistency_wait=FAST,
    data_consistency_retry_delay=1.0,
)
def read_delayed(key: str) -> dict[str, Any]:
    return _observe(key)


@app.task(
    base=JobTask, data_consistency="sticky", data_consistency_wait=FAST, data_consistency_flag=0
)
def read_sticky_flag0(key: str) -> dict[str, Any]:
    return _observe(key)


@app.task(
    base=JobTask, data_consistency="sticky", data_consistency_wait=FAST, data_consistency_flag=100
)
def read_sticky_flag100(key: str) -> dict[str, Any]:
    return _observe(key)


@app.task(data_consistency="sticky", data_consistency_wait=FAST)
def read_sticky_plain(key: str) -> dict[str, Any]:
    """A plain task (no JobTask base): the option works through the signals alone."""
    return _observe(key)


@app.task(base=JobTask)
def read_naive(key: str) -> dict[str, Any]:
    """The control: a read that ignores the job's token, as code without pgreplica.jobs
    would do; with lagging replicas it must be stale, or the test cannot see staleness."""
    with get_lb().isolated():
        return _observe(key)


@app.task(base=JobTask, data_consistency="sticky", data_consistency_wait=FAST)
def leak(key: str, fail: bool = False) -> dict[str, Any]:
    """Write, then pin the primary and never leave that scope: state a careless task
    leaves behind. With ``fail`` the task raises after that."""
    lb = get_lb()
    with lb.write() as conn:
        conn.execute(INSERT_SQL, (key,))
    lb.primary().__enter__()  # deliberately never exited
    state = current_state()
    if fail:  # the message says where, for the test to compare with the next task
        where = f"{os.getpid()}/{threading.get_ident()}"
        raise RuntimeError(f"leak: failing after a write and a primary pin in {where}")
    return {
        "token": str(state.token),
        "use_primary": state.use_primary,
        "pid": os.getpid(),
        "thread": threading.get_ident(),
    }


@app.task(base=JobTask, data_consistency="sticky", data_consistency_wait=FAST)
def report_state() -> dict[str, Any]:
    """The routing state a task starts with, before and inside pgreplica's scope."""
    state = current_state()
    decision = jobs.current_decision()
    return {
        "outer": _outer.pop(str(current_task.request.id), None),
        "token": str(state.token),
        "written": str(state.written),
        "use_primary": state.use_primary,
        "outcome": None if decision is None else decision.outcome,
        "pid": os.getpid(),
        "thread": threading.get_ident(),
    }


@app.task(base=JobTask)
def outcome_counts() -> dict[str, int]:
    """This worker process's outcome counter (threads pool: the whole worker)."""
    return dict(jobs.outcomes())
