"""ASGI (Starlette, FastAPI) and WSGI (Flask) middleware on the real cluster, with the
SQLAlchemy routing sessions behind the endpoints: read-your-writes across requests under
300 ms replay delay against a stale control, 200 concurrent requests on one loop without
a token leaking between them, which host served each request, a replica killed under
load, server-side sticking by user, and tokens shared with the Django integration."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import pgreplica
from pgreplica.testing import LocalCluster
from redis_server import free_port
from secrets_registry import register_secret

pytest.importorskip("starlette", reason="Starlette is not installed (.[dev])")
pytest.importorskip("httpx", reason="httpx is not installed (.[dev])")
pytest.importorskip("sqlalchemy", reason="SQLAlchemy is not installed (.[dev])")
pytest.importorskip("greenlet", reason="greenlet is not installed (sqlalchemy[asyncio])")

import httpx
from sqlalchemy import String, func, select
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pgreplica.contrib.asgi import PgReplicaMiddleware
from pgreplica.contrib.sqlalchemy import AsyncRoutingSession, RoutingSession
from pgreplica.contrib.wsgi import PgReplicaMiddleware as WSGIMiddleware

KEY = register_secret("web-test-key", "web middleware signing key")
SCHEMA = "CREATE TABLE IF NOT EXISTS web_items (id serial PRIMARY KEY, title text NOT NULL)"


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "web_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String)


@pytest.fixture(scope="module")
def schema(cluster: LocalCluster) -> None:
    cluster.execute(0, SCHEMA)
    cluster.wait_replayed()


def lag(cluster: LocalCluster, delay: str | int) -> None:
    cluster.lag(1, delay)
    cluster.lag(2, delay)


def role(cluster: LocalCluster, port: int) -> str:
    return {cluster.port(i): ("primary" if i == 0 else f"replica{i}") for i in range(3)}[port]


def starlette_app(alb: pgreplica.AsyncLoadBalancer, **options: Any) -> Any:
    Session = async_sessionmaker(class_=AsyncRoutingSession, lb=alb, expire_on_commit=False)

    async def create(request: Request) -> JSONResponse:
        body = await request.json()
        async with Session() as session:
            item = Item(title=body["title"])
            session.add(item)
            await session.commit()
        return JSONResponse({"id": item.id}, status_code=201)

    async def show(request: Request) -> JSONResponse:
        async with Session() as session:
            item = await session.get(Item, int(request.path_params["id"]))
            port = (await session.execute(select(func.inet_server_port()))).scalar_one()
        return JSONResponse(
            {"title": item.title if item else None, "port": port, "token": str(alb.token())}
        )

    async def seen(request: Request) -> JSONResponse:
        await asyncio.sleep(0.01)  # let the other requests interleave
        return JSONResponse({"token": str(alb.token())})

    app = Starlette(
        routes=[
            Route("/items", create, methods=["POST"]),
            Route("/items/{id:int}", show),
            Route("/seen", seen),
        ]
    )
    return PgReplicaMiddleware(app, lb=alb, key=KEY, **options)


@pytest.fixture
def alb(healthy_cluster: LocalCluster, schema: None) -> Iterator[pgreplica.AsyncLoadBalancer]:
    yield pgreplica.AsyncLoadBalancer(config=healthy_cluster.config())


def run(alb: pgreplica.AsyncLoadBalancer, scenario: Any) -> Any:
    async def main() -> Any:
        async with alb:
            return await scenario()

    return asyncio.run(main())


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_read_your_writes_across_requests_under_lag(
    alb: pgreplica.AsyncLoadBalancer, healthy_cluster: LocalCluster
) -> None:
    app = starlette_app(alb)

    async def scenario() -> dict[str, Any]:
        stale = control_stale = 0
        roles = []
        async with client(app) as web:
            for i in range(8):
                title = f"ryw-{uuid.uuid4().hex[:6]}-{i}"
                created = await web.post("/items", json={"title": title})
                assert created.status_code == 201
                token = created.headers["x-pgreplica-token"]
                assert "pgreplica_token=" in created.headers["set-cookie"]
                web.cookies.clear()  # the header alone carries it
                item = f"/items/{created.json()['id']}"
                control = await web.get(item)  # no token: the control
                control_stale += control.json()["title"] is None
                shown = await web.get(item, headers={"X-PgReplica-Token": token})
                stale += shown.json()["title"] != title
                roles.append(role(healthy_cluster, shown.json()["port"]))
        return {"stale": stale, "control_stale": control_stale, "roles": roles}

    lag(healthy_cluster, "300ms")
    try:
        outcome = run(alb, scenario)
    finally:
        lag(healthy_cluster, 0)
    assert outcome["stale"] == 0
    assert outcome["control_stale"] >= 6, outcome  # the lag is real


def test_the_cookie_carries_the_token_and_replicas_serve_once_caught_up(
    alb: pgreplica.AsyncLoadBalancer, healthy_cluster: LocalCluster
) -> None:
    app = starlette_app(alb)

    async def scenario() -> list[str]:
        async with client(app) as web:
            created = await web.post("/items", json={"title": "cookie"})
            item = f"/items/{created.json()['id']}"
            healthy_cluster.wait_replayed()
            roles = []
            for _ in range(4):  # the cookie jar sends the token back
                shown = await web.get(item)
                assert shown.json()["title"] == "cookie"
                assert shown.json()["token"] != ""
                roles.append(role(healthy_cluster, shown.json()["port"]))
                assert "x-pgreplica-token" not in shown.headers  # a read returns nothing
            return roles

    roles = run(alb, scenario)
    assert set(roles) <= {"replica1", "replica2"}, roles


def test_200_concurrent_requests_on_one_loop_keep_their_own_tokens(
    alb: pgreplica.AsyncLoadBalancer, healthy_cluster: LocalCluster
) -> None:
    app = starlette_app(alb)
    tokens = [
        pgreplica.CausalToken.from_dict({"main": f"0/{i + 1:X}0"}).sign(KEY) for i in range(100)
    ]

    async def scenario() -> list[tuple[str | None, str]]:
        async with client(app) as web:

            async def one(token: str | None) -> tuple[str | None, str]:
                headers = {"X-PgReplica-Token": token} if token else {}
                response = await web.get("/seen", headers=headers)
                return token, response.json()["token"]

            return await asyncio.gather(*(one(t) for t in [*tokens, *[None] * 100]))

    results = run(alb, scenario)
    assert len(results) == 200
    for sent, seen in results:
        expected = "" if sent is None else str(pgreplica.CausalToken.verify(sent, KEY))
        assert seen == expected


def test_a_killed_replica_gives_no_request_error(
    alb: pgreplica.AsyncLoadBalancer, healthy_cluster: LocalCluster
) -> None:
    app = starlette_app(alb)

    async def scenario() -> dict[str, Any]:
        async with client(app) as web:
            created = await web.post("/items", json={"title": "load"})
            item = f"/items/{created.json()['id']}"
            healthy_cluster.wait_replayed()
            web.cookies.clear()
            statuses: list[int] = []
            roles: list[str] = []

            async def reader() -> None:
                for _ in range(40):
                    response = await web.get(item)
                    statuses.append(response.status_code)
                    if response.status_code == 200:
                        roles.append(role(healthy_cluster, response.json()["port"]))

            async def killer() -> None:
                await asyncio.sleep(0.2)
                await asyncio.to_thread(healthy_cluster.kill, 1)

            await asyncio.gather(*(reader() for _ in range(4)), killer())
            return {"statuses": statuses, "roles": roles}

    outcome = run(alb, scenario)
    assert set(outcome["statuses"]) == {200}, outcome["statuses"]
    assert "replica2" in outcome["roles"]


def test_sticking_by_user_and_a_bad_token(
    alb: pgreplica.AsyncLoadBalancer,
    healthy_cluster: LocalCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that carries no token (another device of the same user) still reads
    its user's write: the token was stuck by user id. A forged token is ignored."""

    def identify(scope: Any) -> str | None:
        for name, value in scope["headers"]:
            if name == b"x-user":
                return str(value.decode())
        return None

    app = starlette_app(alb, sticking="memory", identify=identify)

    async def scenario() -> dict[str, Any]:
        async with client(app) as web:
            created = await web.post("/items", json={"title": "stuck"}, headers={"X-User": "42"})
            item = f"/items/{created.json()['id']}"
        async with client(app) as other_device:
            shown = await other_device.get(item, headers={"X-User": "42"})
            forged = await other_device.get(item, headers={"X-PgReplica-Token": "main=0/1.1.x"})
        return {"shown": shown.json(), "forged": forged.status_code}

    lag(healthy_cluster, "300ms")
    try:
        with caplog.at_level(logging.INFO, logger="pgreplica.web"):
            outcome = run(alb, scenario)
    finally:
        lag(healthy_cluster, 0)
    assert outcome["shown"]["title"] == "stuck"
    assert outcome["forged"] == 200
    assert "pgreplica_token_rejected" in caplog.text


def test_sticking_store_unreachable_writes_succeed_and_reads_use_the_primary(
    alb: pgreplica.AsyncLoadBalancer,
    healthy_cluster: LocalCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis down: the write's response still goes out, with its token (the failed
    stick is logged), and another device of the user, with no token, reads the primary."""
    app = starlette_app(
        alb,
        sticking=f"redis://127.0.0.1:{free_port()}/0",
        identify=lambda scope: dict(scope["headers"]).get(b"x-user", b"").decode() or None,
    )

    async def scenario() -> dict[str, Any]:
        async with client(app) as web:
            created = await web.post("/items", json={"title": "down"}, headers={"X-User": "7"})
        async with client(app) as other_device:
            shown = await other_device.get(
                f"/items/{created.json()['id']}", headers={"X-User": "7"}
            )
        await app.sticking.store.aclose()
        return {"created": created, "shown": shown.json()}

    lag(healthy_cluster, "300ms")
    try:
        with caplog.at_level(logging.WARNING, logger="pgreplica.sticking"):
            outcome = run(alb, scenario)
    finally:
        lag(healthy_cluster, 0)
    assert outcome["created"].status_code == 201
    assert outcome["created"].headers.get("X-PgReplica-Token")
    assert outcome["shown"]["title"] == "down"
    assert outcome["shown"]["port"] == healthy_cluster.port(0)
    operations = [m.rsplit("operation=", 1)[-1] for m in caplog.messages]
    assert {"adopt", "stick"} <= set(operations), caplog.messages


def test_sticking_keys_from_a_spec_are_keyed_hmacs(
    alb: pgreplica.AsyncLoadBalancer, healthy_cluster: LocalCluster, redis_server: str
) -> None:
    """A store built from a URL names its keys by an HMAC of the user id under a key
    derived from the signing key: whoever reads Redis cannot find user 7's entry by
    hashing candidate ids."""
    import redis

    from pgreplica.sticking import MemoryStickingStore, Sticking

    app = starlette_app(
        alb,
        sticking=redis_server,
        identify=lambda scope: dict(scope["headers"]).get(b"x-user", b"").decode() or None,
    )
    user = f"user-{uuid.uuid4().hex}"

    async def scenario() -> int:
        async with client(app) as web:
            created = await web.post("/items", json={"title": "k"}, headers={"X-User": user})
        await app.sticking.store.aclose()
        return created.status_code

    assert run(alb, scenario) == 201
    unkeyed = Sticking(alb, MemoryStickingStore()).key(user)
    prefix = app.sticking.store.prefix
    with redis.Redis.from_url(redis_server) as r:
        assert r.exists(prefix + app.sticking.key(user)) == 1
        assert r.exists(prefix + unkeyed) == 0
    assert app.sticking.key(user) != unkeyed


def test_a_fastapi_sync_endpoint_in_the_thread_pool_returns_its_token(
    healthy_cluster: LocalCluster, schema: None
) -> None:
    """Sync endpoints run in worker threads with a copy of the context: the write made
    there still reaches the response."""
    fastapi = pytest.importorskip("fastapi", reason="FastAPI is not installed (.[dev])")

    with pgreplica.LoadBalancer(config=healthy_cluster.config()) as lb:
        Session = sessionmaker(class_=RoutingSession, lb=lb, expire_on_commit=False)
        api = fastapi.FastAPI()

        @api.post("/items", status_code=201)
        def create(body: dict[str, str]) -> dict[str, int]:
            with Session() as session:
                item = Item(title=body["title"])
                session.add(item)
                session.commit()
            return {"id": item.id}

        @api.get("/items/{item_id}")
        def show(item_id: int) -> dict[str, Any]:
            with Session() as session:
                item = session.get(Item, item_id)
                return {"title": item.title if item else None}

        api.add_middleware(PgReplicaMiddleware, lb=lb, key=KEY)

        async def scenario() -> int:
            stale = 0
            async with client(api) as web:
                for i in range(4):
                    created = await web.post("/items", json={"title": f"sync-{i}"})
                    assert "x-pgreplica-token" in created.headers
                    shown = await web.get(f"/items/{created.json()['id']}")
                    stale += shown.json()["title"] is None
            return stale

        lag(healthy_cluster, "300ms")
        try:
            stale = asyncio.run(scenario())
        finally:
            lag(healthy_cluster, 0)
    assert stale == 0


def test_flask_through_wsgi(healthy_cluster: LocalCluster, schema: None) -> None:
    flask = pytest.importorskip("flask", reason="Flask is not installed (.[dev])")

    with pgreplica.LoadBalancer(config=healthy_cluster.config()) as lb:
        Session = sessionmaker(class_=RoutingSession, lb=lb, expire_on_commit=False)
        app = flask.Flask("web_items")

        @app.post("/items")
        def create() -> Any:
            with Session() as session:
                item = Item(title=flask.request.get_json()["title"])
                session.add(item)
                session.commit()
            return {"id": item.id}, 201

        @app.get("/items/<int:item_id>")
        def show(item_id: int) -> Any:
            with Session() as session:
                item = session.get(Item, item_id)
                port = session.execute(select(func.inet_server_port())).scalar_one()
                return {"title": item.title if item else None, "port": port}

        app.wsgi_app = WSGIMiddleware(app.wsgi_app, lb=lb, key=KEY)  # type: ignore[method-assign]
        lag(healthy_cluster, "300ms")
        try:
            stale = control_stale = 0
            for i in range(6):
                with app.test_client() as web:  # a cookie jar per browser
                    created = web.post("/items", json={"title": f"flask-{i}"})
                    assert created.headers.get("X-PgReplica-Token")
                    item = f"/items/{created.get_json()['id']}"
                    stale += web.get(item).get_json()["title"] is None  # the cookie
                with app.test_client() as other:
                    control_stale += other.get(item).get_json()["title"] is None
        finally:
            lag(healthy_cluster, 0)
        assert stale == 0
        assert control_stale >= 4  # the lag is real
        healthy_cluster.wait_replayed()
        with app.test_client() as web:
            port = web.get(item).get_json()["port"]
            assert role(healthy_cluster, port).startswith("replica")


def test_wsgi_with_the_sticking_store_unreachable(
    healthy_cluster: LocalCluster, schema: None, caplog: pytest.LogCaptureFixture
) -> None:
    """WSGI, Redis down: the write answers 201 with its token (the failed stick is
    logged), and another browser of the same user, with no token, reads the primary."""
    flask = pytest.importorskip("flask", reason="Flask is not installed (.[dev])")

    with pgreplica.LoadBalancer(config=healthy_cluster.config()) as lb:
        Session = sessionmaker(class_=RoutingSession, lb=lb, expire_on_commit=False)
        app = flask.Flask("web_items_down")

        @app.post("/items")
        def create() -> Any:
            with Session() as session:
                item = Item(title=flask.request.get_json()["title"])
                session.add(item)
                session.commit()
            return {"id": item.id}, 201

        @app.get("/items/<int:item_id>")
        def show(item_id: int) -> Any:
            with Session() as session:
                item = session.get(Item, item_id)
                port = session.execute(select(func.inet_server_port())).scalar_one()
                return {"title": item.title if item else None, "port": port}

        middleware = WSGIMiddleware(
            app.wsgi_app,
            lb=lb,
            key=KEY,
            sticking=f"redis://127.0.0.1:{free_port()}/0",
            identify=lambda environ: environ.get("HTTP_X_USER"),
        )
        app.wsgi_app = middleware  # type: ignore[method-assign]
        lag(healthy_cluster, "300ms")
        try:
            with caplog.at_level(logging.WARNING, logger="pgreplica.sticking"):
                with app.test_client() as web:
                    created = web.post("/items", json={"title": "down"}, headers={"X-User": "9"})
                with app.test_client() as other:
                    shown = other.get(
                        f"/items/{created.get_json()['id']}", headers={"X-User": "9"}
                    ).get_json()
        finally:
            lag(healthy_cluster, 0)
            middleware.sticking.store.close()
    assert created.status_code == 201 and created.headers.get("X-PgReplica-Token")
    assert shown == {"title": "down", "port": healthy_cluster.port(0)}
    operations = [m.rsplit("operation=", 1)[-1] for m in caplog.messages]
    assert {"adopt", "stick"} <= set(operations), caplog.messages


def test_tokens_cross_between_django_and_asgi_cookies() -> None:
    """Django sets the token cookie quoted (SimpleCookie); the middleware reads it, and
    Django's cookie parser reads the middleware's."""
    pytest.importorskip("django", reason="Django is not installed (.[dev])")
    from http.cookies import SimpleCookie

    from django.http.cookie import parse_cookie

    from pgreplica.contrib._web import COOKIE, TokenExchange, cookie_value

    token = pgreplica.CausalToken.from_dict({"main": "0/16B3748@1-7312345678901234567"})
    signed = token.sign(KEY)
    django_style = SimpleCookie()
    django_style[COOKIE] = signed
    header = django_style.output(header="").strip()  # what Django's set_cookie sends
    assert cookie_value(header.split(";")[0], COOKIE) == signed

    with pgreplica.LoadBalancer(config={"databases": {"main": {"primary": "host=h"}}}) as lb:
        exchange = TokenExchange(lb, KEY)
        assert exchange.incoming(None, header.split(";")[0]) == token
        set_cookie = dict(exchange.outgoing(token, secure=True))["Set-Cookie"]
        assert "HttpOnly" in set_cookie and "Secure" in set_cookie and "SameSite=Lax" in set_cookie
        assert parse_cookie(set_cookie.split(";")[0])[COOKIE] == signed
        with pytest.raises(pgreplica.ConfigError, match="key"):
            TokenExchange(lb, "")


def test_a_token_beyond_the_primary_is_not_adopted_nor_returned(
    alb: pgreplica.AsyncLoadBalancer, healthy_cluster: LocalCluster
) -> None:
    """A signed token whose position the primary never reached (a failed position read,
    a key shared with another cluster): once the primary was probed after its signing
    time (allowing for the signer's clock being behind, 300 s), it is dropped, so the
    client neither reads the primary forever nor gets the position back re-signed."""
    app = starlette_app(alb)
    far = pgreplica.CausalToken.from_dict({"main": "FF/0"})
    signed = far.sign(KEY, issued_at=time.time() - 400)
    recent = far.sign(KEY)  # signed just now: it may be a write the probes missed

    async def scenario() -> list[Any]:
        async with client(app) as web:
            created = await web.post("/items", json={"title": "far"})
            item = f"/items/{created.json()['id']}"
            healthy_cluster.wait_replayed()
            web.cookies.clear()
            responses = []
            for _ in range(3):
                shown = await web.get(item, headers={"X-PgReplica-Token": signed})
                responses.append((shown.json(), shown.headers.get("x-pgreplica-token")))
            kept = await web.get(item, headers={"X-PgReplica-Token": recent})
            return responses, kept

    responses, kept = run(alb, scenario)
    for body, returned in responses:
        assert returned is None  # not re-signed
        assert body["token"] == ""  # not adopted
        assert role(healthy_cluster, body["port"]).startswith("replica")
    # a recent one is kept (read on the primary), and what comes back is the primary's
    # position, not the one the primary never reached
    assert kept.json()["token"] == "main=FF/0"
    assert role(healthy_cluster, kept.json()["port"]) == "primary"
    returned = kept.headers.get("x-pgreplica-token")
    assert returned is not None and not returned.startswith("main=FF/0.")
