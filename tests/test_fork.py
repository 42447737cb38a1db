"""A load balancer opened before ``fork()`` keeps working in the parent and the children.

The parent opens a balancer and uses it (its pools hold idle connections, its prober
runs), then forks: with ``os.fork()``, a ``multiprocessing`` pool (``fork`` start
method), ``AsyncLoadBalancer`` in a fresh event loop, a real gunicorn with ``--preload``
(sync and gthread workers) and a real Celery prefork worker. Every process runs the
cycles of tests/fork_workload.py: each statement selects a nonce unique to its process
and iteration, and a result with another nonce is a result that crossed between
processes on a shared connection. Every process must see only its own results, no
errors and no stale read-backs, and reads routed by the children must land on replicas
(most of them) and on the server their ``on_replica`` claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any, NoReturn

import pytest

import pgreplica
from fork_workload import (
    MAX_FAILED,
    TABLE_SQL,
    arun_cycles,
    cycle_problems,
    new_nonce,
    replica_share,
    report_problems,
    run_cycles,
)
from pgreplica.testing import LocalCluster
from redis_server import free_port

# Python 3.12+ warns when a process with threads (the prober's) forks: that is the point.
pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)

TESTS = Path(__file__).parent
CHILDREN = 3
ITERATIONS = 300
#: Safety nets only: a healthy run takes a few seconds.
RUN_LIMIT = 20.0
CHILD_ALARM = 60


@pytest.fixture(scope="module")
def fork_table(cluster: LocalCluster) -> LocalCluster:
    """The ``fork_rows`` table, on the primary and replayed by the replicas."""
    cluster.heal()
    with pgreplica.LoadBalancer(config=cluster.config()) as lb, lb.isolated(), lb.write() as c:
        c.execute(TABLE_SQL)
    cluster.wait_replayed()
    return cluster


def ports(cluster: LocalCluster) -> tuple[int, list[int]]:
    return cluster.port(0), [cluster.port(i) for i in range(1, cluster.replicas + 1)]


def dsns(cluster: LocalCluster) -> dict[str, Any]:
    return {"primary": cluster.primary_dsn, "replicas": cluster.replica_dsns}


# --------------------------------------------------------------------------- checks


def check_reports(
    reports: dict[str, dict[str, Any]], cluster: LocalCluster, forked: list[str]
) -> None:
    """Every report clean; each forked process's reads (after its first) mostly on a
    replica; no connection of the parent (``parent*`` reports) used by a child."""
    primary_port, replica_ports = ports(cluster)
    problems = {
        name: report_problems(r, primary_port, replica_ports) for name, r in reports.items()
    }
    problems = {name: p for name, p in problems.items() if p}
    assert not problems, json.dumps(problems, indent=1)
    for name in forked:
        on_replica, reads = replica_share(reports[name]["cycles"][1:])
        assert reads and on_replica * 2 > reads, f"{name}: {on_replica}/{reads} reads on replicas"

    def backends(report: dict[str, Any]) -> set[tuple[int, int]]:
        return {(c[f"{p}port"], c[f"{p}backend"]) for c in report["cycles"] for p in ("echo_", "")}

    parents = set().union(*(backends(r) for n, r in reports.items() if n.startswith("parent")))
    for name in forked:
        shared = backends(reports[name]) & parents
        assert not shared, f"{name} used the parent's connections (port, backend): {shared}"


def summary(reports: dict[str, dict[str, Any]]) -> str:
    parts = []
    for name, report in reports.items():
        echo, reads = replica_share(report["cycles"])
        readback, _ = replica_share(report["cycles"], "on_replica")
        parts.append(f"{name}: {reads} cycles, on replicas {echo} echo, {readback} read-back")
    return "; ".join(parts)


# --------------------------------------------------------------------------- children


def run_child(write_fd: int, body: Callable[[], dict[str, Any]]) -> NoReturn:
    """In a forked child: run ``body``, write its report (JSON) to ``write_fd`` and
    ``os._exit``: 0 when the report has no problem, 1 otherwise (2 on an exception)."""
    code = 2
    try:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # not pytest-timeout's handler
        signal.alarm(CHILD_ALARM)
        report: dict[str, Any]
        try:
            report = body()
        except BaseException as exc:
            report = {"exception": repr(exc)}
        else:
            code = 0 if not report["problems"] else 1
        data = json.dumps(report).encode()
        while data:
            data = data[os.write(write_fd, data) :]
        os.close(write_fd)
    finally:
        os._exit(code)


def fork_children(body: Callable[[int], dict[str, Any]]) -> dict[int, int]:
    """Fork :data:`CHILDREN` children running ``body(index)``: {pid: read end of its pipe}."""
    children = {}
    for index in range(CHILDREN):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            run_child(write_fd, lambda index=index: body(index))
        os.close(write_fd)
        children[pid] = read_fd
    return children


def collect_children(children: dict[int, int], deadline: float) -> dict[int, tuple[Any, Any]]:
    """Read every child's report and exit status until ``deadline``; a child still
    running then is killed. Returns {pid: (exit status, report or raw output)}."""
    output = {fd: bytearray() for fd in children.values()}
    open_fds = set(output)
    statuses: dict[int, Any] = {}
    while (open_fds or len(statuses) < len(children)) and time.monotonic() < deadline:
        if open_fds:
            ready, _, _ = select.select(list(open_fds), [], [], 0.05)
            for fd in ready:
                chunk = os.read(fd, 1 << 16)
                if chunk:
                    output[fd] += chunk
                else:
                    open_fds.discard(fd)
        else:
            time.sleep(0.02)
        for pid in children:
            if pid not in statuses:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    statuses[pid] = os.waitstatus_to_exitcode(status)
    for pid in children:
        if pid not in statuses:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            statuses[pid] = "killed: still running at the deadline"
    for fd in output:
        os.close(fd)
    results = {}
    for pid, fd in children.items():
        try:
            report: Any = json.loads(bytes(output[fd]))
        except ValueError:
            report = bytes(output[fd][:2000]).decode(errors="replace")
        results[pid] = (statuses[pid], report)
    return results


def children_reports(
    results: dict[int, tuple[Any, Any]], failures: list[str]
) -> dict[str, dict[str, Any]]:
    """The children's reports, by name; a child that did not exit 0 adds a failure."""
    reports = {}
    for pid, (status, report) in results.items():
        if status == 0:
            reports[f"child {pid}"] = report
            continue
        if isinstance(report, dict):
            report = report.get("problems") or report.get("exception") or report
        failures.append(f"child {pid} exit status {status}:\n{json.dumps(report, indent=1)}")
    return reports


def in_thread(target: Callable[[], Any], timeout: float, what: str) -> Any:
    """``target()`` in a daemon thread, waited for at most ``timeout`` seconds (a
    balancer broken by the fork may block on a socket forever)."""
    result: dict[str, Any] = {}

    def main() -> None:
        try:
            result["value"] = target()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=main, name=f"fork-test-{what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"{what} did not finish within {timeout}s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def attempt(failures: list[str], target: Callable[[], Any], timeout: float, what: str) -> Any:
    """:func:`in_thread`; a failure is added to ``failures`` (the test goes on to
    collect the other processes' results) and gives None."""
    try:
        return in_thread(target, timeout, what)
    except Exception as exc:
        failures.append(f"{what}: {exc!r}")
        return None


@contextlib.contextmanager
def closed_at_end(close: Callable[[], Any], what: str) -> Iterator[None]:
    """Call ``close`` at the end, in a bounded wait; when the block failed, a failure
    to close does not hide the block's."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(BaseException):
            in_thread(close, 15, what)
        raise
    in_thread(close, 15, what)


def with_problems(report: dict[str, Any], cluster: LocalCluster) -> dict[str, Any]:
    """``report`` with the list of its problems (and the replica majority) under
    ``problems``: what decides a child's exit status."""
    primary_port, replica_ports = ports(cluster)
    problems = report_problems(report, primary_port, replica_ports)
    on_replica, reads = replica_share(report["cycles"][1:])
    if not (reads and on_replica * 2 > reads):
        problems.append(f"{on_replica}/{reads} reads after the first on replicas")
    return {**report, "problems": problems}


# --------------------------------------------------------------------------- os.fork


def test_os_fork_children_and_parent_share_an_open_balancer(fork_table: LocalCluster) -> None:
    cluster = fork_table
    lb = pgreplica.LoadBalancer(**dsns(cluster))
    failures: list[str] = []
    with closed_at_end(lb.close, "lb.close()"):
        lb.open()
        warm = run_cycles(lb, "parent-warm", 20, time.monotonic() + RUN_LIMIT)
        deadline = time.monotonic() + RUN_LIMIT

        def child(index: int) -> dict[str, Any]:
            report = run_cycles(lb, f"child{index}", ITERATIONS, deadline)
            lb.close()  # the child's own pools; nothing of the parent's
            return with_problems(report, cluster)

        children = fork_children(child)
        try:
            parent = attempt(
                failures,
                lambda: run_cycles(lb, "parent", ITERATIONS, deadline),
                RUN_LIMIT + 5,
                "the parent's cycles",
            )
        finally:
            results = collect_children(children, deadline + 5)
        reports = {"parent-warm": warm, "parent": parent, **children_reports(results, failures)}
        # The parent's connections survived the children, their use and their close().
        reports["parent-after"] = attempt(
            failures,
            lambda: run_cycles(lb, "parent-after", 50, time.monotonic() + RUN_LIMIT),
            RUN_LIMIT + 5,
            "the parent's cycles after the children",
        )
    assert not failures, "\n\n".join(failures)
    check_reports(reports, cluster, forked=[n for n in reports if n.startswith("child")])
    print("os.fork:", summary(reports))


# --------------------------------------------------------------------------- multiprocessing

#: The balancer of the multiprocessing test, module-level as in an application: the
#: pool's workers inherit it, opened, from the parent.
POOL_LB: pgreplica.LoadBalancer | None = None
POOL_BATCHES = 12


def pool_batch(batch: int, deadline: float) -> dict[str, Any]:
    """A task of the multiprocessing pool: cycles on the inherited :data:`POOL_LB`."""
    assert POOL_LB is not None
    return run_cycles(POOL_LB, f"pool-batch{batch}", ITERATIONS // 4, deadline)


def test_multiprocessing_fork_pool_uses_a_balancer_opened_in_the_parent(
    fork_table: LocalCluster,
) -> None:
    global POOL_LB
    cluster = fork_table
    POOL_LB = lb = pgreplica.LoadBalancer(**dsns(cluster))
    context = multiprocessing.get_context("fork")
    failures: list[str] = []
    batches: list[dict[str, Any]] = []
    try:
        with closed_at_end(lb.close, "lb.close()"):
            lb.open()
            warm = run_cycles(lb, "parent-warm", 20, time.monotonic() + RUN_LIMIT)
            deadline = time.monotonic() + RUN_LIMIT
            pool = context.Pool(CHILDREN)
            try:
                pending = [pool.apply_async(pool_batch, (b, deadline)) for b in range(POOL_BATCHES)]
                parent = attempt(
                    failures,
                    lambda: run_cycles(lb, "parent", ITERATIONS, deadline),
                    RUN_LIMIT + 5,
                    "the parent's cycles",
                )
                collect_by = deadline + 5
                for b, result in enumerate(pending):
                    try:
                        batches.append(result.get(max(collect_by - time.monotonic(), 0.01)))
                    except multiprocessing.TimeoutError:
                        failures.append(f"the pool's batch {b} did not finish in time")
                if len(batches) == POOL_BATCHES:
                    pool.close()
                    # Workers exit once idle; a non-daemon thread left in them blocks this.
                    attempt(failures, pool.join, 15, "the exit of the pool's workers")
            finally:
                pool.terminate()
            after = attempt(
                failures,
                lambda: run_cycles(lb, "parent-after", 50, time.monotonic() + RUN_LIMIT),
                RUN_LIMIT + 5,
                "the parent's cycles after the pool",
            )
    finally:
        POOL_LB = None
    # One report per worker process, made of its batches.
    workers: dict[str, dict[str, Any]] = {}
    for batch in batches:
        name = f"worker {batch['pid']}"
        merged = workers.setdefault(
            name, {"tag": name, "pid": batch["pid"], "planned": 0, "cycles": []}
        )
        merged["planned"] += batch["planned"]
        merged["cycles"] += batch["cycles"]
    reports = {"parent-warm": warm, "parent": parent, "parent-after": after, **workers}
    if failures:  # with whatever the workers reported
        for name, report in workers.items():
            failures.extend(f"{name}: {p}" for p in report_problems(report, *ports(cluster)))
    assert not failures, "\n\n".join(failures)
    assert len(workers) >= 2, f"the batches ran in {sorted(workers)} only"
    check_reports(reports, cluster, forked=list(workers))
    print("multiprocessing:", summary(reports))


# --------------------------------------------------------------------------- asyncio


async def wait_event(event: threading.Event, deadline: float, what: str) -> None:
    while not event.is_set():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited too long for {what}")
        await asyncio.sleep(0.01)


def test_async_balancer_opened_before_fork_runs_in_a_fresh_event_loop(
    fork_table: LocalCluster,
) -> None:
    """The parent's event loop runs in a thread, with the balancer open in it, while the
    main thread forks; each child runs its own ``asyncio.run`` on the same object."""
    cluster = fork_table
    alb = pgreplica.AsyncLoadBalancer(**dsns(cluster))
    ready, forked, children_done = threading.Event(), threading.Event(), threading.Event()
    parent: dict[str, Any] = {}
    deadline = time.monotonic() + RUN_LIMIT + 5

    async def parent_main() -> None:
        try:
            await alb.open()
            parent["parent-warm"] = await arun_cycles(alb, "parent-warm", 20, deadline)
            ready.set()
            await wait_event(forked, deadline, "the forks")
            parent["parent"] = await arun_cycles(alb, "parent", ITERATIONS, deadline)
            await wait_event(children_done, deadline + 10, "the children")
            after_deadline = time.monotonic() + RUN_LIMIT
            parent["parent-after"] = await arun_cycles(alb, "parent-after", 50, after_deadline)
        except BaseException as exc:
            parent["error"] = repr(exc)
            raise
        finally:
            ready.set()
            await asyncio.wait_for(alb.close(), 15)

    def child(index: int) -> dict[str, Any]:
        async def main() -> dict[str, Any]:
            # Two tasks at once, as an asyncio application would run them.
            first, second = await asyncio.gather(
                arun_cycles(alb, f"child{index}-a", ITERATIONS // 2, deadline),
                arun_cycles(alb, f"child{index}-b", ITERATIONS // 2, deadline),
            )
            await alb.close()  # the child's own pools; nothing of the parent's
            return {
                "tag": f"child{index}",
                "pid": os.getpid(),
                "planned": first["planned"] + second["planned"],
                "cycles": first["cycles"] + second["cycles"],
            }

        return with_problems(asyncio.run(main()), cluster)

    def run_parent() -> None:
        with contextlib.suppress(BaseException):  # recorded in parent["error"]
            asyncio.run(parent_main())

    runner = threading.Thread(target=run_parent, name="fork-test-parent-loop", daemon=True)
    runner.start()
    assert ready.wait(RUN_LIMIT), "the parent's event loop did not open the balancer"
    assert "error" not in parent, parent["error"]
    children = {}
    try:
        children = fork_children(child)
    finally:
        forked.set()
        results = collect_children(children, deadline + 5)
        children_done.set()
        runner.join(15)
    failures: list[str] = []
    if runner.is_alive():
        failures.append("the parent's event loop did not finish in time")
    if "error" in parent:
        failures.append(f"the parent's event loop failed: {parent['error']}")
    reports = children_reports(results, failures)
    assert not failures, "\n\n".join(failures)
    reports.update({name: parent[name] for name in ("parent-warm", "parent", "parent-after")})
    check_reports(reports, cluster, forked=[n for n in reports if n.startswith("child")])
    print("asyncio:", summary(reports))


# --------------------------------------------------------------------------- servers


class Server:
    """A subprocess (gunicorn, celery) in its own process group, output in a log file."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                command,
                cwd=TESTS,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: its children are ours to end
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, chars: int = 6000) -> str:
        return f"--- {self.log.name} (tail) ---\n{self.text()[-chars:]}"

    def wait_for(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"{what} (exit code {self.process.poll()})\n{self.tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=8)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # workers left behind, if any


@contextlib.contextmanager
def running(request: pytest.FixtureRequest, server: Server) -> Iterator[Server]:
    """Stop ``server`` at the end; print its output if the test failed."""
    failed_before = request.session.testsfailed
    try:
        yield server
    finally:
        server.stop()
        if request.session.testsfailed > failed_before:
            print(server.tail())


def subprocess_env(cluster: LocalCluster, **extra: str) -> dict[str, str]:
    # Not the settings of the Django tests (they set DJANGO_SETTINGS_MODULE for the
    # session): Celery's Django fix-up would try to load that project in the worker.
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env.update(
        PGREPLICA_FORK_PRIMARY=cluster.primary_dsn,
        PGREPLICA_FORK_REPLICAS=json.dumps(cluster.replica_dsns),
        PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")])),
        **extra,
    )
    return env


def check_answers(
    answers: list[tuple[str, dict[str, Any]]], cluster: LocalCluster, server: Server
) -> str:
    """Each answer (nonce sent, facts) its own and clean; a majority of the reads on
    replicas. Returns a summary."""
    problems = [
        p for nonce, facts in answers for p in cycle_problems(facts, nonce, *ports(cluster))
    ]
    assert not problems, "\n".join(problems[:20]) + f"\n({len(problems)} problems)\n{server.tail()}"
    cycles = [facts for _, facts in answers]
    echo, reads = replica_share(cycles)
    readback, _ = replica_share(cycles, "on_replica")
    assert echo + readback > reads, (
        f"reads on replicas: {echo}/{reads} echo, {readback}/{reads} read-back\n{server.tail()}"
    )
    pids = Counter(facts["pid"] for facts in cycles)
    return f"{reads} cycles by {dict(pids)}; on replicas: {echo} echo, {readback} read-back"


# --------------------------------------------------------------------------- gunicorn

REQUESTS = 200


def get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def http_ready(url: str) -> bool:
    try:
        get_json(url, timeout=1.0)
    except OSError:
        return False
    return True


@pytest.fixture(params=["sync", "gthread"])
def gunicorn(
    request: pytest.FixtureRequest, fork_table: LocalCluster, tmp_path: Path
) -> Iterator[tuple[str, Server]]:
    """gunicorn serving tests/fork_wsgi_app.py with ``--preload -w 3``: (URL, server)."""
    try:
        import gunicorn  # noqa: F401
    except ImportError as exc:
        reason = f"gunicorn cannot be imported ({exc}): gunicorn tests skipped"
        print(reason)
        pytest.skip(reason)
    binary = Path(sys.executable).with_name("gunicorn")
    if not os.access(binary, os.X_OK):
        reason = f"no gunicorn executable next to {sys.executable}: gunicorn tests skipped"
        print(reason)
        pytest.skip(reason)
    worker_class = request.param
    port = free_port()
    command = [
        str(binary), "fork_wsgi_app:app", "--preload", "-w", str(CHILDREN),
        "-k", worker_class, "-b", f"127.0.0.1:{port}",
        "--graceful-timeout", "5", "--timeout", "30", "--log-level", "info",
    ]  # fmt: skip
    if worker_class == "gthread":
        command += ["--threads", "4"]
    log = tmp_path / f"gunicorn-{worker_class}.log"
    with running(request, Server(command, subprocess_env(fork_table), log)) as server:
        url = f"http://127.0.0.1:{port}"
        server.wait_for(lambda: http_ready(f"{url}/ping"), 30, "gunicorn did not answer")
        server.wait_for(
            lambda: server.text().count("Booting worker") >= CHILDREN,
            30,
            "gunicorn did not boot its workers",
        )
        yield url, server


def test_gunicorn_preload_workers_use_the_masters_open_balancer(
    gunicorn: tuple[str, Server], fork_table: LocalCluster
) -> None:
    url, server = gunicorn

    failures: list[str] = []

    def one(i: int) -> tuple[str, dict[str, Any]]:
        nonce = new_nonce("http", i)
        if len(failures) >= MAX_FAILED:  # no need to wait for more
            return nonce, {"error": f"not sent: {MAX_FAILED} requests failed already"}
        try:
            facts = get_json(f"{url}/cycle?nonce={nonce}")
        except Exception as exc:
            facts = {"error": f"request failed: {exc!r}"}
        if facts.get("error") or facts.get("nonce") != nonce:
            failures.append(nonce)
        return nonce, facts

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(REQUESTS)]
        _, not_done = wait_futures(futures, timeout=60)
        for future in not_done:
            future.cancel()
    assert not not_done, f"{len(not_done)} requests unanswered\n{server.tail()}"
    answers = [future.result() for future in futures]
    figures = check_answers(answers, fork_table, server)
    pids = {facts["pid"] for _, facts in answers}
    assert len(pids) >= 2, f"every request went to one worker: {pids}\n{server.tail()}"
    print("gunicorn:", figures)


# --------------------------------------------------------------------------- celery

TASKS = 30


@pytest.fixture
def celery_worker(
    request: pytest.FixtureRequest, fork_table: LocalCluster, redis_server: str, tmp_path: Path
) -> Iterator[tuple[str, Server]]:
    """A prefork worker (2 processes) of tests/fork_celery_app.py on its own queue."""
    pytest.importorskip("celery")
    queue = f"pgreplica-fork-{uuid.uuid4().hex[:10]}"
    command = [
        sys.executable, "-m", "celery", "-A", "fork_celery_app", "worker",
        "--pool=prefork", "--concurrency=2", "-Q", queue, "-n", f"{queue}@%h", "-l", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    env = subprocess_env(fork_table, PGREPLICA_TEST_BROKER=redis_server)
    with running(request, Server(command, env, tmp_path / "celery.log")) as server:
        server.wait_for(lambda: " ready." in server.text(), 30, "celery worker did not start")
        yield queue, server


def test_celery_prefork_children_use_the_main_processs_open_balancer(
    celery_worker: tuple[str, Server], fork_table: LocalCluster, redis_server: str
) -> None:
    import celery

    queue, server = celery_worker
    app = celery.Celery("fork_publisher", broker=redis_server, backend=redis_server)
    sent: list[tuple[str, Any]] = []
    try:
        for i in range(TASKS):
            nonce = new_nonce("celery", i)
            sent.append((nonce, app.send_task("fork_celery_app.write_read", [nonce], queue=queue)))
        deadline = time.monotonic() + 30
        answers: list[tuple[str, dict[str, Any]]] = []
        failures = 0
        for nonce, result in sent:
            if failures >= MAX_FAILED:  # no need to wait for more
                facts = {"error": f"not waited for: {MAX_FAILED} tasks failed already"}
            else:
                try:
                    facts = result.get(timeout=max(deadline - time.monotonic(), 0.1))
                except Exception as exc:
                    facts = {"error": f"task failed: {exc!r}"}
                failures += bool(facts.get("error")) or facts.get("nonce") != nonce
            answers.append((nonce, facts))
    finally:
        for _, result in sent:  # unsubscribe now, not in __del__ at interpreter exit
            with contextlib.suppress(Exception):
                result.backend.remove_pending_result(result)
        app.close()
    figures = check_answers(answers, fork_table, server)
    pids = {facts["pid"] for _, facts in answers}
    assert len(pids) == 2, f"expected both pool processes to run tasks: {pids}\n{server.tail()}"
    print("celery prefork:", figures)
