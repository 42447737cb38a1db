"""Background jobs on replicas: the data consistency each job needs, framework-free.

A job enqueued by a web request usually only reads, yet running it on a replica is
only safe if the replica has replayed everything the enqueuing code wrote or saw. This
module carries that knowledge in the job's headers and decides, when the job starts,
where its reads may go::

    headers = {jobs.HEADER: jobs.capture(lb)}          # when enqueuing
    ...
    decision = jobs.start_job(lb, "sticky", headers.get(jobs.HEADER), attempt)
    if decision.retry:                                 # DELAYED, replicas behind
        requeue_later(...)
    else:
        with decision.scope:                           # routing state for the body
            run_the_job()

Each job type declares a :class:`DataConsistency`:

``ALWAYS`` (the default)
    Everything on the primary, as before.
``STICKY``
    A replica if one has replayed the job's token within a short wait, else the primary.
``DELAYED``
    The same wait; if the replicas are still behind, the job is retried once by the job
    system (:attr:`Decision.retry`), and on that retry uses the primary if they are
    still behind.

Nothing here imports a job framework: Celery's integration lives in
:mod:`pgreplica.contrib.celery`, and RQ or a pub/sub consumer can call the same three
functions. Nothing changes until the switch ``PGREPLICA_JOBS_ENABLED`` is turned on.
"""

from __future__ import annotations

from pgreplica._jobs_async import capture as acapture
from pgreplica._jobs_async import start_job as astart_job
from pgreplica._jobs_core import (
    ENV_SWITCH,
    HEADER,
    OUTCOMES,
    PRIMARY,
    PRIMARY_NO_WAL,
    REPLICA,
    REPLICA_RETRIED,
    RETRY,
    DataConsistency,
    Decision,
    Flag,
    Headers,
    JobScope,
    JobSpec,
    WaitPolicy,
    check_flag,
    current_decision,
    flag_enabled,
    jobs_enabled,
    outcomes,
    primary_decision,
    reset_outcomes,
)
from pgreplica._jobs_sync import capture, start_job

__all__ = [
    "ENV_SWITCH",
    "HEADER",
    "OUTCOMES",
    "PRIMARY",
    "PRIMARY_NO_WAL",
    "REPLICA",
    "REPLICA_RETRIED",
    "RETRY",
    "DataConsistency",
    "Decision",
    "Flag",
    "Headers",
    "JobScope",
    "JobSpec",
    "WaitPolicy",
    "acapture",
    "astart_job",
    "capture",
    "check_flag",
    "current_decision",
    "flag_enabled",
    "jobs_enabled",
    "outcomes",
    "primary_decision",
    "reset_outcomes",
    "start_job",
]
