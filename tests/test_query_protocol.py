"""query.protocol and the CLI's pure parsers: framing, validation, cursors, times. No sockets."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from query.cli import human_time, parse_duration, parse_time
from query.protocol import (
    CODES,
    MAX_LINE_BYTES,
    LineBuffer,
    LineTooLong,
    Position,
    Request,
    RequestError,
    decode_cursor,
    encode_cursor,
    encode_error,
    encode_result,
    parse_request,
)


def lines_of(buffer: LineBuffer) -> list[bytes]:
    out = []
    while (line := buffer.next_line()) is not None:
        out.append(line)
    return out


def test_lines_reassemble_from_single_bytes():
    data = b'{"op":"ping"}\n{"op":"stats","id":2}\n\n{"op"'
    buf = LineBuffer()
    got = []
    for i in range(len(data)):
        buf.feed(data[i : i + 1])
        got += lines_of(buf)
    assert got == [b'{"op":"ping"}', b'{"op":"stats","id":2}', b""]
    buf.finish()  # EOF: the unterminated last line counts
    assert lines_of(buf) == [b'{"op"']


def test_finish_at_eof_adds_no_empty_line():
    buf = LineBuffer()
    buf.feed(b"a\nb\n")
    buf.finish()
    assert lines_of(buf) == [b"a", b"b"]
    buf.feed(b"c\nd")
    buf.finish()
    buf.finish()
    assert lines_of(buf) == [b"c", b"d"]


def test_line_of_exactly_the_limit_passes_and_one_more_byte_is_too_long():
    buf = LineBuffer()
    buf.feed(b"x" * MAX_LINE_BYTES + b"\n")
    assert buf.next_line() == b"x" * MAX_LINE_BYTES
    buf.feed(b"y" * (MAX_LINE_BYTES + 1))
    with pytest.raises(LineTooLong):
        buf.next_line()
    buf = LineBuffer()
    buf.feed(b"z" * (MAX_LINE_BYTES + 1) + b"\n")
    with pytest.raises(LineTooLong):
        buf.next_line()


def error_of(line: bytes) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_request(line)
    return info.value


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b" ",
        b"{",
        b"nope",
        b'{"op": "ping",}',
        b"\xff\xfe{}",
        b'{"op": NaN}',
        b'{"op": "readings", "since": NaN}',
        b'{"op": "readings", "since": Infinity}',
        b'{"op": "readings", "until": -Infinity}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 5000 + b"1" + b"}" * 5000,
    ],
)
def test_bad_json(line):
    assert error_of(line).code == "bad_json"


@pytest.mark.parametrize(
    "request_, words",
    [
        ([], "JSON object"),
        ("ping", "JSON object"),
        ({}, "'op' is missing"),
        ({"op": 3}, "'op' must be a string"),
        ({"op": "readings"}, "'sensor' is missing"),
        ({"op": "readings", "sensor": "s1", "limit": True}, "'limit' must be an integer"),
        ({"op": "readings", "sensor": "s1", "limit": 5.0}, "'limit' must be an integer"),
        ({"op": "readings", "sensor": "s1", "limit": 0}, "'limit' must be 1-10000"),
        ({"op": "readings", "sensor": "s1", "limit": 10_001}, "'limit' must be 1-10000"),
        ({"op": "readings", "sensor": "s1", "since": "yesterday"}, "'since' must be a number"),
        ({"op": "readings", "sensor": "s1", "until": 1e300}, "'until' must be Unix seconds"),
        ({"op": "readings", "sensor": "s1", "order": "up"}, "'order'"),
        ({"op": "readings", "sensor": "s1", "cursor": 5}, "'cursor'"),
        ({"op": "readings", "sensor": 7}, "'sensor' must be a string"),
        ({"op": "readings", "sensor": ""}, "'sensor' must be 1-256"),
        ({"op": "readings", "sensor": "s" * 257}, "'sensor' must be 1-256"),
        ({"op": "readings", "sensor": "\ud800"}, "'sensor' must be valid Unicode"),
        ({"op": "readings", "sensor": None}, "'sensor' must be a string, got null"),
        ({"op": "aggregate", "sensor": "s", "metric": "m", "bucket": True}, "'bucket' must be a number"),
        ({"op": "aggregate", "sensor": "s", "metric": "m", "bucket": 0}, "'bucket' must be seconds"),
        ({"op": "aggregate", "sensor": "s", "metric": "m", "bucket": -60}, "'bucket' must be seconds"),
        ({"op": "aggregate", "sensor": "s", "metric": "m"}, "'bucket' is missing"),
        ({"op": "ping", "extra": 1}, "unknown parameter 'extra'"),
        ({"op": "latest", "sensor": "s", "since": 5}, "unknown parameter 'since'"),
        ({"op": "latest", "metric": ["t"]}, "'metric' must be a string, got array"),
        ({"op": "sensors", "stale": 1}, "'stale' must be true or false, got integer"),
        ({"op": "sensors", "stale": "yes"}, "'stale' must be true or false, got string"),
    ],
)
def test_bad_request_names_the_parameter(request_, words):
    error = error_of(json.dumps(request_).encode())
    assert error.code == "bad_request"
    assert words in error.message


def test_unknown_op_and_id_echo():
    error = error_of(b'{"op": "drop", "id": {"n": [1]}}')
    assert (error.code, error.request_id) == ("unknown_op", {"n": [1]})
    error = error_of(b'{"op": "readings", "id": 9, "limit": false, "sensor": "s"}')
    assert (error.code, error.request_id) == ("bad_request", 9)


def test_deeply_nested_id_is_refused_not_echoed():
    for depth, ok in ((32, True), (33, False), (500, False)):
        line = b'{"op":"ping","id":' + b"[" * depth + b"]" * depth + b"}"
        if ok:
            assert parse_request(line).op == "ping"
        else:
            error = error_of(line)
            assert (error.code, error.request_id) == ("bad_request", None)
            assert "'id'" in error.message


def test_valid_requests_parse_to_typed_params():
    assert parse_request(b'{"op":"ping"}') == Request("ping", None, {})
    request = parse_request(
        b'{"op":"readings","id":"a","sensor":"s1","since":5,"until":6.5,'
        b'"limit":10,"order":"desc","cursor":null,"metric":null}\r'
    )
    assert request == Request(
        "readings", "a", {"sensor": "s1", "since": 5.0, "until": 6.5, "limit": 10, "order": "desc"}
    )
    assert parse_request(b'{"op":"aggregate","sensor":"s","metric":"m","bucket":300}').params["bucket"] == 300
    assert parse_request(b'{"op":"sensors","stale":true}').params == {"stale": True}


def test_responses_are_single_standard_json_lines():
    line = encode_result(1, {"value": float("nan"), "rows": [float("inf"), 1.5]})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"id": 1, "ok": True, "result": {"value": None, "rows": [None, 1.5]}}
    line = encode_error("\ud800", "bad_request", "x")
    assert json.loads(line)["id"] == "\ud800"
    with pytest.raises(AssertionError):
        encode_error(None, "teapot", "x")


PARAMS = {"sensor": "s1", "metric": None, "order": "asc", "since": 10.0, "until": None}


def test_cursor_round_trips_and_is_bound_to_its_query():
    position = Position(3, 1700000000.123456789, -1, 2**32 - 1)
    cursor = encode_cursor(position, PARAMS)
    assert decode_cursor(cursor, PARAMS) == position
    for other in (
        {**PARAMS, "order": "desc"},
        {**PARAMS, "sensor": "s2"},
        {**PARAMS, "since": 11.0},
        {**PARAMS, "metric": "temp"},
        {**PARAMS, "until": 99.0},
    ):
        with pytest.raises(RequestError, match="not a cursor"):
            decode_cursor(cursor, other)


@pytest.mark.parametrize(
    "forged",
    [
        "",
        ".",
        "abc",
        "abc.",
        ".abc",
        "x.y.z",
        "\u00e9.\u00e9",
        "!!!!.????",
        encode_cursor(Position(3, 1.0, -1, 5), PARAMS)[:-2] + "AA",  # tag edited
        "WzMsMS4wLC0xLDZd." + encode_cursor(Position(3, 1.0, -1, 5), PARAMS).split(".")[1],  # payload edited
    ],
)
def test_forged_cursors_are_bad_request(forged):
    with pytest.raises(RequestError) as info:
        decode_cursor(forged, PARAMS)
    assert info.value.code == "bad_request"


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_any_bytes_give_a_request_or_a_coded_error(data):
    try:
        request = parse_request(data)
    except RequestError as exc:
        assert exc.code in CODES
    else:
        assert isinstance(request, Request)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@pytest.mark.untraced  # conftest.py: a property test; the named tests beside it reach its lines
@settings(max_examples=300)
@given(
    st.sampled_from(["ping", "sensors", "latest", "readings", "aggregate", "gaps", "stats", "x"]),
    st.dictionaries(
        st.sampled_from(["sensor", "metric", "since", "until", "limit", "order", "cursor", "bucket", "id", "zzz"]),
        json_values,
        max_size=5,
    ),
)
def test_any_request_shape_gives_a_request_or_a_coded_error(op, params):
    line = json.dumps({"op": op, **params}).encode()
    try:
        parse_request(line)
    except RequestError as exc:
        assert exc.code in CODES


NOW = 1_764_100_800.0  # 2025-11-25T20:00:00Z


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1700000000", 1700000000.0),
        ("1700000000.25", 1700000000.25),
        ("now", NOW),
        ("15m", NOW - 900),
        ("2h", NOW - 7200),
        ("7d", NOW - 7 * 86400),
        ("15m ago", NOW - 900),
        ("1h30m", NOW - 5400),
        ("2025-11-25T20:00:00Z", NOW),
        ("2025-11-25T21:00:00+01:00", NOW),
        ("2025-11-25 20:00", NOW),
        ("2025-11-25", NOW - 20 * 3600),
        ("2025-11-25T20:00:00.5Z", NOW + 0.5),
    ],
)
def test_parse_time(text, expected):
    assert parse_time(text, NOW) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "15x", "nan", "inf", "-5m", "2025-13-01", "5m5"])
def test_parse_time_refuses(text):
    with pytest.raises(ValueError, match="not a time|duration"):
        parse_time(text, NOW)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("300", 300),
        ("30s", 30),
        ("5m", 300),
        ("1h", 3600),
        ("1d", 86400),
        ("1.5", 1.5),
        ("1h30m", 5400),
        ("2W", 14 * 86400),
    ],
)
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["0", "-5", "5x", "m", "", "nan"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_human_time():
    assert human_time(NOW) == "2025-11-25T20:00:00Z"
    assert human_time(NOW + 0.25) == "2025-11-25T20:00:00.250Z"
    assert human_time(-20) == "1969-12-31T23:59:40Z"
    assert human_time(None) == ""


def test_an_id_beyond_ints_digit_limit_is_echoed_digit_for_digit():
    """Issue 13.6: a 5,000-digit integer id was bad_json ("Exceeds the limit (4300 digits)")."""
    from query.protocol import BigInt, encode_error, encode_result

    digits = "9" * 5000
    for text in (digits, "-" + digits):
        request = parse_request(b'{"op":"ping","id":' + text.encode() + b"}")
        assert type(request.id) is BigInt and request.id == text
        assert encode_result(request.id, {"a": 1}) == b'{"id":' + text.encode() + b',"ok":true,"result":{"a":1}}\n'
    nested = parse_request(b'{"op":"ping","id":{"n":[1,' + digits.encode() + b',"x"]}}')
    assert encode_result(nested.id, None) == b'{"id":{"n":[1,' + digits.encode() + b',"x"]},"ok":true,"result":null}\n'
    # Ordinary ids go through the same path unchanged.
    assert encode_error("\ud800", "bad_request", "m") == (
        b'{"id":"\\ud800","ok":false,"error":{"code":"bad_request","message":"m"}}\n'
    )
    assert json.loads(encode_result(4300 * 10**4299 // 10**4299, 1))["id"] == 4300


@pytest.mark.parametrize(
    "name,line",
    [
        ("limit", b'{"op":"readings","sensor":"s","limit":%s}'),
        ("since", b'{"op":"readings","sensor":"s","since":%s}'),
        ("bucket", b'{"op":"aggregate","sensor":"s","metric":"m","bucket":%s}'),
        ("sensor", b'{"op":"readings","sensor":%s}'),
    ],
)
def test_a_huge_integer_parameter_is_bad_request_naming_it(name, line):
    error = error_of(line % (b"1" * 5000))
    assert error.code == "bad_request" and f"'{name}'" in error.message
    assert "5000 digits" in error.message or "string" in error.message


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300)
@given(_json_values)
def test_responses_encode_the_same_values_as_the_json_module(value):
    """dump_json's fast path (msgspec) gives what json.dumps gives: the same values, floats
    bit-exact (-0.0 too), non-finite floats as null, ASCII only, ints of any size."""
    import struct

    from query.protocol import _finite, dump_json

    def exact(v):
        if isinstance(v, float):
            return ("f", struct.pack("<d", v))
        if isinstance(v, list):
            return [exact(x) for x in v]
        if isinstance(v, dict):
            return {k: exact(x) for k, x in v.items()}
        return v

    text = dump_json(value)
    assert text.isascii()
    reference = json.dumps(_finite(value), allow_nan=False, separators=(",", ":"))
    assert exact(json.loads(text)) == exact(json.loads(reference))
