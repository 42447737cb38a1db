"""The IO-free core of :mod:`pgreplica.jobs`: consistencies, wait policies, flags,
outcomes and the decision logic. The I/O lives in ``_jobs_async.py`` (and its generated
sync twin); :mod:`pgreplica.jobs` is the public face of both."""

from __future__ import annotations

import enum
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from types import TracebackType
from typing import TypeAlias, cast

import psycopg

from pgreplica._fork import ForkSafeLock
from pgreplica._scope import EitherWith
from pgreplica.balancer import CHECKOUT_ERRORS, UNKNOWN_POSITION, DatabaseRoute, Router
from pgreplica.context import RouteState, Scope
from pgreplica.errors import ConfigError, PgReplicaError, TokenError
from pgreplica.health import Host
from pgreplica.lsn import EMPTY_TOKEN, CausalToken
from pgreplica.observe import WATCH, JobOutcome, notify

logger = logging.getLogger("pgreplica.jobs")

#: The message header that carries the causal token (``{"main": "0/16B3748"}``).
HEADER = "pgreplica_wal_locations"
#: The global switch: unset or false, every job runs as ALWAYS and nothing is captured.
ENV_SWITCH = "PGREPLICA_JOBS_ENABLED"

# Outcomes, one per job run: the label of logs and metrics.
PRIMARY = "primary"
"""ALWAYS, the flag or the switch off, or no replica caught up (STICKY, DELAYED retry)."""
PRIMARY_NO_WAL = "primary_no_wal"
"""The message carried no token: nothing tells what the job must see."""
REPLICA = "replica"
"""A replica had replayed the job's token."""
REPLICA_RETRIED = "replica_retried"
"""DELAYED, on its retry: a replica had caught up by then."""
RETRY = "retry"
"""DELAYED, first run, replicas behind: the job system must retry the job later."""
OUTCOMES = (PRIMARY, PRIMARY_NO_WAL, REPLICA, REPLICA_RETRIED, RETRY)

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})

Flag: TypeAlias = "bool | float | Callable[[str], bool] | None"
"""Per-job rollout: ``None``/``True`` on, ``False`` off, a percentage 0-100 of job runs,
or a callable given the job's name (a feature-flag service)."""
Headers: TypeAlias = "Mapping[str, str] | str | CausalToken | None"
"""What :func:`~pgreplica.jobs.capture` produced and the message carried (absent: ``None``)."""


class DataConsistency(str, enum.Enum):
    """How fresh the data a job reads must be, and what to do when replicas are behind."""

    ALWAYS = "always"
    STICKY = "sticky"
    DELAYED = "delayed"

    @classmethod
    def parse(cls, value: object, *, job: str = "job") -> DataConsistency:
        """``"sticky"`` or ``DataConsistency.STICKY`` -> the member; anything else is a
        :class:`~pgreplica.ConfigError` naming the job."""
        if isinstance(value, DataConsistency):
            return value
        if isinstance(value, str):
            try:
                return cls(value.strip().lower())
            except ValueError:
                pass
        raise ConfigError(
            f"{job}: data_consistency", f"expected always, sticky or delayed, got {value!r}"
        )


@dataclass(frozen=True)
class WaitPolicy:
    """How long a job waits for a replica to replay its token before giving up on them.

    The replicas are checked at once, then up to ``tries`` more times ``interval``
    seconds apart: at most ``tries * interval`` seconds (1.5 s by default). Each check
    reads the prober's cached replay positions, then asks the replicas that the cache
    shows behind directly (one round trip each).
    """

    tries: int = 3
    interval: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.tries, bool) or not isinstance(self.tries, int) or self.tries < 0:
            raise ConfigError("wait.tries", f"expected an integer >= 0, got {self.tries!r}")
        interval = self.interval
        if (
            isinstance(interval, bool)
            or not isinstance(interval, (int, float))
            or not math.isfinite(interval)
            or interval < 0
        ):
            raise ConfigError("wait.interval", f"expected seconds >= 0, got {interval!r}")

    @property
    def total(self) -> float:
        """The longest wait, in seconds."""
        return self.tries * self.interval

    @classmethod
    def of(cls, value: object, *, job: str = "job") -> WaitPolicy:
        """``None`` (the default policy), a :class:`WaitPolicy`, or ``(tries, interval)``."""
        if value is None:
            return DEFAULT_WAIT
        if isinstance(value, WaitPolicy):
            return value
        if isinstance(value, (tuple, list)) and len(value) == 2:
            try:
                return cls(value[0], value[1])
            except ConfigError as exc:
                raise ConfigError(f"{job}: {exc.setting}", exc.problem) from None
        raise ConfigError(
            f"{job}: wait", f"expected a WaitPolicy or (tries, interval), got {value!r}"
        )


DEFAULT_WAIT = WaitPolicy()


def check_flag(flag: object, *, job: str = "job") -> None:
    """Raise :class:`~pgreplica.ConfigError` unless ``flag`` is a valid :data:`Flag`."""
    if flag is None or isinstance(flag, bool) or callable(flag):
        return
    if isinstance(flag, (int, float)) and math.isfinite(flag) and 0 <= flag <= 100:
        return
    raise ConfigError(
        f"{job}: flag", f"expected a percentage 0-100, a callable or a bool, got {flag!r}"
    )


def flag_enabled(flag: Flag, job: str, rand: Callable[[], float] | None = None) -> bool:
    """Whether this run of ``job`` uses its declared consistency (else it acts as ALWAYS).

    A percentage rolls ``rand()`` (default :func:`random.random`, in [0, 1)) once per run:
    ``flag=1`` lets about one run in a hundred use replicas."""
    if flag is None or flag is True:
        return True
    if flag is False:
        return False
    if callable(flag):
        return bool(flag(job))
    percent = float(flag)
    if percent >= 100:
        return True
    if percent <= 0:
        return False
    return (rand or random.random)() * 100 < percent


def jobs_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """The global switch ``PGREPLICA_JOBS_ENABLED`` (default: off)."""
    text = (os.environ if environ is None else environ).get(ENV_SWITCH)
    if text is None:
        return False
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigError(ENV_SWITCH, f"expected true or false, got {text!r}")


@dataclass(frozen=True)
class JobSpec:
    """The validated routing options of one job type (what a task decorator declares)."""

    name: str
    consistency: DataConsistency = DataConsistency.ALWAYS
    wait: WaitPolicy = DEFAULT_WAIT
    flag: Flag = None

    @classmethod
    def of(
        cls,
        name: str,
        consistency: object = DataConsistency.ALWAYS,
        wait: object = None,
        flag: object = None,
    ) -> JobSpec:
        """Parse and validate; errors are :class:`~pgreplica.ConfigError` naming the job."""
        kind = DataConsistency.parse(consistency, job=name)
        policy = WaitPolicy.of(wait, job=name)
        check_flag(flag, job=name)
        return cls(name, kind, policy, cast("Flag", flag))  # checked above

    @property
    def wants_token(self) -> bool:
        """Whether enqueuing should capture a token: not for ALWAYS nor a 0 % flag."""
        if self.consistency is DataConsistency.ALWAYS or self.flag is False:
            return False
        flag = self.flag
        return not (isinstance(flag, (int, float)) and not isinstance(flag, bool) and flag <= 0)


# -- the decision and the scope of the job body ----------------------------------------

_DECISION: ContextVar[Decision | None] = ContextVar("pgreplica_job_decision", default=None)


def current_decision() -> Decision | None:
    """The decision of the job running in this context (inside its :attr:`Decision.scope`)."""
    return _DECISION.get()


class JobScope(EitherWith[RouteState]):
    """Routing state of a job body: a fresh state (nothing inherited from the previous
    job on this thread), the job's token adopted, and the primary pinned unless a
    replica was caught up. Exit restores the state of before, whatever the body left.
    Works with ``with`` and ``async with``, and may be entered again."""

    __slots__ = ("_decision", "_saved")

    def __init__(self, decision: Decision) -> None:
        self._decision = decision
        self._saved: list[tuple[Scope, Token[Decision | None]]] = []

    def __enter__(self) -> RouteState:
        decision = self._decision
        scope = Scope(
            isolate=True,
            adopt=decision.token,
            use_primary=True if decision.use_primary else None,
        )
        state = scope.__enter__()
        self._saved.append((scope, _DECISION.set(decision)))
        return state

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        scope, token = self._saved.pop()
        try:
            _DECISION.reset(token)
        except ValueError:  # exited from another context than it was entered in
            _DECISION.set(None)
        scope.__exit__(exc_type, exc, tb)


@dataclass(frozen=True, eq=False)
class Decision:
    """Where one run of a job reads from, and why (:attr:`outcome`)."""

    job: str
    consistency: DataConsistency
    outcome: str
    token: CausalToken
    """The token the job adopts: what the enqueuing code wrote or saw."""
    attempt: int = 0
    waited: float = 0.0
    """Seconds spent waiting for a replica to catch up."""
    scope: JobScope = field(init=False, repr=False, compare=False)
    """Enter it around the job body (``with decision.scope:``)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "scope", JobScope(self))

    @property
    def use_primary(self) -> bool:
        """Everything in the job goes to the primary."""
        return self.outcome not in (REPLICA, REPLICA_RETRIED)

    @property
    def retry(self) -> bool:
        """DELAYED and behind on the first run: retry the job later instead of running it."""
        return self.outcome == RETRY

    def headers(self) -> dict[str, str]:
        """The header value to re-send with a retry: the same token as the first run."""
        return self.token.as_dict()


# -- counting outcomes -------------------------------------------------------------------

_OUTCOMES: Counter[tuple[str, str]] = Counter()
_OUTCOMES_LOCK = ForkSafeLock()


def outcomes(job: str | None = None) -> Counter[str]:
    """A snapshot of how many job runs had each outcome in this process (for metrics);
    ``job`` restricts it to one job type. Worker processes each count their own."""
    with _OUTCOMES_LOCK:
        items = list(_OUTCOMES.items())
    result: Counter[str] = Counter()
    for (name, outcome), count in items:
        if job is None or name == job:
            result[outcome] += count
    return result


def reset_outcomes() -> None:
    """Forget the counts (tests, or a metrics exporter that reports deltas)."""
    with _OUTCOMES_LOCK:
        _OUTCOMES.clear()


def _finish(
    job: str,
    kind: DataConsistency,
    outcome: str,
    token: CausalToken | None,
    attempt: int,
    waited: float,
) -> Decision:
    decision = Decision(job, kind, outcome, token or EMPTY_TOKEN, attempt, waited)
    with _OUTCOMES_LOCK:
        _OUTCOMES[(job, outcome)] += 1
    if WATCH.on:
        notify(JobOutcome(job, outcome, waited))
    logger.info(
        "job_data_consistency task=%s consistency=%s outcome=%s attempt=%d waited_ms=%d",
        job,
        kind.value,
        outcome,
        attempt,
        round(waited * 1000),
    )
    return decision


def primary_decision(
    job: str,
    attempt: int = 0,
    consistency: DataConsistency | str = DataConsistency.ALWAYS,
) -> Decision:
    """A decision that runs the job on the primary, logged and counted like any other:
    for a job system whose own decision step failed (never run a job with an unknown
    routing state)."""
    kind = DataConsistency.parse(consistency, job=job)
    return _finish(job, kind, PRIMARY, None, attempt, 0.0)


# -- the decision, without I/O -----------------------------------------------------------


def _parse_headers(headers: Headers, job: str) -> CausalToken | None:
    """The message's token; ``None`` when it has none (or a malformed one)."""
    if headers is None:
        return None
    try:
        if isinstance(headers, CausalToken):
            token = headers
        elif isinstance(headers, str):
            token = CausalToken.parse(headers)
        else:
            token = CausalToken.from_dict(headers)
    except TokenError as exc:
        logger.warning("job_data_consistency_bad_header task=%s error=%s", job, exc)
        return None
    return token or None


def _early_outcome(
    kind: DataConsistency,
    token: CausalToken | None,
    enabled: bool | None,
    flag: Flag,
    job: str,
    rand: Callable[[], float] | None,
) -> str | None:
    """The outcome when no replica needs checking, else ``None``."""
    switch = jobs_enabled() if enabled is None else enabled
    if not switch or kind is DataConsistency.ALWAYS or not flag_enabled(flag, job, rand):
        return PRIMARY
    if token is None:
        return PRIMARY_NO_WAL
    return None


def _needs(
    router: Router, token: CausalToken, adopted_at: float
) -> list[tuple[DatabaseRoute, int]] | None:
    """(route, position) for each configured database the token names, bounded and
    checked against the primary's history as reads are (:meth:`Router.required`);
    ``None`` when one of them has no replica at all, or a position no replica can
    prove (nothing to wait or retry for: the job runs on the primary)."""
    needs: list[tuple[DatabaseRoute, int]] = []
    for name, _ in token.items():
        route = router.databases.get(name)
        if route is None:
            continue  # a database this balancer does not route: nothing to read there
        need = router.required(route, token, adopted_at)
        if not route.replicas or need == UNKNOWN_POSITION:
            return None
        needs.append((route, need))
    return needs


def _late_outcome(kind: DataConsistency, attempt: int, caught_up: bool, can_retry: bool) -> str:
    if caught_up:
        return REPLICA_RETRIED if kind is DataConsistency.DELAYED and attempt > 0 else REPLICA
    if kind is DataConsistency.DELAYED and attempt == 0 and can_retry:
        return RETRY
    return PRIMARY


def _log_capture_failed(host: Host, exc: BaseException) -> None:
    logger.warning(
        "job_capture_failed host=%s error=%s: the job will run on the primary",
        host.label,
        type(exc).__name__,
    )


_CAPTURE_ERRORS = (psycopg.Error, PgReplicaError, *CHECKOUT_ERRORS)
