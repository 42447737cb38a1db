"""pgreplica.contrib.celery with real Celery workers (subprocesses running
tests/celery_app.py), the real Redis of ``redis_server`` as broker and result backend,
and the local cluster.

Each job reads the row its enqueuing code just wrote and reports what it saw, the port
of the server that answered and its outcome label; a missing row is a stale read. The
``read_naive`` control ignores the job's token: with lagging replicas it must read
stale data, which shows that the test would see a routing mistake.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pgreplica.jobs import ENV_SWITCH, HEADER, capture
from pgreplica.lsn import CausalToken
from pgreplica.testing import LocalCluster

celery = pytest.importorskip("celery")

import celery_app  # noqa: E402  (after the importorskip)
from pgreplica import ConfigError  # noqa: E402
from pgreplica.contrib.celery import JobTask, spec_for  # noqa: E402

TESTS = Path(__file__).parent
LAG = "500ms"
#: A job that starts this soon after its enqueue finds the replicas 500 ms behind.
SURELY_BEHIND = 0.35
RESULT_TIMEOUT = 30.0


class Worker:
    """A ``celery worker`` subprocess on its own queue; output in a log file."""

    def __init__(
        self,
        directory: Path,
        redis_url: str,
        cluster: LocalCluster,
        *,
        pool: str,
        concurrency: int,
        enabled: bool = True,
    ) -> None:
        self.queue = f"pgreplica-test-{uuid.uuid4().hex[:10]}"
        self.log = directory / f"{self.queue}.log"
        env = dict(os.environ)
        env.update(
            PGREPLICA_TEST_BROKER=redis_url,
            PGREPLICA_TEST_CONFIG=json.dumps(cluster.config()),
            PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")])),
        )
        env[ENV_SWITCH] = "true" if enabled else "false"
        self.command = [
            sys.executable, "-m", "celery", "-A", "celery_app", "worker",
            f"--pool={pool}", f"--concurrency={concurrency}",
            "-Q", self.queue, "-n", f"{self.queue}@%h", "-l", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Worker:
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                self.command,
                cwd=TESTS,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: children are ours to end
            )
        deadline = time.monotonic() + timeout
        while " ready." not in self.text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"celery worker did not start:\n{self.tail()}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # warm shutdown, children included
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # prefork children left behind, if any, are in the worker's group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, chars: int = 4000) -> str:
        return f"--- worker log {self.log} (tail) ---\n{self.text()[-chars:]}"

    def send(self, task: Any, *args: Any, **options: Any) -> Any:
        return task.apply_async(args, queue=self.queue, **options)

    def results(self, pending: list[Any]) -> list[dict[str, Any]]:
        try:
            return [r.get(timeout=RESULT_TIMEOUT) for r in pending]
        except Exception as exc:
            raise AssertionError(f"a job failed or timed out: {exc!r}\n{self.tail()}") from exc

    def logged_outcomes(self, task: str) -> Counter[str]:
        pattern = re.compile(rf"job_data_consistency task=celery_app\.{task} \S+ outcome=(\w+)")
        return Counter(pattern.findall(self.text()))


@pytest.fixture(scope="module")
def publisher(cluster: LocalCluster, redis_server: str) -> Iterator[Any]:
    """The test process's side of celery_app: its load balancer publishes and writes."""
    celery_app.configure(redis_server, cluster.config())
    lb = celery_app.get_lb()
    with lb.isolated(), lb.write() as conn:
        conn.execute(celery_app.TABLE_SQL)
    cluster.wait_replayed()
    lb.open()
    yield lb
    celery_app.shutdown()
    celery_app.app.close()


def start_worker(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    redis_url: str,
    cluster: LocalCluster,
    **options: Any,
) -> Worker:
    worker = Worker(tmp_path_factory.mktemp("celery"), redis_url, cluster, **options)
    request.addfinalizer(worker.stop)
    return worker.start()


@pytest.fixture(scope="module")
def threads_worker(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: str,
    cluster: LocalCluster,
    publisher: Any,
) -> Worker:
    return start_worker(
        request, tmp_path_factory, redis_server, cluster, pool="threads", concurrency=8
    )


@pytest.fixture(autouse=True)
def _switch_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The publisher's switch (workers get theirs from their environment)."""
    monkeypatch.setenv(ENV_SWITCH, "true")


def lag_replicas(cluster: LocalCluster, delay: str = LAG) -> None:
    for replica in range(1, cluster.replicas + 1):
        cluster.lag(replica, delay)


def enqueue_after_write(lb: Any, worker: Worker, task: Any) -> tuple[str, float, Any]:
    """What a request does: write a row, then enqueue a job that reads it."""
    key = uuid.uuid4().hex
    with lb.isolated():
        with lb.write() as conn:
            conn.execute(celery_app.INSERT_SQL, (key,))
        enqueued_at = time.time()
        return key, enqueued_at, worker.send(task, key)


def run_round(lb: Any, worker: Worker, tasks: list[Any]) -> list[tuple[str, float, Any]]:
    return [
        (task.name.rpartition(".")[2], *enqueue_after_write(lb, worker, task)) for task in tasks
    ]


def brief(row: dict[str, Any]) -> str:
    """The fields of a job result that explain a failure, on one line."""
    fields = ("seen", "port", "reason", "outcome", "retries", "token")
    return " ".join(f"{f}={row.get(f)}" for f in fields) + f" delay={row.get('delay', 0):.3f}"


def summarize(rows: list[dict[str, Any]], primary_port: int) -> str:
    where = Counter("primary" if r["port"] == primary_port else "replica" for r in rows)
    return f"{len(rows)} jobs: {dict(Counter(r['outcome'] for r in rows))}, servers {dict(where)}"


# --------------------------------------------------------------------------- lag


def lag_scenario(
    lb: Any, worker: Worker, cluster: LocalCluster, rounds: int, per_round: dict[Any, int]
) -> dict[str, list[dict[str, Any]]]:
    """Rounds of jobs enqueued right after their writes, with 500 ms of lag on every
    replica; each round's first runs finish before the next round is sent, so that a
    job starts well within the lag. Returns the results by task."""
    lag_replicas(cluster)
    tasks = [task for task, count in per_round.items() for _ in range(count)]
    sent: list[tuple[str, str, float, Any]] = []
    for _ in range(rounds):
        batch = run_round(lb, worker, tasks)
        sent.extend(batch)
        worker.results([r for name, _, _, r in batch if name != "read_delayed"])
    by_task: dict[str, list[dict[str, Any]]] = {}
    results = worker.results([r for *_, r in sent])
    for (name, key, enqueued_at, _), result in zip(sent, results, strict=True):
        assert result["key"] == key
        result["delay"] = result["started_at"] - enqueued_at
        by_task.setdefault(name, []).append(result)
    return by_task


def check_lag_results(
    by_task: dict[str, list[dict[str, Any]]], worker: Worker, primary_port: int
) -> dict[str, str]:
    """The assertions shared by the threads and prefork lag tests; the figures back."""
    tail = worker.tail()
    naive = by_task["read_naive"]
    surely = [r for r in naive if r["delay"] < SURELY_BEHIND]
    assert surely, f"no control job started within {SURELY_BEHIND}s\n{tail}"
    fresh = [brief(r) for r in surely if r["seen"] is not None or r["port"] == primary_port]
    assert not fresh, f"the control did not read stale data: {fresh}\n{tail}"

    checked = [r for name in ("read_always", "read_sticky", "read_delayed") for r in by_task[name]]
    stale = [r for r in checked if r["seen"] != 1]
    assert not stale, f"{len(stale)} stale reads: {stale[:3]}\n{tail}"

    assert {r["outcome"] for r in by_task["read_always"]} == {"primary"}
    assert {r["port"] for r in by_task["read_always"]} == {primary_port}

    sticky = by_task["read_sticky"]
    prompt = [r for r in sticky if r["delay"] < SURELY_BEHIND]
    assert len(prompt) >= 0.8 * len(sticky), f"jobs started late: {sticky[:3]}\n{tail}"
    assert {(r["outcome"], r["port"]) for r in prompt} == {("primary", primary_port)}, tail

    delayed = by_task["read_delayed"]
    retried = [r for r in delayed if r["retries"] == 1]
    assert len(retried) >= 0.8 * len(delayed), f"DELAYED jobs not retried: {delayed[:3]}\n{tail}"
    assert all(r["retries"] <= 1 for r in delayed)
    assert {r["outcome"] for r in retried} <= {"replica_retried", "primary"}, tail
    assert all(r["outcome"] == "replica" for r in delayed if r["retries"] == 0), tail
    # Every retry in the results was announced by a first run's "retry" outcome.
    assert worker.logged_outcomes("read_delayed")["retry"] == len(retried), tail
    return {name: summarize(rows, primary_port) for name, rows in sorted(by_task.items())}


def test_jobs_enqueued_after_a_write_never_read_stale_data_under_lag(
    threads_worker: Worker, publisher: Any, healthy_cluster: LocalCluster
) -> None:
    per_round = {
        celery_app.read_sticky: 4,
        celery_app.read_delayed: 2,
        celery_app.read_always: 2,
        celery_app.read_naive: 1,
    }
    by_task = lag_scenario(publisher, threads_worker, healthy_cluster, 30, per_round)
    figures = check_lag_results(by_task, threads_worker, healthy_cluster.port(0))
    retried = [r for r in by_task["read_delayed"] if r["retries"] == 1]
    # The retry comes a second later, when a replica has replayed the write.
    on_replica = [r for r in retried if r["outcome"] == "replica_retried"]
    assert len(on_replica) >= 0.8 * len(retried), threads_worker.tail()
    print("lag (threads):", json.dumps(figures, indent=1))


# --------------------------------------------------------------------------- no lag


def test_without_lag_sticky_and_delayed_jobs_run_on_replicas(
    threads_worker: Worker, publisher: Any, healthy_cluster: LocalCluster
) -> None:
    tasks = [celery_app.read_sticky, celery_app.read_delayed, celery_app.read_sticky_plain]
    sent = [job for _ in range(20) for job in run_round(publisher, threads_worker, tasks)]
    results = threads_worker.results([r for *_, r in sent])
    primary_port = healthy_cluster.port(0)
    assert all(r["seen"] == 1 for r in results), threads_worker.tail()
    by_task: dict[str, list[dict[str, Any]]] = {}
    for (name, *_), result in zip(sent, results, strict=True):
        by_task.setdefault(name, []).append(result)
    for name, rows in by_task.items():
        on_replicas = [r for r in rows if r["outcome"] == "replica" and r["port"] != primary_port]
        assert len(on_replicas) >= 0.9 * len(rows), (name, rows[:3], threads_worker.tail())
        assert all(r["retries"] == 0 for r in rows)
    print("no lag:", {name: summarize(rows, primary_port) for name, rows in by_task.items()})
    # each task's database usage, logged by the worker (install(usage_log=True))
    usage = re.findall(
        r"job_db_usage task=celery_app\.read_sticky db_count=(\d+) db_primary_count=(\d+)"
        r" db_replica_count=(\d+)",
        threads_worker.text(),
    )
    assert len(usage) >= 20, threads_worker.tail()
    assert all(int(count) >= 1 for count, _, _ in usage)
    assert sum(int(replica) for _, _, replica in usage) >= 18  # as the outcomes above


# --------------------------------------------------------------------------- controls


def test_the_rollout_flag_at_0_and_100_percent(
    threads_worker: Worker, publisher: Any, healthy_cluster: LocalCluster
) -> None:
    tasks = [celery_app.read_sticky_flag0, celery_app.read_sticky_flag100]
    sent = [job for _ in range(15) for job in run_round(publisher, threads_worker, tasks)]
    results = threads_worker.results([r for *_, r in sent])
    assert all(r["seen"] == 1 for r in results)
    outcomes: dict[str, Counter[str]] = {}
    for (name, *_), result in zip(sent, results, strict=True):
        outcomes.setdefault(name, Counter())[result["outcome"]] += 1
    assert outcomes["read_sticky_flag0"] == {"primary": 15}, threads_worker.tail()
    assert outcomes["read_sticky_flag100"]["replica"] >= 14, threads_worker.tail()
    # A 0 % job needs no token: none is captured for it.
    assert {
        r["token"] for r, (name, *_) in zip(results, sent, strict=True) if name.endswith("flag0")
    } == {""}
    print("flags:", {k: dict(v) for k, v in outcomes.items()})


def test_a_publisher_with_the_switch_off_sends_no_token(
    threads_worker: Worker,
    publisher: Any,
    healthy_cluster: LocalCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV_SWITCH, "false")
    sent = [
        enqueue_after_write(publisher, threads_worker, celery_app.read_sticky) for _ in range(5)
    ]
    results = threads_worker.results([r for *_, r in sent])
    assert [r["outcome"] for r in results] == ["primary_no_wal"] * 5, threads_worker.tail()
    assert {r["port"] for r in results} == {healthy_cluster.port(0)}


def test_a_worker_with_the_switch_off_runs_every_job_on_the_primary(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: str,
    publisher: Any,
    healthy_cluster: LocalCluster,
) -> None:
    worker = start_worker(
        request,
        tmp_path_factory,
        redis_server,
        healthy_cluster,
        pool="threads",
        concurrency=4,
        enabled=False,
    )
    tasks = [celery_app.read_sticky, celery_app.read_delayed, celery_app.read_sticky_flag100]
    sent = [job for _ in range(5) for job in run_round(publisher, worker, tasks)]
    results = worker.results([r for *_, r in sent])
    assert all(r["seen"] == 1 for r in results)
    assert {(r["outcome"], r["port"], r["retries"]) for r in results} == {
        ("primary", healthy_cluster.port(0), 0)
    }, worker.tail()
    assert all(r["token"] for r in results)  # the token came, the switch ignored it
    worker.stop()


# --------------------------------------------------------------------------- reuse


def check_no_leak(lb: Any, worker: Worker, rounds: int, followers: int) -> int:
    """Task A writes and leaks a primary pin (and fails, every other round); then
    ``followers`` B tasks report the state they start with. Every B must start clean:
    before pgreplica's scope (``outer``) and inside it (exactly its own header's token).
    Returns how many B ran on the thread and process A had used: the cases that prove
    something, which the caller requires to be there."""
    with lb.isolated():
        early = capture(lb)  # a position before any A's write
    early_token = CausalToken.from_dict(early)
    after_a = 0
    for i in range(rounds):
        fail = i % 2 == 1
        a = worker.send(celery_app.leak, uuid.uuid4().hex, fail)
        if fail:
            with pytest.raises(RuntimeError, match="leak: failing") as info:
                a.get(timeout=RESULT_TIMEOUT)
            where = str(info.value).rpartition(" in ")[2]
        else:
            leaked = worker.results([a])[0]
            assert leaked["use_primary"], leaked  # A did hold a pin and a newer token
            assert CausalToken.parse(leaked["token"]).get("main") > early_token.get("main")
            where = f"{leaked['pid']}/{leaked['thread']}"
        sent = [worker.send(celery_app.report_state, headers={HEADER: early})]
        sent += [worker.send(celery_app.report_state) for _ in range(followers - 1)]
        for b in worker.results(sent):
            assert b["outer"] == {"token": "", "use_primary": False}, (b, worker.tail())
            after_a += f"{b['pid']}/{b['thread']}" == where
        first = worker.results(sent[:1])[0]
        assert (first["token"], first["written"], first["use_primary"]) == (
            str(early_token),
            "",
            False,
        ), first
        assert first["outcome"] == "replica", first
    none = worker.results([worker.send(celery_app.report_state, headers={HEADER: {}})])[0]
    assert (none["token"], none["outcome"], none["use_primary"]) == ("", "primary_no_wal", True)
    return after_a


def test_a_reused_worker_thread_starts_each_task_from_a_clean_state(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: str,
    publisher: Any,
    healthy_cluster: LocalCluster,
) -> None:
    worker = start_worker(
        request, tmp_path_factory, redis_server, healthy_cluster, pool="threads", concurrency=1
    )
    assert check_no_leak(publisher, worker, rounds=4, followers=1) == 4
    worker.stop()


# --------------------------------------------------------------------------- prefork


def test_prefork_pool(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: str,
    publisher: Any,
    healthy_cluster: LocalCluster,
) -> None:
    worker = start_worker(
        request, tmp_path_factory, redis_server, healthy_cluster, pool="prefork", concurrency=2
    )
    primary_port = healthy_cluster.port(0)
    tasks = [celery_app.read_sticky, celery_app.read_delayed]
    sent = [job for _ in range(10) for job in run_round(publisher, worker, tasks)]
    results = worker.results([r for *_, r in sent])
    assert all(r["seen"] == 1 for r in results)
    replica_runs = [r for r in results if r["outcome"] == "replica" and r["port"] != primary_port]
    assert len(replica_runs) >= 0.9 * len(results), worker.tail()
    no_lag = summarize(results, primary_port)

    per_round = {
        celery_app.read_sticky: 2,
        celery_app.read_delayed: 1,
        celery_app.read_always: 1,
        celery_app.read_naive: 1,
    }
    by_task = lag_scenario(publisher, worker, healthy_cluster, 8, per_round)
    figures = check_lag_results(by_task, worker, primary_port)
    pids = {r["pid"] for rows in by_task.values() for r in rows} | {r["pid"] for r in results}
    assert len(pids) == 2, f"expected both children to serve jobs: {pids}"

    healthy_cluster.heal()
    same_process = check_no_leak(publisher, worker, rounds=4, followers=4)
    assert same_process >= 1, "no task ran after a leaking one in the same process"
    print("prefork no lag:", no_lag)
    print("prefork lag:", json.dumps(figures, indent=1))
    worker.stop()


# --------------------------------------------------------------------------- definition


def test_delayed_without_retries_is_refused_when_the_task_is_defined() -> None:
    app = celery.Celery("definition_test", broker="memory://")
    app.finalize()  # tasks are created at once, as the decorator runs

    with pytest.raises(ConfigError, match=r"definition_test\.never_retried: data_consistency"):

        @app.task(
            base=JobTask,
            data_consistency="delayed",
            max_retries=0,
            name="definition_test.never_retried",
            shared=False,
        )
        def never_retried() -> None: ...

    with pytest.raises(ConfigError, match="expected always, sticky or delayed"):

        @app.task(
            base=JobTask, data_consistency="eventually", name="definition_test.typo", shared=False
        )
        def typo() -> None: ...

    @app.task(
        base=JobTask,
        data_consistency="delayed",
        max_retries=1,
        name="definition_test.ok",
        shared=False,
    )
    def ok() -> None: ...

    assert spec_for(ok).consistency.value == "delayed"
    app.close()
