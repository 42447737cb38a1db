"""Pure tests of the causal token and the LSN helpers (no database needed)."""

from __future__ import annotations

import itertools
import pickle
import random
import time

import pytest

from pgreplica import CausalToken, TokenError, format_lsn, parse_lsn
from secrets_registry import register_secret

KEY = register_secret(b"a-signing-key", "token signing key")
TEXT_KEY = register_secret("a text key", "token signing key (text)")

# -- LSN text ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ("0/0", 0),
        ("0/1", 1),
        ("16/B374D848", (0x16 << 32) | 0xB374D848),
        ("1/0", 1 << 32),
        ("FFFFFFFF/FFFFFFFF", (1 << 64) - 1),
    ],
)
def test_parse_and_format_lsn(text: str, position: int) -> None:
    assert parse_lsn(text) == position
    assert format_lsn(position) == text


def test_parse_lsn_accepts_lower_case_and_leading_zeros() -> None:
    assert parse_lsn("16/b374d848") == parse_lsn("16/B374D848")
    assert parse_lsn("00000016/0B374D84") == parse_lsn("16/B374D84")
    assert format_lsn(parse_lsn("00000000/00000001")) == "0/1"


def test_lsn_round_trip_over_many_positions() -> None:
    rng = random.Random(20240601)
    for _ in range(2000):
        position = rng.randrange(1 << rng.choice((8, 32, 40, 64)))
        assert parse_lsn(format_lsn(position)) == position


@pytest.mark.parametrize(
    "text",
    [
        "",
        "16",
        "16/",
        "/16",
        "16B374D848",
        "G/1",
        "0/XYZ",
        "0x1/0",
        "123456789/0",
        "0/123456789",
        " 0/1",
        "0/1 ",
        "0/1\n",
        "0/-1",
        "1/2/3",
    ],
)
def test_parse_lsn_rejects_malformed_text(text: str) -> None:
    with pytest.raises(TokenError, match="malformed LSN"):
        parse_lsn(text)


def test_parse_lsn_error_truncates_huge_input() -> None:
    with pytest.raises(TokenError) as info:
        parse_lsn("Z" * 10_000)
    assert len(str(info.value)) < 200


# -- building tokens ---------------------------------------------------------------------


def test_empty_token() -> None:
    empty = CausalToken()
    assert not empty
    assert str(empty) == ""
    assert empty.as_dict() == {}
    assert list(empty.items()) == []
    assert empty.get("main") == 0
    assert empty == CausalToken({})
    assert empty == CausalToken.parse("")
    assert empty == CausalToken.from_dict({})
    assert repr(empty) == "CausalToken('')"


def test_zero_positions_are_dropped() -> None:
    token = CausalToken({"main": 0, "ci": 5})
    assert token == CausalToken({"ci": 5})
    assert str(token) == "ci=0/5"
    assert not CausalToken.parse("main=0/0")


def test_get_and_items() -> None:
    token = CausalToken({"main": 0x16B3748, "ci": 0x52A0})
    assert token.get("main") == 0x16B3748
    assert token.get("ci") == 0x52A0
    assert token.get("other") == 0
    assert list(token.items()) == [("ci", 0x52A0), ("main", 0x16B3748)]
    assert token


def test_token_is_immutable_and_independent_of_its_source() -> None:
    source = {"main": 10}
    token = CausalToken(source)
    source["main"] = 99
    source["ci"] = 1
    assert token == CausalToken({"main": 10})
    with pytest.raises(AttributeError):
        token.extra = 1  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("lsns", "problem"),
    [
        ({"bad-name": 1}, "invalid database name"),
        ({"": 1}, "invalid database name"),
        ({"a" * 64: 1}, "invalid database name"),
        ({"main": -1}, "out of range"),
        ({"main": 1 << 64}, "out of range"),
        ({"main": 1.5}, "must be an int"),
        ({"main": "0/1"}, "must be an int"),
        ({"main": True}, "must be an int"),
        ({1: 1}, "invalid database name"),
    ],
)
def test_constructor_rejects_bad_entries(lsns: dict[object, object], problem: str) -> None:
    with pytest.raises(TokenError, match=problem):
        CausalToken(lsns)  # type: ignore[arg-type]


def test_token_error_is_a_value_error_and_pickles() -> None:
    with pytest.raises(ValueError) as info:
        CausalToken.parse("main")
    assert isinstance(info.value, TokenError)
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is TokenError
    assert str(copy) == str(info.value)


# -- text form ---------------------------------------------------------------------------


def test_str_and_parse_round_trip() -> None:
    token = CausalToken({"main": 0x16B3748, "ci": 0x52A0})
    text = str(token)
    assert text == "ci=0/52A0&main=0/16B3748"
    assert CausalToken.parse(text) == token
    assert str(CausalToken.parse(text)) == text
    assert repr(token) == f"CausalToken({text!r})"


def test_parse_is_order_insensitive_and_canonicalises() -> None:
    token = CausalToken.parse("main=00000000/016b3748&ci=0/52a0")
    assert token == CausalToken({"main": 0x16B3748, "ci": 0x52A0})
    assert str(token) == "ci=0/52A0&main=0/16B3748"


def test_round_trip_over_random_tokens() -> None:
    rng = random.Random(7)
    for _ in range(500):
        token = _random_token(rng)
        assert CausalToken.parse(str(token)) == token
        assert CausalToken.from_dict(token.as_dict()) == token
        assert CausalToken.verify(token.sign(KEY), KEY) == token


def test_as_dict_and_from_dict() -> None:
    token = CausalToken({"main": 0x16B3748, "ci": 0x52A0})
    data = token.as_dict()
    assert data == {"ci": "0/52A0", "main": "0/16B3748"}
    assert list(data) == ["ci", "main"]
    assert CausalToken.from_dict(data) == token
    assert CausalToken.from_dict({"main": "0/0"}) == CausalToken()


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (["main", "0/1"], "must be a mapping"),
        ("main=0/1", "must be a mapping"),
        (None, "must be a mapping"),
        ({"main": 1}, "must be text"),
        ({"main": None}, "must be text"),
        ({"main": "zz"}, "malformed LSN"),
        ({"bad name": "0/1"}, "invalid database name"),
    ],
)
def test_from_dict_rejects_malformed_input(data: object, problem: str) -> None:
    with pytest.raises(TokenError, match=problem):
        CausalToken.from_dict(data)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("main", r"malformed token part 'main': expected 'database=X/Y'"),
        ("main=0/1&ci", "malformed token part 'ci'"),
        ("main=0/1&", "malformed token part ''"),
        ("&main=0/1", "malformed token part ''"),
        ("main:0/1", "expected 'database=X/Y'"),
        ("main=0/XYZ", "malformed LSN '0/XYZ'"),
        ("main=0/1G", "malformed LSN"),
        ("main=", "malformed LSN ''"),
        ("main=0/1=0/2", "malformed LSN '0/1=0/2'"),
        ("main=0/1&main=0/2", "database 'main' appears twice"),
        ("main=0/1&ci=0/2&main=0/1", "database 'main' appears twice"),
        ("=0/1", "invalid database name"),
        ("bad-name=0/1", "invalid database name"),
        ("main =0/1", "invalid database name"),
        ("main=0/1 ", "malformed LSN"),
    ],
)
def test_parse_rejects_malformed_text(text: str, problem: str) -> None:
    with pytest.raises(TokenError, match=problem):
        CausalToken.parse(text)


@pytest.mark.parametrize("value", [None, b"main=0/1", 17, ["main=0/1"], {"main": "0/1"}])
def test_parse_rejects_non_text(value: object) -> None:
    with pytest.raises(TokenError, match="token must be text"):
        CausalToken.parse(value)  # type: ignore[arg-type]


def test_parse_rejects_overlong_text() -> None:
    part = "main=0/1&"
    text = part * (4096 // len(part) + 1)
    with pytest.raises(TokenError, match="too long"):
        CausalToken.parse(text)
    with pytest.raises(TokenError, match="too long"):
        CausalToken.parse("x" * 1_000_000)


def test_parse_accepts_text_up_to_the_limit() -> None:
    names = [f"db{i:04d}" for i in range(200)]
    token = CausalToken({name: (1 << 40) + i for i, name in enumerate(names)})
    text = str(token)
    assert len(text) <= 4096
    assert CausalToken.parse(text) == token


# -- merging -----------------------------------------------------------------------------


def test_merge_takes_the_larger_position_per_database() -> None:
    a = CausalToken({"main": 100, "ci": 7})
    b = CausalToken({"main": 50, "ci": 9, "sec": 3})
    merged = a | b
    assert merged == CausalToken({"main": 100, "ci": 9, "sec": 3})
    assert merged.covers(a)
    assert merged.covers(b)
    # the operands are unchanged
    assert a == CausalToken({"main": 100, "ci": 7})
    assert b == CausalToken({"main": 50, "ci": 9, "sec": 3})


def test_merge_with_the_empty_token() -> None:
    token = CausalToken({"main": 5})
    empty = CausalToken()
    assert token | empty == token
    assert empty | token == token
    assert empty | empty == empty
    assert not empty | empty


def test_merge_with_a_non_token_is_a_type_error() -> None:
    token = CausalToken({"main": 5})
    with pytest.raises(TypeError):
        token | {"main": 6}  # type: ignore[operator]
    with pytest.raises(TypeError):
        token | "main=0/6"  # type: ignore[operator]


def test_covers() -> None:
    big = CausalToken({"main": 10, "ci": 10})
    assert big.covers(CausalToken())
    assert big.covers(CausalToken({"main": 10}))
    assert not big.covers(CausalToken({"main": 11}))
    assert not big.covers(CausalToken({"other": 1}))
    assert CausalToken().covers(CausalToken())
    assert not CausalToken().covers(big)


NAMES = ("main", "ci", "sec", "embedding", "x")
POSITIONS = (0, 1, 2, 0xFF, 1 << 32, (1 << 32) + 1, (1 << 64) - 1)


def _random_token(rng: random.Random) -> CausalToken:
    names = rng.sample(NAMES, rng.randrange(len(NAMES) + 1))
    return CausalToken(
        {
            name: rng.choice(POSITIONS) if rng.random() < 0.5 else rng.randrange(1 << 64)
            for name in names
        }
    )


def test_merge_laws_on_random_tokens() -> None:
    rng = random.Random(1234)
    empty = CausalToken()
    tokens = [_random_token(rng) for _ in range(60)]
    # include some tokens built from a shared pool of positions, so that equal and
    # comparable positions meet often
    tokens += [
        CausalToken({n: rng.choice(POSITIONS) for n in rng.sample(NAMES, 2)}) for _ in range(40)
    ]
    for a, b in itertools.product(tokens, repeat=2):
        ab = a | b
        assert ab == b | a, (a, b)  # commutative
        assert hash(ab) == hash(b | a)
        assert a | a == a  # idempotent
        assert ab | b == ab  # absorbing what is already in
        assert a | empty == a == empty | a  # identity
        assert ab.covers(a) and ab.covers(b)  # an upper bound...
        for name in NAMES:  # ...and the least one: the max per database
            assert ab.get(name) == max(a.get(name), b.get(name))
    for _ in range(3000):
        a, b, c = (rng.choice(tokens) for _ in range(3))
        assert (a | b) | c == a | (b | c), (a, b, c)  # associative


def test_equal_tokens_hash_equal() -> None:
    a = CausalToken({"main": 1, "ci": 2})
    b = CausalToken.parse("main=0/1&ci=0/2")
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b, CausalToken({"ci": 2, "main": 1})}) == 1
    assert a != CausalToken({"main": 1})
    assert a != "ci=0/2&main=0/1"


# -- signing -----------------------------------------------------------------------------


@pytest.mark.parametrize("key", [KEY, TEXT_KEY, b"\x00\xff" * 40])
def test_sign_and_verify_round_trip(key: bytes | str) -> None:
    token = CausalToken({"main": 0x16B3748, "ci": 0x52A0})
    signed = token.sign(key)
    payload, _, signature = signed.rpartition(".")
    body, _, issued = payload.rpartition(".")
    assert body == str(token) and abs(int(issued) - time.time()) < 120
    assert signature and "=" not in signature
    assert CausalToken.verify(signed, key) == token


def test_sign_and_verify_the_empty_token() -> None:
    signed = CausalToken().sign(KEY)
    assert signed.startswith(".")
    assert CausalToken.verify(signed, KEY) == CausalToken()


def test_text_and_bytes_keys_agree() -> None:
    token = CausalToken({"main": 1})
    assert token.sign("k\u00e9y") == token.sign("k\u00e9y".encode())
    assert CausalToken.verify(token.sign("k\u00e9y"), "k\u00e9y".encode()) == token


def test_signature_is_deterministic_and_depends_on_the_key() -> None:
    token = CausalToken({"main": 1})
    assert token.sign(KEY, issued_at=5) == token.sign(KEY, issued_at=5)
    assert token.sign(KEY, issued_at=5) != token.sign(KEY + b"!", issued_at=5)
    assert token.sign(KEY, issued_at=5) != token.sign(KEY, issued_at=6)


def _tampered() -> list[tuple[str, str]]:
    token = CausalToken({"main": 0x16B3748, "ci": 0x52A0})
    signed = token.sign(KEY)
    payload, _, signature = signed.rpartition(".")
    return [
        ("changed LSN", signed.replace("main=0/16B3748", "main=0/16B3749")),
        ("raised LSN", signed.replace("main=0/16B3748", "main=FF/16B3748")),
        ("changed database", signed.replace("main=", "mian=")),
        ("dropped database", signed.replace("ci=0/52A0&", "")),
        ("added database", f"{payload}&extra=0/1.{signature}"),
        ("truncated signature", signed[:-1]),
        ("half signature", f"{payload}.{signature[: len(signature) // 2]}"),
        ("empty signature", f"{payload}."),
        ("changed signature", f"{payload}.{signature[:-1]}{'A' if signature[-1] != 'A' else 'B'}"),
        ("padded signature", f"{signed}="),
        ("signature of another token", f"{payload}.{CausalToken({'main': 1}).sign(KEY)[-43:]}"),
        ("non-ascii signature", f"{payload}.{signature[:-1]}\u00e9"),
    ]


@pytest.mark.parametrize(("case", "text"), _tampered(), ids=[c for c, _ in _tampered()])
def test_tampered_tokens_are_rejected(case: str, text: str) -> None:
    with pytest.raises(TokenError, match="signature does not match"):
        CausalToken.verify(text, KEY)


def test_wrong_key_is_rejected() -> None:
    signed = CausalToken({"main": 1}).sign(KEY)
    with pytest.raises(TokenError, match="signature does not match"):
        CausalToken.verify(signed, b"another-key")
    with pytest.raises(TokenError, match="signature does not match"):
        CausalToken.verify(signed, KEY[:-1])


@pytest.mark.parametrize("text", ["main=0/16B3748", "", "main=0/1&ci=0/2"])
def test_unsigned_text_is_rejected(text: str) -> None:
    with pytest.raises(TokenError, match="not signed"):
        CausalToken.verify(text, KEY)


@pytest.mark.parametrize("key", [b"", ""])
def test_empty_key_is_rejected(key: bytes | str) -> None:
    token = CausalToken({"main": 1})
    with pytest.raises(TokenError, match="key must not be empty"):
        token.sign(key)
    with pytest.raises(TokenError, match="key must not be empty"):
        CausalToken.verify(token.sign(KEY), key)


@pytest.mark.parametrize("value", [None, b"main=0/1.sig", 3])
def test_verify_rejects_non_text(value: object) -> None:
    with pytest.raises(TokenError, match="signed token must be text"):
        CausalToken.verify(value, KEY)  # type: ignore[arg-type]


def test_verify_checks_the_payload_after_the_signature() -> None:
    # A correctly signed payload that is not a token is still rejected.
    from pgreplica.lsn import _mac

    now = int(time.time())
    for payload, problem in [
        (f"main=zz.{now}", "malformed LSN"),
        (f"main=0/1&main=0/2.{now}", "appears twice"),
        ("main=0/1", "no signing time"),
        ("main=0/1.soon", "no signing time"),
        ("main=0/1&" * 500, "too long"),
    ]:
        with pytest.raises(TokenError, match=problem):
            CausalToken.verify(f"{payload}.{_mac(KEY, payload)}", KEY)


def test_signed_tokens_expire_and_are_not_from_the_future() -> None:
    token = CausalToken({"main": 1})
    signed = token.sign(KEY, issued_at=1_000_000)
    assert CausalToken.verify(signed, KEY, now=1_000_000 + 3599) == token
    with pytest.raises(TokenError, match="expired"):
        CausalToken.verify(signed, KEY, now=1_000_000 + 3601)
    assert CausalToken.verify(signed, KEY, max_age=None, now=1_000_000 + 10**7) == token
    with pytest.raises(TokenError, match="future"):
        CausalToken.verify(signed, KEY, now=1_000_000 - 3600)
    with pytest.raises(TokenError, match="expired"):
        CausalToken.verify(token.sign(KEY, issued_at=time.time() - 61), KEY, max_age=60)


def test_errors_about_untrusted_tokens_stay_short() -> None:
    """A name or value from a job header or a message is quoted in an error (which
    is logged) cut to 40 characters, and a mapping naming too many databases is
    refused before it is read."""
    long_name = "x" * 100_000
    for bad in (
        {long_name + "!": "0/1"},  # an invalid name
        {long_name: 1},  # not text
        {long_name: "0/1@" + "9" * 100},  # a malformed origin
    ):
        with pytest.raises(TokenError) as info:
            CausalToken.from_dict(bad)  # type: ignore[arg-type]
        assert len(str(info.value)) < 200, str(info.value)[:300]
    with pytest.raises(TokenError, match="at most 256"):
        CausalToken.from_dict({f"db{i}": "0/1" for i in range(257)})
