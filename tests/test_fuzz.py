"""Fuzzing of the parsers that take untrusted or user-supplied input.

Each property feeds arbitrary input, or a mutation of valid input, to one parser and
checks the outcome: a value of the documented type or the documented error, never
another exception, and nothing trusted that was not signed with the key.

* Causal tokens: :meth:`CausalToken.parse`, :meth:`CausalToken.verify`, and the token
  exchange of the web middleware (header and cookie, through ASGI and WSGI too).
* Configuration: :meth:`Settings.from_toml`, :meth:`Settings.from_dict` and
  :meth:`Settings.from_env` give settings or a :class:`ConfigError`, whose message
  never shows a password given in a connection string.
* The statement classifier, beyond tests/test_sql_properties.py: every code point (NUL,
  lone surrogates), deep nesting, long statements, dollar quotes, comments and
  whitespace around a statement.
* Pub/sub envelopes (:func:`pubsub.unwrap`) and job headers (:func:`jobs.start_job`).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import json
import math
import string
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import pgreplica
from pgreplica import jobs, pubsub
from pgreplica import lsn as lsn_module
from pgreplica.config import Settings, parse_rollout
from pgreplica.contrib._web import COOKIE, TokenExchange
from pgreplica.contrib.asgi import PgReplicaMiddleware as AsgiMiddleware
from pgreplica.contrib.wsgi import PgReplicaMiddleware as WsgiMiddleware
from pgreplica.errors import ConfigError, TokenError
from pgreplica.lsn import EMPTY_TOKEN, SIGNED_MAX_AGE, CausalToken
from pgreplica.pubsub import Commit, EnvelopeError
from pgreplica.sql import Classification, classify
from secrets_registry import register_secret

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

KEY = register_secret(b"fuzz-signing-key", "fuzz tests signing key")
OTHER_KEY = register_secret(b"another-signing-key", "fuzz tests other signing key")
#: The signing time of tokens signed for verify(..., now=NOW).
NOW = 1_700_000_000

FUZZ = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEW = settings(FUZZ, max_examples=20)

# -- strategies shared by the sections ---------------------------------------------------

#: Every code point, NUL and lone surrogates (text decoded with surrogateescape) included.
ANY_CHAR = st.characters(exclude_categories=())
any_text = st.text(ANY_CHAR, max_size=120)
LATIN1_CHAR = st.characters(max_codepoint=0xFF)
#: What st.text() draws by default: no lone surrogate (TOML text cannot hold one).
TEXT_CHAR = st.characters(codec="utf-8")
NAME_CHARS = string.ascii_letters + string.digits + "_"
B64URL = string.ascii_letters + string.digits + "-_"

names = st.text(NAME_CHARS, min_size=1, max_size=63)
positions = st.one_of(
    st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**32 - 1, 2**32, 2**64 - 1])
)
origins = st.builds(
    lambda timeline, system: f"{timeline}-{system}",
    st.integers(1, 10**10 - 1),
    st.integers(0, 10**20 - 1),
)


@st.composite
def tokens(draw: st.DrawFn, max_size: int = 4) -> CausalToken:
    entries = draw(
        st.dictionaries(names, st.tuples(positions, st.none() | origins), max_size=max_size)
    )
    return CausalToken(
        {name: position for name, (position, _) in entries.items()},
        {name: origin for name, (_, origin) in entries.items() if origin is not None},
    )


#: Text near the token grammar: names, ``=``, ``X/Y`` positions, ``@`` origins, ``&``.
lsn_texts = st.one_of(
    positions.map(lsn_module.format_lsn), st.text("0123456789ABCDEFabcdef/ x-", max_size=20)
)
origin_texts = st.one_of(origins, st.text("0123456789-+ ", max_size=25))
token_entries = st.builds(
    lambda name, sep, position, at, origin: f"{name}{sep}{position}{at}{origin if at else ''}",
    st.one_of(names, st.text("ab_01=&@ .é\x00", max_size=6)),
    st.sampled_from(["=", "=", "", "=="]),
    lsn_texts,
    st.sampled_from(["", "", "@", "@@"]),
    origin_texts,
)
token_like = st.lists(token_entries, max_size=4).map("&".join)

MUTATION_CHARS = st.one_of(
    st.sampled_from(list("0123456789ABCDEFabcdef/=&@.-_ ;\"'{}[]:,\\\x00")), ANY_CHAR
)


@st.composite
def mutations(draw: st.DrawFn, text: str, chars: st.SearchStrategy[str] = MUTATION_CHARS) -> str:
    """``text`` with one character replaced, inserted or deleted."""
    kind = draw(st.sampled_from(("replace", "insert", "delete")))
    if kind == "insert" or not text:
        i = draw(st.integers(0, len(text)))
        return text[:i] + draw(chars) + text[i:]
    i = draw(st.integers(0, len(text) - 1))
    if kind == "delete":
        return text[:i] + text[i + 1 :]
    return text[:i] + draw(chars) + text[i + 1 :]


keys = st.one_of(st.binary(min_size=1, max_size=80), st.text(min_size=1, max_size=80))


def hmac_key_block(key: bytes | str) -> bytes:
    """The key block HMAC-SHA256 really uses: keys longer than the block are hashed, and
    shorter ones padded with NUL bytes, so ``b"k"`` and ``b"k\\0"`` are one same key."""
    raw = key.encode() if isinstance(key, str) else key
    if len(raw) > 64:
        raw = hashlib.sha256(raw).digest()
    return raw.ljust(64, b"\0")


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)

# -- causal tokens ---------------------------------------------------------------------------


@FUZZ
@given(st.one_of(any_text, token_like, tokens().map(str).flatmap(mutations)))
@example("main=0/1&main=0/2")
@example("main=FFFFFFFF/FFFFFFFF@9999999999-99999999999999999999")
@example("main=0/1@0-1")
@example("m\x00=0/1")
def test_token_text_parses_to_a_token_or_a_token_error(text: str) -> None:
    try:
        token = CausalToken.parse(text)
    except TokenError as exc:
        assert str(exc)
        return
    assert isinstance(token, CausalToken)
    assert CausalToken.parse(str(token)) == token
    for name, position in token.items():
        assert 0 < position < 2**64
        assert set(name) <= set(NAME_CHARS) and 0 < len(name) <= 63


@FUZZ
@given(st.one_of(st.binary(max_size=40), st.integers(), st.none(), st.lists(st.text(max_size=5))))
def test_tokens_must_be_text(value: object) -> None:
    with pytest.raises(TokenError):
        CausalToken.parse(value)  # type: ignore[arg-type]
    with pytest.raises(TokenError):
        CausalToken.verify(value, KEY)  # type: ignore[arg-type]


@FUZZ
@given(tokens(), keys, st.integers(0, 10**12 - 1))
def test_tokens_round_trip_as_text_mapping_and_signed_text(
    token: CausalToken, key: bytes | str, issued: int
) -> None:
    assert CausalToken.parse(str(token)) == token
    assert CausalToken.from_dict(token.as_dict()) == token
    assert CausalToken.from_dict(json.loads(json.dumps(token.as_dict()))) == token
    signed = token.sign(key, issued_at=issued)
    # verify() refuses text over the parse limit + 80: the signature fits in that margin
    assert len(signed) - len(str(token)) <= 80
    assert CausalToken.verify(signed, key, now=issued) == token


@FUZZ
@given(
    st.one_of(
        any_text,
        token_like,
        st.builds(
            lambda body, issued, signature: f"{body}.{issued}.{signature}",
            token_like,
            st.text(string.digits, max_size=13),
            st.text(B64URL, max_size=44),
        ),
    ),
    keys,
)
@example("main=0/1.1700000000.\ud800", KEY)
@example("main=\ud800.1700000000.AAAA", KEY)
@example("\udcff", "key")
def test_text_that_was_not_signed_never_verifies(text: str, key: bytes | str) -> None:
    with pytest.raises(TokenError):
        CausalToken.verify(text, key, max_age=None)


@FUZZ
@given(tokens(), keys, keys)
def test_a_token_signed_with_one_key_never_verifies_with_another(
    token: CausalToken, key: bytes | str, other: bytes | str
) -> None:
    assume(hmac_key_block(key) != hmac_key_block(other))
    signed = token.sign(key, issued_at=NOW)
    with pytest.raises(TokenError, match="signature does not match"):
        CausalToken.verify(signed, other, now=NOW)


@FUZZ
@given(tokens(), keys, st.data())
def test_a_signed_token_with_any_one_character_changed_is_rejected(
    token: CausalToken, key: bytes | str, data: st.DataObject
) -> None:
    signed = token.sign(key, issued_at=NOW)
    mutated = data.draw(mutations(signed), label="mutated")
    assume(mutated != signed)
    with pytest.raises(TokenError):
        CausalToken.verify(mutated, key, now=NOW, max_age=None)


def test_a_signing_time_in_other_digits_is_not_a_signing_time() -> None:
    """str.isdigit() holds for "²" and for Arabic-Indic digits: with a valid signature
    over such a time, verify() raised ValueError from int(), or read the digits as a
    time."""
    for issued in ("²", "\u0661\u0667" + "\u0660" * 8):
        payload = f"main=0/1.{issued}"
        forged = f"{payload}.{lsn_module._mac(KEY, payload)}"
        with pytest.raises(TokenError, match="no signing time"):
            CausalToken.verify(forged, KEY, max_age=None)


@FEW
@given(
    st.integers(lsn_module._MAX_TOKEN_TEXT + 1, 2**20),
    st.sampled_from(["x", "main=0/1&", "é", "\x00", "\ud800"]),
)
@example(2**20, "main=0/1&")
def test_overlong_token_text_is_refused_on_its_length(length: int, unit: str) -> None:
    text = (unit * (length // len(unit) + 1))[:length]
    with pytest.raises(TokenError, match="too long"):
        CausalToken.parse(text)
    if length > lsn_module._MAX_TOKEN_TEXT + 80:
        with pytest.raises(TokenError, match="too long"):
            CausalToken.verify(text, KEY)


# -- the web token exchange (header and cookie) ------------------------------------------

CONFIG = {"databases": {"main": {"primary": "host=h"}}}


@pytest.fixture(scope="module")
def exchange() -> Iterator[TokenExchange]:
    """A token exchange on a balancer that is never opened (no probe: tokens are kept)."""
    lb = pgreplica.LoadBalancer(config=CONFIG)
    try:
        yield TokenExchange(lb, KEY)
    finally:
        lb.close()


@st.composite
def carried(
    draw: st.DrawFn, chars: st.SearchStrategy[str] = LATIN1_CHAR
) -> tuple[str, CausalToken]:
    """Text a client may send as a token, and the token the server must adopt from it."""
    kind = draw(st.sampled_from(["signed", "signed", "other_key", "expired", "mutated", "junk"]))
    token = draw(tokens())
    if kind == "signed":
        return token.sign(KEY), token
    if kind == "other_key":
        return token.sign(OTHER_KEY), EMPTY_TOKEN
    if kind == "expired":
        return token.sign(KEY, issued_at=time.time() - SIGNED_MAX_AGE - 60), EMPTY_TOKEN
    if kind == "mutated":
        signed = token.sign(KEY)
        mutated = draw(mutations(signed, st.one_of(st.sampled_from(list("0/.=A_")), chars)))
        assume(mutated != signed)
        return mutated, EMPTY_TOKEN
    return draw(st.one_of(st.text(chars, max_size=80), token_like)), EMPTY_TOKEN


cookie_names = st.text(string.ascii_letters + "_-", min_size=1, max_size=12).filter(
    lambda name: name != COOKIE
)


@st.composite
def cookie_headers(draw: st.DrawFn, value: str | None) -> str:
    """A ``Cookie`` header: a few other cookies, and ours (maybe quoted) among them."""
    others = draw(st.lists(st.tuples(cookie_names, st.text(LATIN1_CHAR, max_size=20)), max_size=3))
    parts = [f"{name}={text.replace(';', '')}" for name, text in others]
    if value is not None:
        quoted = f'"{value}"' if draw(st.booleans()) else value
        parts.insert(draw(st.integers(0, len(parts))), f"{COOKIE}={quoted}")
    return draw(st.sampled_from(["; ", ";", " ; "])).join(parts)


@st.composite
def requests(
    draw: st.DrawFn, chars: st.SearchStrategy[str] = LATIN1_CHAR
) -> tuple[str | None, str | None, CausalToken]:
    """(header, Cookie header, the token the request must adopt)."""
    header, expected = draw(carried(chars)) if draw(st.booleans()) else (None, EMPTY_TOKEN)
    if draw(st.booleans()):
        value, in_cookie = draw(carried(chars))
        cookie = draw(cookie_headers(value))
        expected = expected | in_cookie
    else:
        cookie = draw(st.none() | cookie_headers(None))
    return header, cookie, expected


@FUZZ
@given(requests(chars=ANY_CHAR))
@example((None, f"{COOKIE}=\ud800", EMPTY_TOKEN))
def test_a_request_adopts_exactly_its_validly_signed_tokens(
    exchange: TokenExchange, request_: tuple[str | None, str | None, CausalToken]
) -> None:
    header, cookie, expected = request_
    assert exchange.incoming(header, cookie) == expected


@pytest.fixture(scope="module")
def alb() -> Iterator[pgreplica.AsyncLoadBalancer]:
    balancer = pgreplica.AsyncLoadBalancer(config=CONFIG)
    yield balancer
    asyncio.run(balancer.close())


@FEW
@given(
    requests(),
    st.lists(
        st.tuples(st.binary(max_size=12), st.binary(max_size=40)).filter(
            lambda pair: pair[0].lower() not in (b"cookie", b"x-pgreplica-token")
        ),
        max_size=3,
    ),
    st.sampled_from(["GET", "POST", "head", "DELETE", ""]),
    st.binary(max_size=60),
)
def test_asgi_middleware_adopts_exactly_the_validly_signed_tokens(
    alb: pgreplica.AsyncLoadBalancer,
    request_: tuple[str | None, str | None, CausalToken],
    other_headers: list[tuple[bytes, bytes]],
    method: str,
    raw_header: bytes,
) -> None:
    header, cookie, expected = request_
    headers = [(name.lower(), value) for name, value in other_headers]
    if header is not None:
        headers.append((b"x-pgreplica-token", header.encode("latin-1")))
    elif raw_header:  # bytes no client library would send
        headers.append((b"x-pgreplica-token", raw_header))
    if cookie is not None:
        headers.append((b"cookie", cookie.encode("latin-1")))
    seen: list[CausalToken] = []
    sent: list[Mapping[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(alb.token())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Mapping[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "scheme": "https", "headers": headers}
    asyncio.run(AsgiMiddleware(app, lb=alb, key=KEY)(scope, receive, send))
    assert seen == [expected]
    assert sent[0]["headers"] == []  # nothing written: no token returned


@FEW
@given(requests(), st.sampled_from(["GET", "POST", "OPTIONS", "patch"]))
def test_wsgi_middleware_adopts_exactly_the_validly_signed_tokens(
    exchange: TokenExchange,
    request_: tuple[str | None, str | None, CausalToken],
    method: str,
) -> None:
    header, cookie, expected = request_
    lb = exchange.lb
    environ: dict[str, Any] = {"REQUEST_METHOD": method, "wsgi.url_scheme": "http"}
    if header is not None:
        environ["HTTP_X_PGREPLICA_TOKEN"] = header
    if cookie is not None:
        environ["HTTP_COOKIE"] = cookie
    seen: list[CausalToken] = []
    started: list[list[tuple[str, str]]] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        seen.append(lb.token())
        start_response("200 OK", [])
        return [b""]

    def start_response(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> None:
        started.append(headers)

    assert WsgiMiddleware(app, lb=lb, key=KEY)(environ, start_response) == [b""]
    assert seen == [expected]
    assert started == [[]]


# -- configuration: TOML files, mappings and the environment ------------------------------

PASSWORD_MARK = "s3cr3t-PW-"
passwords = st.text(string.ascii_letters + string.digits, min_size=6, max_size=10).map(
    lambda s: PASSWORD_MARK + s
)
SETTING_NAMES = sorted(f.name for f in fields(Settings) if f.name != "databases")
#: Values some setting accepts, and near misses.
PLAUSIBLE = [
    *["", "0", "1", "-1", "0.5", "1e3", "nan", "inf", "²", "\u0661", " 2 ", "100ms", "2s", "1min"],
    *["8MiB", "1 kB", "10GB", "8XB", "1" * 5000, "true", "off", "yes", "maybe", "1.5%"],
    *["101", "main", "ci", "x y", "10.0.0.2", "127.0.0.1:8600", "[::1]:53", "10.0.0.2:²"],
    *["lower", "app.f", "Upper", "a b", "http://db1:8008", "https://db2:8008/", "ftp://x"],
    *["_pg._tcp.db.local", "db.local", "a" * 40 + "!", "x" * 300, "host=h"],
]
PATRONI_URLS = [
    *["http://db1:8008", "https://db2:8008/", "http://u@db1:8008", "ftp://x", "http://"],
    *["http://db1:8008/cluster", "db1:8008", "", "http://a b:1"],
]
DATABASE_NAMES = st.one_of(st.sampled_from(["main", "ci", "reporting"]), st.text(max_size=8))


def toml_scalars(python: bool) -> st.SearchStrategy[Any]:
    """Values of the scalar types a TOML document has (and, for ``from_dict``, some a
    mapping built in Python may hold)."""
    scalars = st.one_of(
        st.sampled_from(PLAUSIBLE),
        st.text(max_size=20),
        st.integers(-(2**63), 2**63 - 1),
        st.sampled_from([10**400, -(10**400)]),
        st.floats(),
        st.booleans(),
        st.datetimes(timezones=st.none() | st.just(datetime.timezone.utc)),
        st.dates(),
        st.times(),
    )
    if python:
        scalars = st.one_of(scalars, st.none(), st.binary(max_size=8), st.just(("a", 1)))
    return scalars


def config_values(python: bool) -> st.SearchStrategy[Any]:
    return st.recursive(
        toml_scalars(python),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
        ),
        max_leaves=6,
    )


#: Arbitrary values, as a TOML document or a mapping built in Python may hold.
VALUES = {False: config_values(False), True: config_values(True)}
HOSTS = ["h", "db1.example", "10.0.0.1", "a,b", "a,b,c", "", "/tmp", "[::1]", "h h", "r"]
PORTS = ["", "5432", "1,2", "5432,5433,5434", "0", "65536", "x", "²", ",", "-1", " 5432"]
DSN_TAILS = [
    *["", " sslmode=require", "?sslmode=require", " target_session_attrs=read-write"],
    *["&x=1", " x", "%zz", "'", "\\", " =x", "\x00 port=1", "?", "#", ","],
]


@st.composite
def dsns(draw: st.DrawFn, chars: st.SearchStrategy[str] = TEXT_CHAR) -> str:
    """A connection string with a password (PASSWORD_MARK...): a URL or key=value, often
    malformed."""
    password = draw(passwords)
    host, port = draw(st.sampled_from(HOSTS)), draw(st.sampled_from(PORTS))
    tail = draw(st.one_of(st.sampled_from(DSN_TAILS), st.text(chars, max_size=6)))
    form = draw(st.integers(0, 2))
    if form == 0:
        return f"postgresql://u:{password}@{host}{':' if port else ''}{port}/db{tail}"
    if form == 1:
        return f"host='{host}' port='{port}' user=u password={password} dbname=db{tail}"
    return f"user=u password='{password}' host={host or 'h'}{tail}"


def database_entries(python: bool) -> st.SearchStrategy[dict[Any, Any]]:
    """A database's table: every key present or not, its value right or wrong, now and
    then a key that does not exist."""
    values, dsn, urls = VALUES[python], dsns(), st.sampled_from(PATRONI_URLS)
    known = st.fixed_dictionaries(
        {},
        optional={
            "primary": st.one_of(dsn, dsn, st.sampled_from(["main", "ci", "x y"]), values),
            "replicas": st.one_of(st.lists(dsn, max_size=3), values),
            "rollout": st.one_of(
                st.floats(-1, 101), st.integers(-5, 105), st.sampled_from(PLAUSIBLE), values
            ),
            "hosts": st.one_of(st.lists(dsn, max_size=3), dsn, values),
            "replicas_dns": st.one_of(st.sampled_from(PLAUSIBLE), values),
            "patroni": st.one_of(st.lists(urls, max_size=2), urls, values),
        },
    )
    unknown = st.dictionaries(st.text(max_size=8), values, max_size=1)
    return st.builds(
        lambda entry, extra: {**extra, **entry}, known, st.one_of(st.just({}), unknown)
    )


ENV_SETTINGS = [f"PGREPLICA_{name.upper()}" for name in SETTING_NAMES]
env_texts = st.one_of(st.text(ANY_CHAR, max_size=20), st.sampled_from(PLAUSIBLE))
env_dsns = dsns(ANY_CHAR)
environments = st.builds(
    lambda env, primary, replicas, reuse: {
        **{k: v for k, v in env.items() if k != "PGREPLICA_CONFIG"},
        **primary,
        **replicas,
        **reuse,
    },
    st.dictionaries(
        st.one_of(st.sampled_from([*ENV_SETTINGS, "PGREPLICA_ROLLOUT_MAIN"]), st.text()),
        env_texts,
        max_size=3,
    ),
    st.fixed_dictionaries({}, optional={"PGREPLICA_PRIMARY_URL": env_dsns}),
    st.fixed_dictionaries(
        {}, optional={"PGREPLICA_REPLICA_URLS": st.lists(env_dsns, max_size=3).map(",".join)}
    ),
    st.dictionaries(
        st.sampled_from(["MAIN", "CI", "REPORTING"]).map("PGREPLICA_REUSE_PRIMARY_{}".format),
        st.one_of(st.sampled_from(["main", "ci", "x y", ""]), env_texts),
        max_size=1,
    ),
)


def config_cases(python: bool = False) -> st.SearchStrategy[tuple[dict[Any, Any], dict[str, str]]]:
    """(a configuration mapping, an environment): passwords only in connection strings."""
    values = VALUES[python]
    top_keys = st.one_of(st.sampled_from(SETTING_NAMES), st.text(max_size=10))
    if python:
        top_keys = st.one_of(top_keys, st.integers(0, 3))
    settings_ = st.dictionaries(
        top_keys, st.one_of(values, st.lists(st.sampled_from(PLAUSIBLE), max_size=3)), max_size=3
    )
    databases = st.one_of(
        st.dictionaries(DATABASE_NAMES, st.one_of(database_entries(python), values), max_size=3),
        st.dictionaries(DATABASE_NAMES, database_entries(python), min_size=1, max_size=3),
        values,
    )
    data = st.builds(
        lambda top, dbs: {**top, "databases": dbs} if dbs is not None else top,
        settings_,
        st.one_of(databases, databases, databases, st.none()),
    )
    return st.tuples(data, environments)


def toml_string(text: str) -> str:
    escaped = "".join(
        "\\" + ch if ch in '"\\' else f"\\u{ord(ch):04X}" if ord(ch) < 0x20 or ch == "\x7f" else ch
        for ch in text
    )
    return f'"{escaped}"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict), value
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(data: dict[str, Any], header_depth: int) -> str:
    """``data`` as TOML: tables down to ``header_depth`` under ``[a.b]`` headers, deeper
    ones inline."""
    lines: list[str] = []

    def table(path: tuple[str, ...], mapping: dict[str, Any]) -> None:
        nested = {
            k: v for k, v in mapping.items() if isinstance(v, dict) and len(path) < header_depth
        }
        if path:
            lines.append("[" + ".".join(map(toml_string, path)) + "]")
        lines.extend(
            f"{toml_string(k)} = {toml_value(v)}" for k, v in mapping.items() if k not in nested
        )
        for k, v in nested.items():
            table((*path, k), v)

    table((), data)
    return "\n".join(lines) + "\n"


def check_loaded(load: Callable[[], Settings]) -> Settings | ConfigError:
    """Settings, or a ConfigError naming a setting; neither shows a password."""
    try:
        loaded = load()
    except ConfigError as exc:
        assert isinstance(exc.setting, str) and exc.problem, repr(exc)
        assert PASSWORD_MARK not in str(exc), str(exc)
        assert PASSWORD_MARK not in repr(exc.args), exc.args
        return exc
    assert isinstance(loaded, Settings) and loaded.databases
    assert PASSWORD_MARK not in repr(loaded)
    return loaded


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-config")


PW = PASSWORD_MARK + "example"


@FUZZ
@given(config_cases(), st.integers(0, 2))
@example(({"databases": {"main": {"primary": f"postgresql://u:{PW}@h:²/db"}}}, {}), 1)
@example(({"databases": {"main": {"primary": "host=h"}}, "dns_servers": ["10.0.0.2:²"]}, {}), 0)
@example(({"databases": {"main": {"primary": "host=h"}}, "max_wait": 10**400}, {}), 2)
@example(({"databases": {"main": {"primary": "host=h", "replicas_dns": "a" * 40 + "!"}}}, {}), 2)
@example(
    ({"databases": {"main": {"primary": "host=h"}}}, {"PGREPLICA_MAX_LAG_BYTES": "1" * 5000}), 1
)
def test_a_toml_file_gives_settings_or_a_config_error(
    config_dir: Path, case: tuple[dict[str, Any], dict[str, str]], header_depth: int
) -> None:
    data, env = case
    document = toml_document(data, header_depth)
    assert tomllib.loads(document).keys() == data.keys()  # the document says what we mean
    path = config_dir / "pgreplica.toml"
    path.write_text(document, encoding="utf-8")
    check_loaded(lambda: Settings.from_toml(path, environ=env))


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(str.encode),
        st.lists(st.sampled_from(["[databases.main]", 'primary = "host=h"', "x = ", "[", "]"]))
        .map("\n".join)
        .map(str.encode),
    )
)
@example(b"\xff\xfe = 1")
@example(b"max_wait = 1" + b"0" * 5000)
@example(b"x = " + b"[" * 3000 + b"]" * 3000)
@example(b"x = " + b"{a = " * 3000 + b"1" + b"}" * 3000)
def test_any_file_content_gives_settings_or_a_config_error(
    config_dir: Path, content: bytes
) -> None:
    path = config_dir / "any.toml"
    path.write_bytes(content)
    check_loaded(lambda: Settings.from_toml(path, environ={}))


@FUZZ
@given(config_cases(python=True))
@example(({"databases": {"main": {"primary": f"host=h port=² password={PW}"}}}, {}))
@example(({"databases": {"main": {"hosts": [f"host=a,b port=1,² password={PW}"]}}}, {}))
def test_a_mapping_gives_settings_or_a_config_error(
    case: tuple[dict[Any, Any], dict[str, str]],
) -> None:
    data, env = case
    check_loaded(lambda: Settings.from_dict(data, environ=env))


@FUZZ
@given(config_cases(), st.sampled_from(["none", "file", "directory", "missing"]))
@example(
    ({}, {"PGREPLICA_PRIMARY_URL": "host=h", "PGREPLICA_REPLICA_URLS": "host=r\udcff"}), "none"
)
@example(({}, {"PGREPLICA_PRIMARY_URL": f"postgresql://u:{PW}@h\udcff/db"}), "none")
def test_the_environment_gives_settings_or_a_config_error(
    config_dir: Path, case: tuple[dict[str, Any], dict[str, str]], config_file: str
) -> None:
    data, env = case
    env = dict(env)
    if config_file == "file":
        path = config_dir / "from-env.toml"
        path.write_text(toml_document(data, 1), encoding="utf-8")
        env["PGREPLICA_CONFIG"] = str(path)
    elif config_file == "directory":
        env["PGREPLICA_CONFIG"] = str(config_dir)
    elif config_file == "missing":
        env["PGREPLICA_CONFIG"] = str(config_dir / "missing.toml")
    outcome = check_loaded(lambda: Settings.from_env(env))
    if config_file in ("directory", "missing"):
        assert isinstance(outcome, ConfigError) and outcome.setting == "config"


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", ["a" * 40 + "!", "a-" * 60 + "!", "a." * 200 + "!"])
def test_a_bad_replicas_dns_name_is_refused_at_once(name: str) -> None:
    """The check of the name backtracked exponentially on its length (a nested
    quantifier): 40 characters and a bad last one took hours."""
    config = {"databases": {"main": {"primary": "host=h", "replicas_dns": name}}}
    with pytest.raises(ConfigError, match="replicas_dns"):
        Settings.from_dict(config, environ={})


@pytest.mark.parametrize(
    "dsn",
    ["host=h\x00 port=1", "host=h port=1\x00 sslmode=require", f"postgresql://u:{PW}@h/db\x00"],
)
def test_a_nul_in_a_connection_string_is_refused(dsn: str) -> None:
    """libpq reads a connection string up to its first NUL: what follows it (a port, an
    sslmode) would be dropped without a word."""
    with pytest.raises(ConfigError, match="NUL") as info:
        Settings.from_dict({"databases": {"main": {"primary": dsn}}}, environ={})
    assert PASSWORD_MARK not in str(info.value)


@FUZZ
@given(st.one_of(any_text, st.sampled_from(PLAUSIBLE), toml_scalars(python=True)))
def test_a_rollout_is_a_percentage_or_a_config_error(value: Any) -> None:
    try:
        percent = parse_rollout("rollout", value)
    except ConfigError as exc:
        assert exc.setting == "rollout"
        return
    assert percent is None or 0.0 <= percent <= 100.0


@FUZZ
@given(st.none() | any_text | st.sampled_from(["on", " TRUE ", "off", "", "1", "0", "²"]))
def test_the_jobs_switch_is_a_boolean_or_a_config_error(text: str | None) -> None:
    environ = {} if text is None else {jobs.ENV_SWITCH: text}
    try:
        enabled = jobs.jobs_enabled(environ)
    except ConfigError as exc:
        assert exc.setting == jobs.ENV_SWITCH
        return
    assert enabled in (True, False)


# -- the statement classifier ---------------------------------------------------------------


def assert_classified(result: Classification) -> None:
    assert isinstance(result, Classification)
    assert result.target in ("replica", "primary")
    assert result.reason


@FUZZ
@given(st.text(ANY_CHAR, max_size=200))
@example("SELECT '\ud800'")
@example("SELECT 1; DELETE FROM t\udcff")
def test_classify_takes_every_code_point(text: str) -> None:
    assert_classified(classify(text))


@FUZZ
@given(
    st.sampled_from(["SELECT 1", "SELECT x FROM t", "", "SELECT nextval('s')"]),
    st.text(TEXT_CHAR, max_size=30),  # a lone surrogate: psycopg cannot send the text at all
    st.sampled_from(["; DELETE FROM t", "; SELECT 1", " FOR UPDATE", ""]),
)
@example("SELECT 1", "", "; DELETE FROM t")
def test_classify_sees_what_the_server_runs_up_to_a_nul(head: str, junk: str, tail: str) -> None:
    """libpq sends a statement up to its first NUL: the server never runs what follows,
    and the classifier never sees it either (a write there cannot reach a replica)."""
    sql = f"{head}\x00{junk}{tail}"
    assert classify(sql) == classify(head)


#: (head, opening, innermost, closing): the opening and closing parts repeat n times.
NESTINGS = [
    ("SELECT ", "(", "{inner}", ")"),
    ("SELECT ", "(SELECT ", "{inner}", ")"),
    ("SELECT * FROM t WHERE x IN ", "(SELECT x FROM t WHERE x IN ", "(SELECT {inner})", ")"),
    ("SELECT ", "ARRAY[", "{inner}", "]"),
    ("SELECT ", "abs(", "{inner}", ")"),
    ("SELECT ", "coalesce(1, ", "{inner}", ")"),
    ("SELECT ", "NOT ", "{inner}", ""),
    ("SELECT ", "- ", "{inner}", ""),
    ("SELECT ", "CASE WHEN true THEN ", "{inner}", " END"),
    ("SELECT {inner}", "", "", " + 1"),
    ("SELECT {inner}", "", "", " || 'x'"),
    ("SELECT {inner} FROM t", "", "", " WHERE x = 1"),
    ("", "WITH c AS (", "SELECT {inner}", ") SELECT * FROM c"),
    ("SELECT * FROM ", "(SELECT * FROM ", "t WHERE {inner} > 0", ") AS s"),
]
#: Innermost expressions: harmless, or ones that must keep the statement on the primary.
SAFE_INNER = ["1", "x", "now()", "'a'"]
PRIMARY_INNER = ["nextval('s')", "app_fn(1)", "pg_advisory_lock(1)", "txid_current()"]


@FUZZ
@given(
    st.sampled_from(NESTINGS),
    st.sampled_from(SAFE_INNER + PRIMARY_INNER),
    st.one_of(st.integers(0, 60), st.integers(0, 3000)),
)
@example(NESTINGS[9], "1", 1000)
@example(NESTINGS[2], "1", 1000)
@example(NESTINGS[4], "nextval('s')", 1000)
def test_deep_nesting_never_raises_nor_hides_a_write(
    nesting: tuple[str, str, str, str], inner: str, depth: int
) -> None:
    head, opening, innermost, closing = nesting
    if "{inner}" in head:
        sql = head.format(inner=inner) + closing * depth
    else:
        sql = head + opening * depth + innermost.format(inner=inner) + closing * depth
    result = classify(sql)
    assert_classified(result)
    if inner in PRIMARY_INNER:
        assert result.target == "primary", (depth, result)


@FEW
@given(
    st.sampled_from(["1", "x", "'é'", "$1", "%s", "%(a)s", "nextval('s')", "(SELECT 1)"]),
    st.integers(1, 5000),
    st.sampled_from([", ", " + ", " OR x = ", " UNION ALL SELECT "]),
)
@example("1", 20_000, " OR x = ")
def test_long_statements_are_classified(item: str, count: int, joiner: str) -> None:
    result = classify("SELECT " + joiner.join([item] * count) + " FROM t")
    assert_classified(result)
    if item == "nextval('s')":
        assert result.target == "primary"


def test_a_megabyte_of_comment_hides_no_write() -> None:
    padding = "x" * 2**20
    assert classify(f"SELECT 1 -- {padding}").target == "replica"
    assert classify(f"SELECT 1 /* {padding} */; DELETE FROM t").target == "primary"
    assert classify(f"SELECT '{padding}'; DELETE FROM t").target == "primary"


def test_many_unclosed_placeholders_are_classified_in_one_pass() -> None:
    """160 kB of "%(" with no ")" once took 100 s (a quadratic placeholder pattern);
    it is linear now. No time is asserted: a regression shows as this test hanging
    until the suite's timeout."""
    assert classify("SELECT " + "%(" * 80_000).target == "primary"
    assert classify("SELECT %(a)s, " + "%(" * 80_000 + " FROM t").target == "primary"


dollar_tags = st.one_of(st.just(""), st.text(string.ascii_letters + "_", min_size=1, max_size=4))


@FUZZ
@given(
    dollar_tags,
    st.lists(
        st.one_of(
            st.sampled_from(
                ["$", "$$", "$a$", "$b$", "'", "; DELETE FROM t", "/*", "*/", "--", "\n"]
            ),
            st.text(max_size=5),
        ),
        max_size=8,
    ).map("".join),
    st.sampled_from(["", "; DELETE FROM t", " AS x", "; SELECT 1", " FROM t FOR UPDATE"]),
)
def test_dollar_quotes_never_raise_nor_hide_a_write(tag: str, body: str, tail: str) -> None:
    quote = f"${tag}$"
    assume(quote not in body)
    result = classify(f"SELECT {quote}{body}{quote}{tail}")
    assert_classified(result)
    if "DELETE" in tail or "FOR UPDATE" in tail:
        assert result.target == "primary", result


STATEMENTS = [
    "SELECT 1",
    "SELECT * FROM t WHERE x = %s",
    "select x from t order by x limit 3",
    "INSERT INTO t VALUES (1)",
    "SELECT nextval('s')",
    "SELECT app_fn(1)",
    "BEGIN READ ONLY",
    "SET LOCAL statement_timeout = '1s'",
    "SET search_path = a",
    "SHOW search_path",
    "SELECT 1; DELETE FROM t",
    "WITH d AS (DELETE FROM t RETURNING x) SELECT * FROM d",
    "SELECT * FROM t FOR UPDATE",
    "EXPLAIN SELECT 1",
    "CREATE TEMP TABLE tt (x int)",
    "",
]
PG_WHITESPACE = " \t\n\r\f"
comment_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
surroundings = st.lists(
    st.one_of(
        st.text(PG_WHITESPACE, min_size=1, max_size=3),
        comment_text.filter(lambda s: "/*" not in s and "*/" not in s and not s.endswith("/")).map(
            lambda s: f"/*{s}*/"
        ),
        comment_text.map(lambda s: "--" + s.replace("\n", " ").replace("\r", " ") + "\n"),
    ),
    max_size=3,
).map("".join)


@FUZZ
@given(st.sampled_from(STATEMENTS), surroundings, surroundings)
@example("SELECT 1", "/* x */ ", "\n/*db_config_name='main'*/")
def test_comments_and_whitespace_around_a_statement_change_nothing(
    sql: str, before: str, after: str
) -> None:
    """As the sqlcommenter comment the balancer adds at the end of routed statements."""
    assert classify(before + sql + after) == classify(sql)


# -- pub/sub envelopes and job headers --------------------------------------------------------

payloads = st.one_of(st.binary(max_size=40), st.text(max_size=40), json_values)


@st.composite
def envelope_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """Dicts shaped like an envelope: every key present or not, right or wrong."""
    body = draw(
        st.fixed_dictionaries(
            {"pgreplica": st.one_of(st.just(1), st.just(1), json_values)},
            optional={
                "wal": st.one_of(
                    tokens().map(CausalToken.as_dict),
                    st.dictionaries(
                        st.text(max_size=8), st.one_of(token_entries, json_values), max_size=4
                    ),
                    json_values,
                ),
                "type": st.one_of(st.sampled_from(["json", "text", "bytes"]), json_values),
                "data": st.one_of(
                    json_values,
                    st.binary(max_size=20).map(lambda b: base64.b64encode(b).decode()),
                    st.text(ANY_CHAR, max_size=20),
                ),
                "xid": st.one_of(
                    st.dictionaries(
                        names, st.text(string.digits, max_size=22) | json_values, max_size=3
                    ),
                    json_values,
                ),
                "sig": st.one_of(st.text(B64URL, max_size=44), json_values),
            },
        )
    )
    if draw(st.integers(0, 4)) == 0:
        body[draw(st.text(max_size=8))] = draw(json_values)
    return body


@st.composite
def serialized(draw: st.DrawFn, body: Any) -> str | bytes:
    """``body`` as JSON text or UTF-8 bytes, in some layout."""
    text = json.dumps(
        body,
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.none() | st.integers(0, 2)),
        sort_keys=draw(st.booleans()),
    )
    if draw(st.booleans()):
        return text
    return text.encode("utf-8", "surrogatepass")  # lone surrogates: not UTF-8


def check_unwrapped(
    message: Any, key: bytes | str | None = None
) -> tuple[Any, CausalToken | Commit | None] | None:
    """The documented outcomes of unwrap(): an envelope's payload and token, a message
    passed through untouched (token None), or an EnvelopeError (None here)."""
    try:
        payload, token = pubsub.unwrap(message, key=key)
    except EnvelopeError as exc:
        assert str(exc)
        return None
    if token is None:
        assert payload is message
    elif isinstance(token, Commit):
        assert all(isinstance(x, str) and x.isdigit() for x in token.xids.values())
    else:
        assert isinstance(token, CausalToken)
    return payload, token


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=100),
        any_text,
        json_values,
        st.integers(),
        st.just(memoryview(b'{"pgreplica": 1}')),
        json_values.flatmap(serialized),
    )
)
@example('{"pgreplica": 1, "x": ' + "[" * 5000 + "]" * 5000 + "}")
@example(b'{"pgreplica": 1, "x": ' + b"[" * 3000)
def test_any_message_unwraps_to_a_documented_outcome(message: Any) -> None:
    check_unwrapped(message)
    signed = check_unwrapped(message, key=KEY)
    assert signed is None or signed[1] is None  # nothing trusted without a signature


SURROGATE_DATA = {"pgreplica": 1, "type": "text", "wal": {}, "data": "\ud800", "sig": "x"}
SURROGATE_SIG = {"pgreplica": 1, "type": "text", "wal": {}, "data": "x", "sig": "\ud800"}


@FUZZ
@given(envelope_bodies().flatmap(lambda body: st.tuples(st.just(body), serialized(body))))
@example((SURROGATE_DATA, json.dumps(SURROGATE_DATA)))
@example((SURROGATE_SIG, json.dumps(SURROGATE_SIG, ensure_ascii=False)))
def test_envelope_shaped_messages_unwrap_to_a_documented_outcome(
    case: tuple[dict[str, Any], str | bytes],
) -> None:
    body, message = case
    outcome = check_unwrapped(message)
    if outcome is not None and isinstance(outcome[1], CausalToken):
        assert outcome[1] == CausalToken.from_dict(body["wal"])
    signed = check_unwrapped(message, key=KEY)
    assert signed is None or signed[1] is None  # nothing trusted without a signature


@FUZZ
@given(payloads, tokens(), keys, st.booleans())
def test_a_signed_envelope_round_trips(
    payload: Any, token: CausalToken, key: bytes | str, as_bytes: bool
) -> None:
    text = pubsub._envelope(payload, token.as_dict(), key)
    message: str | bytes = text.encode() if as_bytes else text
    assert pubsub.unwrap(message, key=key) == (payload, token)
    assert pubsub.unwrap(message) == (payload, token)


@FUZZ
@given(payloads, tokens(), keys, keys)
def test_an_envelope_signed_with_another_key_is_refused(
    payload: Any, token: CausalToken, key: bytes | str, other: bytes | str
) -> None:
    assume(hmac_key_block(key) != hmac_key_block(other))
    text = pubsub._envelope(payload, token.as_dict(), key)
    with pytest.raises(EnvelopeError, match="signature does not match"):
        pubsub.unwrap(text, key=other)


@FUZZ
@given(payloads, tokens(), st.booleans(), st.data())
def test_a_tampered_signed_envelope_never_gives_a_position(
    payload: Any, token: CausalToken, as_bytes: bool, data: st.DataObject
) -> None:
    """One character changed: refused, or no envelope any more (a message that reads
    the primary), or (JSON layout only, as a space) the very same payload and token."""
    text = pubsub._envelope(payload, token.as_dict(), KEY)
    mutated = data.draw(mutations(text), label="mutated")
    assume(mutated != text)
    message: str | bytes = mutated.encode("utf-8", "surrogatepass") if as_bytes else mutated
    outcome = check_unwrapped(message, key=KEY)
    if outcome is not None and outcome[1] is not None:
        assert outcome == (payload, token)


@FEW
@given(st.integers(0, 5000), st.booleans())
@example(pubsub.MAX_ENVELOPE, False)
@example(pubsub.MAX_ENVELOPE, True)
def test_an_oversized_envelope_is_refused_before_it_is_read(max_bytes: int, as_bytes: bool) -> None:
    text = json.dumps({"pgreplica": 1, "wal": {}, "type": "text", "data": "x" * max_bytes})
    message: str | bytes = text.encode() if as_bytes else text
    with pytest.raises(EnvelopeError, match="limit"):
        pubsub.unwrap(message, max_bytes=max_bytes)


class NoBalancer:
    """A balancer that must not be used: deciding on a job's headers alone needs none."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the balancer was used: {name}")


header_values = st.one_of(
    st.none(),
    any_text,
    token_like,
    tokens().map(str).flatmap(mutations),
    st.dictionaries(
        st.one_of(names, st.text(max_size=8)), st.one_of(token_entries, json_values), max_size=4
    ),
    json_values,
    st.binary(max_size=20),
    st.integers(),
)


@FUZZ
@given(header_values)
@example({"main": "0/1", "ci": 7})
@example({1: "0/1"})
@example("main=0/1&main=0/1")
def test_job_headers_give_a_token_or_run_on_the_primary(headers: Any) -> None:
    """A header is the token's text or mapping; anything else, or a malformed one, is
    no token at all (the job then reads the primary), never an error."""
    try:
        if isinstance(headers, str):
            expected = CausalToken.parse(headers)
        else:
            expected = CausalToken.from_dict(headers)
    except TokenError:
        expected = EMPTY_TOKEN
    lb: Any = NoBalancer()
    decision = jobs.start_job(lb, "sticky", headers, job="fuzz", enabled=False)
    assert decision.outcome == jobs.PRIMARY
    assert decision.token == expected
    if not expected:
        sticky = jobs.start_job(lb, "sticky", headers, job="fuzz", enabled=True)
        assert sticky.outcome == jobs.PRIMARY_NO_WAL
    jobs.reset_outcomes()


@FUZZ
@given(tokens())
def test_job_headers_carry_the_token_in_every_form(token: CausalToken) -> None:
    lb: Any = NoBalancer()
    for headers in (token.as_dict(), json.loads(json.dumps(token.as_dict())), str(token), token):
        decision = jobs.start_job(lb, "sticky", headers, job="fuzz", enabled=False)
        assert decision.token == token
        assert decision.headers() == token.as_dict()
    jobs.reset_outcomes()
