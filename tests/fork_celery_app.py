"""The Celery app of tests/test_fork.py: a prefork worker runs it
(``celery -A fork_celery_app worker --pool=prefork``).

The load balancer is created and opened at import, and used once, so the worker's main
process holds open pools with idle connections and a running prober when it forks its
pool processes. The test process does not import this module: it sends tasks by name.

Configuration comes from the environment:

``PGREPLICA_TEST_BROKER``    Redis URL, broker and result backend
``PGREPLICA_FORK_PRIMARY``   the primary's DSN
``PGREPLICA_FORK_REPLICAS``  the replicas' DSNs, a JSON list
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from fork_workload import balancer_used_before_fork, cycle

app = Celery("fork_celery_app")
app.conf.update(
    broker_url=os.environ["PGREPLICA_TEST_BROKER"],
    result_backend=os.environ["PGREPLICA_TEST_BROKER"],
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    result_expires=600,
)

lb = balancer_used_before_fork("main process")


@app.task(name="fork_celery_app.write_read")
def write_read(nonce: str) -> dict[str, Any]:
    """One :func:`fork_workload.cycle`: its facts (``nonce``, ``seen``, ``on_replica``,
    ``pid``, ``error``, ...)."""
    return cycle(lb, nonce, max_wait=1.0)
