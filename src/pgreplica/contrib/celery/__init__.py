"""Celery integration: per-task data consistency for jobs that read from replicas.

::

    from pgreplica.contrib.celery import JobTask, install

    app = Celery(...)
    install(app, lb)        # or install(app, get_lb): a callable, resolved on first use

    @app.task(base=JobTask, data_consistency="delayed")
    def refresh_stats(project_id): ...

:func:`install` connects three Celery signals; nothing is monkey-patched:

``before_task_publish``
    Adds the causal token (:func:`pgreplica.jobs.capture`) to the message headers under
    :data:`~pgreplica.jobs.HEADER`. Task arguments are untouched. A header already there
    (a retry re-sends the first run's token) is kept.
``task_prerun``
    Decides where the task reads from (:func:`pgreplica.jobs.start_job`) and enters the
    decision's scope: a fresh routing state, the token adopted, the primary pinned
    unless a replica was caught up.
``task_postrun``
    Leaves that scope, also when the task failed: the next task on the same worker
    thread or process starts from the state of before, not with this task's token or
    primary pin.

Task options (``@app.task(...)`` keyword arguments, or class attributes of a
:class:`JobTask` subclass): ``data_consistency`` (``"always"``, ``"sticky"``,
``"delayed"``), ``data_consistency_wait`` (a :class:`~pgreplica.jobs.WaitPolicy` or
``(tries, interval)``), ``data_consistency_flag`` (a percentage or a callable) and
``data_consistency_retry_delay`` (seconds before the DELAYED retry, default 1).

DELAYED needs ``base=JobTask``: the retry must replace the task body, which a signal
handler cannot do. :class:`JobTask` also validates the options when Celery creates the
task, raising :class:`~pgreplica.ConfigError` naming the task (for example DELAYED with
``max_retries=0``). A plain task declaring DELAYED acts as STICKY, with a warning.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from typing import Any, TypeAlias

from pgreplica._extras import extra_imports

with extra_imports("celery", feature="pgreplica.contrib.celery"):
    import celery
    from celery import signals

from pgreplica import jobs, observe
from pgreplica._balancer_sync import LoadBalancer
from pgreplica._fork import ForkSafeLock
from pgreplica.errors import ConfigError
from pgreplica.jobs import HEADER, DataConsistency, Decision, JobScope, JobSpec

__all__ = [
    "DEFAULT_RETRY_DELAY",
    "HEADER",
    "Installation",
    "JobTask",
    "install",
    "spec_for",
]

logger = logging.getLogger("pgreplica.jobs")

#: Seconds between the first run of a DELAYED task that found replicas behind and its retry.
DEFAULT_RETRY_DELAY = 1.0

LoadBalancerSource: TypeAlias = "LoadBalancer | Callable[[], LoadBalancer]"


def _task_name(task: Any) -> str:
    name = getattr(task, "name", None)
    if isinstance(name, str) and name:
        return name
    cls = task if isinstance(task, type) else type(task)
    return f"{cls.__module__}.{cls.__qualname__}"


def spec_for(task: Any) -> JobSpec:
    """The validated routing options of a Celery task (instance or class).

    Raises :class:`~pgreplica.ConfigError` naming the task when an option is invalid, or
    when the task is DELAYED but cannot be retried (``max_retries=0``)."""
    name = _task_name(task)
    spec = JobSpec.of(
        name,
        getattr(task, "data_consistency", DataConsistency.ALWAYS),
        getattr(task, "data_consistency_wait", None),
        getattr(task, "data_consistency_flag", None),
    )
    if spec.consistency is DataConsistency.DELAYED and getattr(task, "max_retries", None) == 0:
        raise ConfigError(
            f"{name}: data_consistency",
            "'delayed' retries the task once when the replicas are behind, but the task"
            " sets max_retries=0: use 'sticky', or allow a retry",
        )
    _retry_delay(task, name)
    return spec


def _retry_delay(task: Any, name: str) -> float:
    delay = getattr(task, "data_consistency_retry_delay", DEFAULT_RETRY_DELAY)
    if (
        isinstance(delay, bool)
        or not isinstance(delay, (int, float))
        or not math.isfinite(delay)
        or delay < 0
    ):
        raise ConfigError(
            f"{name}: data_consistency_retry_delay", f"expected seconds >= 0, got {delay!r}"
        )
    return float(delay)


class JobTask(celery.Task):  # type: ignore[misc]  # Celery ships no type information
    """Base class for tasks that declare a data consistency (required for DELAYED).

    Options are validated when Celery creates the task class. When the decision made in
    ``task_prerun`` is :data:`~pgreplica.jobs.RETRY`, :meth:`__call__` retries the task
    (Celery's own retry, with ``data_consistency_retry_delay`` as countdown and the same
    token) instead of running it.
    """

    data_consistency: DataConsistency | str = DataConsistency.ALWAYS
    data_consistency_wait: jobs.WaitPolicy | tuple[int, float] | None = None
    data_consistency_flag: jobs.Flag = None
    data_consistency_retry_delay: float = DEFAULT_RETRY_DELAY

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        spec_for(cls)  # a ConfigError names the task when it is being defined

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        decision = jobs.current_decision()
        if decision is not None and decision.retry and decision.job == self.name:
            request = self.request
            headers = {**(request.headers or {}), HEADER: decision.headers()}
            raise self.retry(countdown=_retry_delay(self, self.name), headers=headers, throw=True)
        return super().__call__(*args, **kwargs)


class Installation:
    """The signal handlers :func:`install` connected for one Celery app."""

    def __init__(
        self,
        app: Any,
        lb: LoadBalancerSource,
        *,
        enabled: bool | None = None,
        rand: Callable[[], float] | None = None,
        usage_log: bool = False,
    ) -> None:
        self.app = app
        self.usage_log = usage_log
        """Count each task's database work (:mod:`pgreplica.observe`) and log it."""
        self.enabled = enabled
        """Overrides ``PGREPLICA_JOBS_ENABLED`` when not ``None``."""
        self.rand = rand or random.random
        self._lb_source = lb
        self._lb: LoadBalancer | None = lb if isinstance(lb, LoadBalancer) else None
        self._lock = ForkSafeLock()
        self._specs: dict[str, tuple[JobSpec, bool]] = {}
        self._active: dict[str, list[tuple[JobScope, observe.usage | None, str]]] = {}
        self._uid = f"pgreplica-jobs-{id(self)}"

    @property
    def lb(self) -> LoadBalancer:
        """The load balancer, created on first use when a callable was installed (so a
        prefork parent never opens pools that its children would inherit)."""
        lb = self._lb
        if lb is None:
            with self._lock:
                if self._lb is None:
                    source = self._lb_source
                    assert not isinstance(source, LoadBalancer)
                    self._lb = source()
                lb = self._lb
        return lb

    def connect(self) -> None:
        signals.before_task_publish.connect(
            self._before_publish, weak=False, dispatch_uid=f"{self._uid}-publish"
        )
        signals.task_prerun.connect(self._prerun, weak=False, dispatch_uid=f"{self._uid}-prerun")
        signals.task_postrun.connect(self._postrun, weak=False, dispatch_uid=f"{self._uid}-postrun")

    def uninstall(self) -> None:
        """Disconnect the handlers (tests; an app that stops using replicas for jobs)."""
        signals.before_task_publish.disconnect(dispatch_uid=f"{self._uid}-publish")
        signals.task_prerun.disconnect(dispatch_uid=f"{self._uid}-prerun")
        signals.task_postrun.disconnect(dispatch_uid=f"{self._uid}-postrun")
        _INSTALLED.pop(id(self.app), None)

    def _switch(self) -> bool:
        return jobs.jobs_enabled() if self.enabled is None else self.enabled

    def spec(self, task: Any) -> tuple[JobSpec, bool]:
        """(options, whether a DELAYED retry is possible), cached per task name."""
        name = _task_name(task)
        cached = self._specs.get(name)
        if cached is None:
            spec = spec_for(task)
            can_retry = isinstance(task, JobTask)
            if spec.consistency is DataConsistency.DELAYED and not can_retry:
                logger.warning(
                    "job_data_consistency_config task=%s: 'delayed' needs base=JobTask"
                    " to retry; the task acts as 'sticky'",
                    name,
                )
            cached = self._specs[name] = (spec, can_retry)
        return cached

    # -- signal handlers: Celery logs and swallows what they raise, so they never do --

    def _before_publish(self, sender: Any = None, headers: Any = None, **_: Any) -> None:
        if not isinstance(headers, dict) or HEADER in headers:
            return
        try:
            if not self._switch():
                return
            task = self.app.tasks.get(sender) if isinstance(sender, str) else None
            if task is not None and not self.spec(task)[0].wants_token:
                return
            headers[HEADER] = jobs.capture(self.lb)
        except Exception as exc:  # no header: the job runs on the primary
            logger.error("job_capture_failed task=%s error=%s: %s", sender, type(exc).__name__, exc)

    def _prerun(self, task_id: Any = None, task: Any = None, **_: Any) -> None:
        if task is None or task_id is None or getattr(task, "app", None) is not self.app:
            return
        try:
            spec, can_retry = self.spec(task)
            request = task.request
            decision = jobs.start_job(
                self.lb,
                spec.consistency,
                request.get(HEADER),
                int(request.retries or 0),
                job=spec.name,
                wait=spec.wait,
                flag=spec.flag,
                enabled=self.enabled,
                rand=self.rand,
                can_retry=can_retry,
            )
        except Exception as exc:  # never run a job with an unknown routing state
            decision = self._fallback(task, exc)
        used = observe.usage() if self.usage_log else None
        if used is not None:
            used.__enter__()
        decision.scope.__enter__()
        with self._lock:
            self._active.setdefault(str(task_id), []).append((decision.scope, used, decision.job))

    def _fallback(self, task: Any, exc: Exception) -> Decision:
        name = _task_name(task)
        logger.error(
            "job_data_consistency_failed task=%s error=%s: %s; running on the primary",
            name,
            type(exc).__name__,
            exc,
        )
        return jobs.primary_decision(name, int(getattr(task.request, "retries", 0) or 0))

    def _postrun(self, task_id: Any = None, **_: Any) -> None:
        key = str(task_id)
        with self._lock:
            stack = self._active.get(key)
            if not stack:
                return
            scope, used, job = stack.pop()
            if not stack:
                del self._active[key]
        scope.__exit__(None, None, None)
        if used is not None:
            used.__exit__(None, None, None)
            summary = used.used.summary()
            logger.info(
                "job_db_usage task=%s db_count=%d db_primary_count=%d db_replica_count=%d",
                job,
                summary.get("db_count", 0),
                summary.get("db_primary_count", 0),
                summary.get("db_replica_count", 0),
                extra={"db_usage": summary},
            )


_INSTALLED: dict[int, Installation] = {}


def install(
    app: Any,
    lb: LoadBalancerSource,
    *,
    enabled: bool | None = None,
    rand: Callable[[], float] | None = None,
    usage_log: bool = False,
) -> Installation:
    """Route the tasks of ``app`` by their data consistency, using ``lb`` (a
    :class:`~pgreplica.LoadBalancer`, or a callable returning one, called on first use).

    ``enabled`` overrides ``PGREPLICA_JOBS_ENABLED`` (read at each publish and task
    start when ``None``); ``rand`` is the random source of percentage flags. Installing
    the same app again replaces the earlier installation. ``usage_log`` logs each
    task's database usage (``job_db_usage``, INFO, the counts as ``extra["db_usage"]``;
    inside the task, :func:`pgreplica.observe.current_usage` reads them).
    """
    previous = _INSTALLED.get(id(app))
    if previous is not None:
        previous.uninstall()
    installation = Installation(app, lb, enabled=enabled, rand=rand, usage_log=usage_log)
    installation.connect()
    _INSTALLED[id(app)] = installation
    return installation
