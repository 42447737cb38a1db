"""SQL comments on routed statements, in the sqlcommenter format.

Every statement a read unit or a routing connection sends ends with a comment that
names the configuration that served it, plus the tags the application set for the
current context::

    SELECT ... FROM ci_builds
    /*db_config_name='ci_replica',endpoint_id='Builds%3A%3Aindex'*/

so that the server's log, ``pg_stat_activity`` and ``pg_stat_statements`` say which
configuration ran what, as GitLab's marginalia comments do. Keys are sorted; values are
URL-encoded (``quote(value, safe="")``), so no value can close the comment or add SQL,
and ``%`` is doubled when the statement has parameters. The classifier and the catalog
cache see the statement without its comment. ``sql_comments = false`` (or
``PGREPLICA_SQL_COMMENTS=false``) turns it off; then nothing is added and nothing is
computed.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from types import TracebackType
from typing import Any
from urllib.parse import quote

from psycopg import sql

from pgreplica._scope import EitherWith

__all__ = ["comment_for", "current_tags", "tags", "with_comment"]

_KEY = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]{0,62}\Z")
_TAGS: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("pgreplica_sql_tags", default=())
_CACHE: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
_CACHE_MAX = 1024
#: Tagged statement texts, so that psycopg meets the same str object each time (its
#: query cache then hashes nothing new).
_TAGGED: dict[tuple[str, str, bool], str] = {}
_TAGGED_MAX = 4096
_MAX_VALUE = 256

current_tags = _TAGS.get


class tags(EitherWith[None]):
    """Tags added to the SQL comment of every routed statement in this context (a
    thread, an asyncio task), merged with the outer ones; ``with`` or ``async with``.
    Keys are identifiers (``[A-Za-z_][A-Za-z0-9_]*``); values are text, at most 256
    characters (longer ones are cut), ``None`` removes a tag."""

    __slots__ = ("_saved", "_values")

    def __init__(self, **values: object) -> None:
        for key in values:
            if not _KEY.match(key) or key == "db_config_name":
                raise ValueError(f"invalid SQL comment tag {key!r}: use an identifier")
        self._values = values
        self._saved: list[Any] = []

    def __enter__(self) -> None:
        merged = dict(_TAGS.get())
        for key, value in self._values.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = str(value)[:_MAX_VALUE]
        self._saved.append(_TAGS.set(tuple(sorted(merged.items()))))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _TAGS.reset(self._saved.pop())


def comment_for(config_name: str) -> str:
    """``/*db_config_name='...',key='value'*/`` for the current context (cached)."""
    context = _TAGS.get()
    key = (config_name, context)
    text = _CACHE.get(key)
    if text is None:
        pairs = sorted((("db_config_name", config_name), *context))
        body = ",".join(f"{k}='{quote(v, safe='')}'" for k, v in pairs)
        text = f"/*{body}*/"
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        _CACHE[key] = text
    return text


def with_comment(query: Any, comment: str, params: Any) -> Any:
    """``query`` with ``comment`` on a line of its own at its end (a trailing ``--``
    comment of the statement cannot swallow it). With parameters, ``%`` is doubled, as
    psycopg reads ``%`` as a placeholder then."""
    if isinstance(query, str):
        key = (query, comment, params is None)
        text = _TAGGED.get(key)
        if text is None:
            if len(_TAGGED) >= _TAGGED_MAX:
                _TAGGED.clear()
            escaped = comment if params is None else comment.replace("%", "%%")
            text = _TAGGED[key] = f"{query}\n{escaped}"
        return text
    if params is not None:
        comment = comment.replace("%", "%%")
    if isinstance(query, bytes):
        return query + b"\n" + comment.encode()
    if isinstance(query, sql.Composable):
        return sql.Composed([query, sql.SQL("\n" + comment)])
    return query
