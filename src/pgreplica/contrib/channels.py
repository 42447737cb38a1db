"""Django Channels: read-your-writes for channel-layer consumers.

A view saves a row and tells the websocket subscribers through the channel layer; each
subscriber's consumer, perhaps in another process, reads the row and pushes it. Without
care that read may hit a replica that has not replayed the save. Two pieces fix it:

- :class:`EnvelopeChannelLayer` wraps the project's layer (channels-redis, or any
  other): every ``send`` and ``group_send`` stamps the message with an envelope of the
  positions the sending context wrote or read (:func:`pgreplica.jobs.capture`, as jobs
  and :mod:`pgreplica.pubsub` do), under the key ``"pgreplica"``.
- :class:`ReplicaConsumerMixin`, first among a consumer's bases, takes the envelope off
  each message and runs the handler with replica reads (the Django router's) on a
  replica that has replayed those positions, after a bounded wait, or on the primary.
  A message without an envelope (a websocket frame, an older sender during a rolling
  deploy) is handled as before: on the primary.

Settings::

    CHANNEL_LAYERS = {"default": {
        "BACKEND": "pgreplica.contrib.channels.EnvelopeChannelLayer",
        "CONFIG": {"layer": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                             "CONFIG": {"hosts": ["redis://127.0.0.1:6379/0"]}}},
    }}

and a consumer::

    class ItemUpdates(ReplicaConsumerMixin, JsonWebsocketConsumer):
        def item_updated(self, event):       # from group_send(g, {"type": "item.updated", "id": 7})
            self.send_json(ItemSerializer(Item.objects.get(pk=event["id"])).data)

Send after the commit (``transaction.on_commit``): a message sent inside the writing
transaction can be handled before the commit, on a replica or on the primary alike.

The envelope is the JSON text of :mod:`pgreplica.pubsub` (``type`` ``json``, ``data``
null): another language can read it. With a signing key (``key`` in the layer's
``CONFIG`` and ``pgreplica_key`` on the consumer) it carries an HMAC of its positions; a
message whose envelope is malformed, unsigned or tampered is logged
(``envelope_rejected``) and handled on the primary, which is always fresh, so one bad
message never closes a websocket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from pgreplica._extras import extra_imports

with extra_imports("channels", feature="pgreplica.contrib.channels"):
    import channels  # noqa: F401  (the consumers below are for Django Channels)
    from django.db import InterfaceError, OperationalError
    from django.utils.module_loading import import_string

from pgreplica import jobs, pubsub
from pgreplica.contrib.django.state import REQUEST, RequestState, integration
from pgreplica.contrib.django.views import fallback_to_primary, run_with_replica
from pgreplica.lsn import CausalToken

__all__ = ["KEY", "EnvelopeChannelLayer", "ReplicaConsumerMixin"]

#: The message key that carries the envelope.
KEY = "pgreplica"

logger = logging.getLogger("pgreplica.channels")


def _balancer(lb: Any) -> Any:
    """The balancer whose positions envelopes carry: the given one (an instance or a
    dotted path), else the Django integration's."""
    if isinstance(lb, str):
        lb = import_string(lb)
    return lb if lb is not None else integration().lb


class EnvelopeChannelLayer:
    """A channel layer that stamps what it sends with the sender's positions.

    ``layer`` is the wrapped layer: a layer instance, or a settings-style mapping
    ``{"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {...}}``. ``key``
    signs envelopes; ``lb`` is the balancer (default: the Django integration's).
    Everything but ``send`` and ``group_send`` is the wrapped layer's own."""

    def __init__(
        self,
        layer: Any,
        *,
        key: bytes | str | None = None,
        lb: Any = None,
    ) -> None:
        if isinstance(layer, Mapping):
            if "BACKEND" not in layer:
                raise ValueError("EnvelopeChannelLayer: layer needs a BACKEND")
            layer = import_string(layer["BACKEND"])(**dict(layer.get("CONFIG") or {}))
        if layer is None or not hasattr(layer, "group_send"):
            raise ValueError("EnvelopeChannelLayer: layer must be a channel layer or its settings")
        self.layer = layer
        self._key = key
        self._lb = lb

    def __getattr__(self, name: str) -> Any:
        return getattr(self.layer, name)

    def __repr__(self) -> str:
        return f"EnvelopeChannelLayer({type(self.layer).__name__})"

    async def stamp(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of ``message`` with the envelope of the current context's positions."""
        if not isinstance(message, Mapping):
            raise TypeError(f"a channel layer message is a dict, not {type(message).__name__}")
        lb = _balancer(self._lb)
        if hasattr(lb, "__aenter__"):
            wal = await jobs.acapture(lb)
        else:  # one query to the primary at most: off the event loop
            wal = await asyncio.to_thread(jobs.capture, lb)
        return {**message, KEY: pubsub._envelope(None, wal, self._key)}

    async def send(self, channel: str, message: Mapping[str, Any]) -> None:
        await self.layer.send(channel, await self.stamp(message))

    async def group_send(self, group: str, message: Mapping[str, Any]) -> None:
        await self.layer.group_send(group, await self.stamp(message))


class ReplicaConsumerMixin:
    """Runs the handler of a stamped message on a replica that has replayed the
    sender's positions (within ``pgreplica_wait``), else on the primary.

    Put it first among the bases of a ``SyncConsumer`` / ``AsyncConsumer`` subclass
    (``WebsocketConsumer``, ``AsyncJsonWebsocketConsumer``...). In a sync consumer a
    query that fails on the replica runs the handler once more on the primary, as the
    views do; in either kind a write sends the rest of the handler to the primary."""

    pgreplica_key: bytes | str | None = None
    """Required signing key of envelopes (``key`` of :class:`EnvelopeChannelLayer`)."""
    pgreplica_wait: jobs.WaitPolicy | tuple[int, float] | None = None
    """How long to wait for a replica to catch up (default: the jobs' default wait)."""
    pgreplica_lb: Any = None
    """The balancer (default: the Django integration's)."""

    async def dispatch(self, message: Any) -> None:
        parent = super().dispatch  # type: ignore[misc]
        envelope = message.get(KEY) if isinstance(message, Mapping) else None
        if envelope is None:
            return await parent(message)  # type: ignore[no-any-return]
        message = {k: v for k, v in message.items() if k != KEY}
        name = f"{type(self).__name__}.{message.get('type', '?')!s}"
        try:
            token: CausalToken | pubsub.Commit | None = pubsub.unwrap(
                envelope, key=self.pgreplica_key
            )[1]
        except pubsub.EnvelopeError as exc:
            logger.warning("envelope_rejected consumer=%s error=%s", name, exc)
            token = None
        lb = _balancer(self.pgreplica_lb)
        decision = await asyncio.to_thread(
            pubsub.start, lb, token, name=name, wait=self.pgreplica_wait
        )
        with decision.scope:
            if decision.use_primary:
                return await parent(message)  # type: ignore[no-any-return]
            if getattr(self, "_sync", False):  # a SyncConsumer: the handler runs in a thread
                from channels.db import database_sync_to_async

                return await database_sync_to_async(self._dispatch_on_replica)(message, name)  # type: ignore[no-any-return]
            return await self._adispatch_on_replica(parent, message, name)

    def _dispatch_on_replica(self, message: dict[str, Any], name: str) -> None:
        handler = self._handler(message)
        run_with_replica(lambda: handler(message), name)

    async def _adispatch_on_replica(self, parent: Any, message: dict[str, Any], name: str) -> None:
        # The handler's ORM calls run in threads (database_sync_to_async) that see this
        # state through the context; the router marks it when one of them writes.
        state = RequestState(replica=True)
        token = REQUEST.set(state)
        try:
            await parent(message)
        except (OperationalError, InterfaceError) as exc:
            if state.alias is None and not state.aliases:
                raise
            fallback_to_primary(state, exc, name)
            await parent(message)
        finally:
            REQUEST.reset(token)

    def _handler(self, message: Mapping[str, Any]) -> Any:
        from channels.consumer import get_handler_name

        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        return handler
