"""SQLAlchemy 2 routing sessions on the real cluster: which host each transaction runs
on (``inet_server_port()``), read-your-writes under replay delay against a control that
is stale, no transaction split across hosts, failures and refusals retried, logical
databases, the kill switch, and the asyncio session."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import pgreplica
from pgreplica.testing import LocalCluster

sqlalchemy = pytest.importorskip("sqlalchemy", reason="SQLAlchemy is not installed (.[dev])")
pytest.importorskip("greenlet", reason="greenlet is not installed (sqlalchemy[asyncio])")

from sqlalchemy import String, create_engine, func, select, text, update  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker  # noqa: E402

from pgreplica.contrib.sqlalchemy import AsyncRoutingSession, RoutingSession  # noqa: E402

SCHEMA = """
CREATE TABLE IF NOT EXISTS sa_items (id serial PRIMARY KEY, title text NOT NULL);
CREATE TABLE IF NOT EXISTS sa_builds (id serial PRIMARY KEY, title text NOT NULL);
CREATE SEQUENCE IF NOT EXISTS sa_seq;
CREATE OR REPLACE FUNCTION sa_add(t text) RETURNS int LANGUAGE sql VOLATILE
AS 'INSERT INTO sa_items (title) VALUES (t) RETURNING id';
CREATE OR REPLACE FUNCTION sa_notice() RETURNS int LANGUAGE plpgsql STABLE
AS $$ BEGIN RAISE NOTICE 'sa-notice'; RETURN 1; END $$;
CREATE OR REPLACE FUNCTION sa_stable_next() RETURNS bigint LANGUAGE sql STABLE
AS 'SELECT nextval(''sa_seq'')';
"""


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "sa_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String)


class Build(Base):
    __tablename__ = "sa_builds"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String)


@pytest.fixture(scope="module")
def schema(cluster: LocalCluster) -> None:
    cluster.execute(0, SCHEMA)
    cluster.wait_replayed()


def ports(cluster: LocalCluster) -> dict[int, str]:
    return {cluster.port(i): ("primary" if i == 0 else f"replica{i}") for i in range(3)}


@pytest.fixture
def lb(healthy_cluster: LocalCluster, schema: None) -> Iterator[pgreplica.LoadBalancer]:
    with pgreplica.LoadBalancer(config=healthy_cluster.config()) as balancer, balancer.isolated():
        yield balancer


def server(session: Any, cluster: LocalCluster) -> str:
    """Where the session's current transaction runs (a Core select: routed as a read)."""
    return ports(cluster)[session.execute(select(func.inet_server_port())).scalar_one()]


def lag(cluster: LocalCluster, delay: str | int) -> None:
    cluster.lag(1, delay)
    cluster.lag(2, delay)


def test_reads_go_to_replicas_and_writes_to_the_primary(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    Session = sessionmaker(class_=RoutingSession, lb=lb)
    seen = set()
    for _ in range(6):
        with Session() as session:
            seen.add(server(session, healthy_cluster))
    assert seen == {"replica1", "replica2"}, seen
    with Session() as session:
        session.add(Item(title="w"))
        session.flush()
        assert server(session, healthy_cluster) == "primary"
        session.commit()
    with Session() as session:  # locks go to the primary
        session.execute(select(Item).limit(1).with_for_update()).all()
        assert server(session, healthy_cluster) == "primary"
    with Session() as session:  # textual statements are classified
        session.execute(text("UPDATE sa_items SET title = title WHERE id < 0"))
        assert server(session, healthy_cluster) == "primary"
    healthy_cluster.wait_replayed()  # the token of the write above: replicas have it
    with Session() as session:
        session.execute(text("SELECT count(*) FROM sa_items")).scalar_one()
        assert server(session, healthy_cluster) != "primary"


def test_read_your_writes_under_lag_and_a_stale_control(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    Session = sessionmaker(class_=RoutingSession, lb=lb)
    replica = create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(healthy_cluster.dsn(1))
    )
    stale, control_stale, served = 0, 0, []
    lag(healthy_cluster, "300ms")
    try:
        for i in range(10):
            title = f"ryw-{uuid.uuid4().hex[:8]}-{i}"
            with Session() as session:
                item = Item(title=title)
                session.add(item)
                session.commit()
                item_id = item.id
            with sessionmaker(replica)() as plain:  # the control: no token
                control_stale += plain.get(Item, item_id) is None
            with Session() as session:  # the next unit of work of the same context
                found = session.get(Item, item_id)
                stale += found is None or found.title != title
                served.append(server(session, healthy_cluster))
    finally:
        lag(healthy_cluster, 0)
        replica.dispose()
    assert stale == 0
    assert control_stale >= 7, control_stale  # the lag is real
    assert set(served) <= {"primary", "replica1", "replica2"}


def test_the_token_lets_caught_up_replicas_serve_the_next_reads(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    Session = sessionmaker(class_=RoutingSession, lb=lb)
    with Session() as session:
        session.add(Item(title="caught-up"))
        session.commit()
    assert lb.token().get("main") > 0
    healthy_cluster.wait_replayed()
    with Session() as session:
        assert server(session, healthy_cluster) in ("replica1", "replica2")


def test_a_transaction_is_never_split_across_hosts(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    """Reads on a replica, then a write: the replica's transaction is ended before the
    primary's begins, and every statement from the write on runs on the primary, in
    one transaction."""
    Session = sessionmaker(class_=RoutingSession, lb=lb)
    with Session() as session:
        item = session.execute(select(Item).limit(1)).scalar_one()
        where = server(session, healthy_cluster)
        replica_pid = session.execute(select(func.pg_backend_pid())).scalar_one()
        assert where.startswith("replica")
        item.title = "changed"
        session.flush()  # the write
        primary_xid = session.execute(text("SELECT pg_current_xact_id()::text")).scalar_one()
        assert server(session, healthy_cluster) == "primary"
        assert session.execute(select(func.pg_current_xact_id())).scalar_one() is not None
        index = int(where[-1])
        rows = healthy_cluster.execute(
            index, f"SELECT state FROM pg_stat_activity WHERE pid = {replica_pid}"
        )
        assert rows == [("idle",)], rows  # not "idle in transaction"
        again = session.execute(text("SELECT pg_current_xact_id()::text")).scalar_one()
        assert again == primary_xid  # one transaction on the primary
        session.commit()


def test_a_replica_that_refuses_is_retried_on_the_primary(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    """A function declared STABLE that writes (nextval): read-routed, refused by the
    standby (25006), run once more on the primary."""
    Session = sessionmaker(class_=RoutingSession, lb=lb)
    before = healthy_cluster.execute(0, "SELECT last_value FROM sa_seq")[0][0]
    with Session() as session:
        value = session.execute(select(func.sa_stable_next())).scalar_one()
        assert server(session, healthy_cluster) == "primary"
        session.commit()
    assert value > before or (before == 1 and value == 1)


def test_a_killed_replica_gives_no_error(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    Session = sessionmaker(class_=RoutingSession, lb=lb)
    errors: list[BaseException] = []
    served: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        with lb.isolated():
            while not stop.is_set():
                try:
                    with Session() as session:
                        session.execute(select(func.count()).select_from(Item)).scalar_one()
                        served.append(server(session, healthy_cluster))
                except BaseException as exc:
                    errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    healthy_cluster.kill(1)
    time.sleep(1.5)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == [], "".join(__import__("traceback").format_exception(errors[0]))
    assert served.count("replica2") > 0 and len(served) > 20


def test_a_hung_replica_gives_no_error(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    """A replica that stops answering (SIGSTOP): reads in flight there are cut off when
    the prober marks it down, and run once more on another host."""
    Session = sessionmaker(class_=RoutingSession, lb=lb)
    healthy_cluster.freeze(1)
    try:
        worst = 0.0
        for _ in range(12):
            started = time.monotonic()
            with Session() as session:
                session.execute(select(func.count()).select_from(Item)).scalar_one()
                assert server(session, healthy_cluster) in ("replica2", "primary")
            worst = max(worst, time.monotonic() - started)
    finally:
        healthy_cluster.thaw(1)
    print(f"worst read with a hung replica: {worst:.3f} s")


def test_primary_scope_logical_databases_and_the_kill_switch(
    healthy_cluster: LocalCluster, schema: None
) -> None:
    from conftest import two_databases

    with pgreplica.LoadBalancer(config=two_databases(healthy_cluster)) as lb, lb.isolated():
        Session = sessionmaker(class_=RoutingSession, lb=lb, databases={"ci": [Build]})
        with Session() as session:  # Item: main reads replica 1; Build: ci reads replica 2
            session.execute(select(Item).limit(1)).all()
            session.execute(select(Build).limit(1)).all()
            assert {u: s.host.label for u, s in session._pg_units.items()} == {
                None: lb._router.route("main").replicas[0].label,
                "ci": lb._router.route("ci").replicas[0].label,
            }
        with lb.primary(), Session() as session:
            assert server(session, healthy_cluster) == "primary"
        with Session(primary=True) as session:
            assert server(session, healthy_cluster) == "primary"
        with pytest.raises(pgreplica.ConfigError):
            RoutingSession(lb=lb, databases={"nope": ["x"]})
    off = {**healthy_cluster.config(), "enabled": False}
    with (
        pgreplica.LoadBalancer(config=off) as lb,
        lb.isolated(),
        sessionmaker(class_=RoutingSession, lb=lb)() as session,
    ):
        assert server(session, healthy_cluster) == "primary"


def test_writes_fail_fast_when_the_primary_is_down(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    Session = sessionmaker(class_=RoutingSession, lb=lb)
    healthy_cluster.kill(0)
    from pgreplica.workload import wait_until

    wait_until(lambda: not lb._router.route(None).primary.up, timeout=15, what="primary down")
    started = time.monotonic()
    with Session() as session, pytest.raises(sqlalchemy.exc.OperationalError) as raised:
        session.add(Item(title="lost"))
        session.commit()
    assert isinstance(raised.value.orig, pgreplica.PrimaryUnavailable)  # as SQLAlchemy wraps
    assert time.monotonic() - started < 5
    with Session() as session:  # reads still work on the replicas
        assert server(session, healthy_cluster).startswith("replica")


def test_the_asyncio_session(healthy_cluster: LocalCluster, schema: None) -> None:
    from sqlalchemy.ext.asyncio import async_sessionmaker

    async def scenario() -> dict[str, Any]:
        async with pgreplica.AsyncLoadBalancer(config=healthy_cluster.config()) as alb:
            Session = async_sessionmaker(class_=AsyncRoutingSession, lb=alb)

            async def where(session: Any) -> str:
                port = (await session.execute(select(func.inet_server_port()))).scalar_one()
                return ports(healthy_cluster)[port]

            async with Session() as session:
                first = await where(session)
            stale = 0
            lag(healthy_cluster, "300ms")
            try:
                for i in range(5):
                    title = f"async-{i}"
                    async with Session() as session:
                        item = Item(title=title)
                        session.add(item)
                        await session.flush()
                        item_id = item.id
                        await session.commit()
                    async with Session() as session:
                        found = await session.get(Item, item_id)
                        stale += found is None
                    async with Session() as session:
                        await session.execute(
                            update(Item).where(Item.id == item_id).values(title="x")
                        )
                        wrote_on = await where(session)
                        await session.commit()
            finally:
                lag(healthy_cluster, 0)
            return {"first": first, "stale": stale, "wrote_on": wrote_on}

    outcome = asyncio.run(scenario())
    assert outcome["first"].startswith("replica")
    assert outcome["stale"] == 0
    assert outcome["wrote_on"] == "primary"


def test_bad_balancers_are_named() -> None:
    from sqlalchemy.ext.asyncio import AsyncSession

    with pytest.raises(TypeError, match="lb=LoadBalancer or AsyncLoadBalancer, got str"):
        RoutingSession(lb="postgresql://x")  # type: ignore[arg-type]
    with pgreplica.LoadBalancer(config={"databases": {"main": {"primary": "host=h"}}}) as lb:
        with pytest.raises(TypeError, match="needs lb=AsyncLoadBalancer, got LoadBalancer"):
            AsyncRoutingSession(lb=lb)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="table name or a mapped class"):
            RoutingSession(lb=lb, databases={"main": [42]})
    assert issubclass(AsyncRoutingSession, AsyncSession)


def _forked_worker(lb: pgreplica.LoadBalancer, port_roles: dict[int, str], out: Any) -> None:
    """In a forked child: write, then read the write back, through sessions whose
    engines the parent made before the fork."""
    Session = sessionmaker(class_=RoutingSession, lb=lb, expire_on_commit=False)
    try:
        with lb.isolated():
            results = []
            for i in range(5):
                with Session() as session:
                    item = Item(title=f"forked-{i}")
                    session.add(item)
                    session.commit()
                with Session() as session:
                    found = session.get(Item, item.id)
                    port = session.execute(select(func.inet_server_port())).scalar_one()
                    results.append((found is not None, port_roles[port]))
        out.put(results)
    except BaseException as exc:  # reported to the parent, which fails the test
        out.put(repr(exc))


def test_sessions_keep_working_in_forked_workers(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    """A pre-forking server: the parent used the sessions (engines made, pools open),
    then forks; each child writes and reads its writes, under lag."""
    import multiprocessing

    Session = sessionmaker(class_=RoutingSession, lb=lb)
    with Session() as session:
        server(session, healthy_cluster)
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    lag(healthy_cluster, "300ms")
    try:
        workers = [
            context.Process(target=_forked_worker, args=(lb, ports(healthy_cluster), out))
            for _ in range(2)
        ]
        for worker in workers:
            worker.start()
        results = [out.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join(timeout=30)
    finally:
        lag(healthy_cluster, 0)
        out.close()
        out.join_thread()
    for result in results:
        assert isinstance(result, list), result
        assert all(found for found, _ in result), result
    assert [w.exitcode for w in workers] == [0, 0]
    with Session() as session:  # and the parent still works
        assert server(session, healthy_cluster) in ("primary", "replica1", "replica2")


def test_concurrent_commits_never_wait_for_a_second_primary_connection(
    healthy_cluster: LocalCluster, schema: None
) -> None:
    """More sessions commit at once than the primary's pool holds: each reads the
    position after its commit on its own connection, so none waits for another."""
    from sqlalchemy.ext.asyncio import async_sessionmaker

    config = {**healthy_cluster.config(), "pool_max_size": 2}
    with pgreplica.LoadBalancer(config=config) as lb:
        Session = sessionmaker(class_=RoutingSession, lb=lb)
        barrier = threading.Barrier(2)  # both hold one of the pool's two connections
        errors: list[BaseException] = []
        tokens: list[int] = []

        def writer() -> None:
            try:
                with lb.isolated(), Session() as session:
                    session.add(Item(title="concurrent"))
                    session.flush()
                    barrier.wait(timeout=10)
                    session.commit()
                    tokens.append(lb.token().get("main"))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert errors == [], errors
        assert len(tokens) == 2 and all(t > 0 for t in tokens)

    async def scenario() -> list[Any]:
        async with pgreplica.AsyncLoadBalancer(config=config) as alb:
            Session = async_sessionmaker(class_=AsyncRoutingSession, lb=alb)

            async def one() -> int:
                with alb.isolated():
                    async with Session() as session:
                        session.add(Item(title="concurrent-async"))
                        await session.commit()
                    return alb.token().get("main")

            return await asyncio.gather(*(one() for _ in range(6)), return_exceptions=True)

    results = asyncio.run(scenario())
    assert all(isinstance(r, int) and r > 0 for r in results), results


def test_a_pooled_connection_does_not_collect_sqlalchemy_hooks(
    healthy_cluster: LocalCluster, schema: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Each session checks a connection out of the balancer's pool, which SQLAlchemy
    sees as a new connection: its per-connection hooks (a notice handler) must not
    pile up on the pooled connection (a notice was logged once per earlier use)."""
    config = {**healthy_cluster.config(), "pool_max_size": 1}
    notices = logging.getLogger("sqlalchemy.dialects.postgresql")
    disabled, notices.disabled = notices.disabled, False  # dictConfig elsewhere may disable it
    with pgreplica.LoadBalancer(config=config) as lb, lb.isolated():
        Session = sessionmaker(class_=RoutingSession, lb=lb)
        for _ in range(20):
            with Session() as session:
                session.execute(select(func.count()).select_from(Item)).scalar_one()
        with (
            caplog.at_level(logging.INFO, logger="sqlalchemy.dialects.postgresql"),
            Session() as session,
        ):
            session.execute(select(func.sa_notice())).scalar_one()
    notices.disabled = disabled
    assert caplog.text.count("sa-notice") == 1, caplog.text[-500:]


def test_savepoints_after_a_replica_read_and_their_token(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    """A savepoint opened after reads on a replica: its write goes to the primary and
    is released there; releasing it records no position (the transaction has not
    committed), the outer commit does."""
    Session = sessionmaker(class_=RoutingSession, lb=lb)
    with Session() as session:
        assert server(session, healthy_cluster).startswith("replica")
        with session.begin_nested():
            session.add(Item(title="nested"))
        assert not lb.token()  # released, not committed
        nested = session.begin_nested()
        session.add(Item(title="rolled back"))
        session.flush()
        nested.rollback()
        session.commit()
    token = lb.token().get("main")
    assert 0 < token < pgreplica.parse_lsn("FFFFFFFF/0")
    rows = healthy_cluster.execute(
        0,
        "SELECT count(*) FILTER (WHERE title = 'nested'), count(*) FILTER"
        " (WHERE title = 'rolled back') FROM sa_items",
    )
    assert rows[0][0] >= 1 and rows[0][1] == 0


def test_a_refused_write_retried_on_the_primary_advances_the_token(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    """select(volatile_function()) is routed as a read; the standby refuses it (25006);
    it runs again on the primary, where it writes: the commit must advance the token."""
    Session = sessionmaker(class_=RoutingSession, lb=lb)
    stale = 0
    lag(healthy_cluster, "300ms")
    try:
        for i in range(5):
            with lb.isolated():
                with Session() as session:
                    new_id = session.execute(select(func.sa_add(f"refused-{i}"))).scalar_one()
                    session.commit()
                assert lb.token().get("main") > 0
                with Session() as session:
                    stale += session.get(Item, new_id) is None
    finally:
        lag(healthy_cluster, 0)
    assert stale == 0


def test_text_reads_with_bound_parameters_go_to_replicas(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    Session = sessionmaker(class_=RoutingSession, lb=lb)
    with Session() as session:
        port = session.execute(
            text("SELECT inet_server_port() FROM sa_items WHERE id > :i LIMIT 1"), {"i": 0}
        ).scalar_one()
        assert ports(healthy_cluster)[port].startswith("replica")
        cast = session.execute(text("SELECT CAST(:v AS int) + 1"), {"v": "41"}).scalar_one()
        assert cast == 42


def test_a_second_database_sharing_the_held_primary_takes_no_second_connection(
    healthy_cluster: LocalCluster, schema: None
) -> None:
    """main wrote (the transaction holds the primary's only pooled connection); a read
    of ci, whose replica is behind, falls back to that same primary connection."""
    from conftest import two_databases

    config = two_databases(healthy_cluster, pool_max_size=1)
    with pgreplica.LoadBalancer(config=config) as lb, lb.isolated():
        Session = sessionmaker(class_=RoutingSession, lb=lb, databases={"ci": [Build]})
        healthy_cluster.lag(2, "300ms")
        try:
            with Session() as session:
                session.add(Item(title="x"))
                session.commit()
            started = time.monotonic()
            with Session() as session:
                session.add(Item(title="y"))
                session.flush()
                session.execute(select(func.count()).select_from(Build)).scalar_one()
                assert session._pg_units["ci"].host is lb._router.route("ci").primary
                session.commit()
            assert time.monotonic() - started < lb.settings.connect_timeout
        finally:
            healthy_cluster.lag(2, 0)


def test_statements_carry_their_comment_and_are_counted(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    """As core units: each statement ends with the db_config_name comment
    (sql_comments), and a usage scope counts reads on replicas and writes."""
    from pgreplica import observe

    Session = sessionmaker(class_=RoutingSession, lb=lb)
    with observe.usage() as used, pgreplica.tags(endpoint="items"):
        with Session() as session:
            text_seen = session.execute(select(func.current_query())).scalar_one()
            assert "db_config_name='main_replica'" in text_seen
            assert "endpoint='items'" in text_seen
        with Session() as session:
            session.add(Item(title="counted"))
            session.flush()
            text_seen = session.execute(select(func.current_query())).scalar_one()
            assert "db_config_name='main'" in text_seen
            session.commit()
    summary = used.summary()
    assert summary.get("db_replica_count", 0) >= 1, summary
    assert summary.get("db_primary_count", 0) >= 2, summary
