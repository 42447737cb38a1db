"""A small CRUD API on SQLAlchemy 2 asyncio with pgreplica routing.

Reads (GET) go to a replica that has replayed the caller's causal token; writes (POST,
PATCH, DELETE) go to the primary and return the advanced token in the
``X-PgReplica-Token`` header (and a signed cookie). Every GET says which server
answered it, so the routing can be watched.

Configuration comes from the environment, as ``pgreplica.AsyncLoadBalancer.from_config()``
reads it: ``PGREPLICA_CONFIG`` (a TOML file, such as the one ``pgreplica cluster up``
writes to ``.pgreplica-cluster/pgreplica.toml``), or ``PGREPLICA_PRIMARY_URL`` with
``PGREPLICA_REPLICA_URLS``. ``PGREPLICA_SIGNING_KEY`` signs the tokens.

Run it with ``main.py`` (starts the local cluster if needed), or directly::

    PGREPLICA_CONFIG=.pgreplica-cluster/pgreplica.toml \\
        .venv/bin/uvicorn app:app --app-dir examples/fastapi_app
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import DateTime, String, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import pgreplica
from pgreplica.contrib.asgi import PgReplicaMiddleware
from pgreplica.contrib.sqlalchemy import AsyncRoutingSession

# For the example only: set PGREPLICA_SIGNING_KEY to a secret of your own anywhere else
# (a client could otherwise forge a token and make every read wait for the primary).
SIGNING_KEY = os.environ.get("PGREPLICA_SIGNING_KEY", "example-only-not-a-secret")


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    # The database sets updated_at; RETURNING brings it back with the INSERT or UPDATE,
    # so no extra query (and no lazy load, which asyncio does not allow) is needed.
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class ItemIn(BaseModel):
    title: str = Field(min_length=1, max_length=200)


# The balancer reads its configuration from the environment; its pools and prober start
# in the lifespan below. Sessions route each transaction: reads to a caught-up replica,
# from the first write on to the primary; a commit advances the request's token.
alb = pgreplica.AsyncLoadBalancer.from_config()
Session = async_sessionmaker(class_=AsyncRoutingSession, lb=alb, expire_on_commit=False)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with alb:  # open the pools and the prober; close them at shutdown
        async with Session(primary=True) as session:  # DDL: the primary
            await session.run_sync(lambda s: Base.metadata.create_all(s.connection()))
            await session.commit()
        yield


app = FastAPI(title="pgreplica FastAPI example", lifespan=lifespan)
# Adopts the token a request carries (header or cookie); safe methods may read replicas
# that replayed it, other methods use the primary; a response that wrote returns the token.
app.add_middleware(PgReplicaMiddleware, lb=alb, key=SIGNING_KEY)


def as_json(item: Item) -> dict[str, Any]:
    return {"id": item.id, "title": item.title, "updated_at": item.updated_at.isoformat()}


async def served_by(session: AsyncSession) -> dict[str, Any]:
    """The server that ran this session's transaction (the same connection as its
    other reads): its port and whether it is a replica."""
    row = (await session.execute(select(func.inet_server_port(), func.pg_is_in_recovery()))).one()
    return {"port": row[0], "role": "replica" if row[1] else "primary"}


def not_found(item_id: int, server: dict[str, Any] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"detail": f"item {item_id} not found"}
    if server is not None:
        body["served_by"] = server
    return JSONResponse(body, status_code=404)


@app.post("/items", status_code=201)
async def create_item(data: ItemIn) -> dict[str, Any]:
    async with Session() as session:
        item = Item(title=data.title)
        session.add(item)
        await session.commit()  # the token advances: the response carries it
    return as_json(item)


@app.get("/items", response_model=None)
async def list_items(limit: int = 100) -> dict[str, Any]:
    async with Session() as session:
        items = (await session.scalars(select(Item).order_by(Item.id).limit(limit))).all()
        return {"items": [as_json(i) for i in items], "served_by": await served_by(session)}


@app.get("/items/{item_id}", response_model=None)
async def get_item(item_id: int) -> dict[str, Any] | JSONResponse:
    async with Session() as session:
        item = await session.get(Item, item_id)
        server = await served_by(session)
    if item is None:
        return not_found(item_id, server)
    return {**as_json(item), "served_by": server}


@app.patch("/items/{item_id}", response_model=None)
async def update_item(item_id: int, data: ItemIn) -> dict[str, Any] | JSONResponse:
    async with Session() as session:
        item = await session.get(Item, item_id, with_for_update=True)
        if item is None:
            return not_found(item_id)
        item.title = data.title
        await session.commit()
    return as_json(item)


@app.delete("/items/{item_id}", status_code=204, response_model=None)
async def delete_item(item_id: int) -> Response:
    async with Session() as session:
        item = await session.get(Item, item_id, with_for_update=True)
        if item is None:
            return not_found(item_id)
        await session.delete(item)
        await session.commit()
    return Response(status_code=204)
