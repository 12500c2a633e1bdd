"""The one strict JSON reader (gateway/core/jsonbody.py): what it accepts it reads as Go would; what
two readers could read differently it refuses with a 400 naming the problem."""

from __future__ import annotations

import json

import pytest

from gateway.core.jsonbody import MAX_DEPTH, load_strict
from gateway.errors import BadRequest


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize(("raw", "value"), [
    (b'{"name":"web","n":1.5,"ok":true,"none":null}', {"name": "web", "n": 1.5, "ok": True, "none": None}),
    ('{"emoji":"\\ud83d\\ude00","é":"ü"}'.encode(), {"emoji": "\U0001f600", "é": "ü"}),
    (b' \n{"a":[1,2,{"b":"c"}]}\n ', {"a": [1, 2, {"b": "c"}]}),
    (b'"\\\\ud800"', "\\ud800"),  # an escaped backslash, not a surrogate
    (b"1e308", 1e308),
])
def test_what_every_reader_reads_alike_is_accepted(raw: bytes, value: object) -> None:
    assert load_strict(raw, fold=False) == value


def test_nesting_up_to_the_bound_is_accepted() -> None:
    assert load_strict(nested(MAX_DEPTH)) is not None
    with pytest.raises(BadRequest, match="too deeply"):
        load_strict(nested(MAX_DEPTH + 1))


def test_keys_are_case_folded_for_go_and_exact_otherwise() -> None:
    assert load_strict(b'{"Name":"web"}') == {"name": "web"}
    assert load_strict(b'{"Name":"web","name":"x"}', fold=False) == {"Name": "web", "name": "x"}
    with pytest.raises(BadRequest, match="'name' twice"):
        load_strict(b'{"Name":"web","name":"x"}')


@pytest.mark.parametrize(("raw", "named"), [
    (b"\xef\xbb\xbf{}", "byte order mark"),
    ("{}".encode("utf-16"), "not UTF-8"),
    ("{}".encode("utf-32"), "not UTF-8"),
    (b'{"a":"\xc3"}', "not UTF-8"),
    (b'{"a":"\\udc00"}', "lone surrogate"),
    (b'{"a":"\\ud800x"}', "lone surrogate"),
    (b'{"a":NaN}', "NaN"),
    (b'{"a":Infinity}', "Infinity"),
    (b'{"a":-Infinity}', "-Infinity"),
    (b'{"a":1e999}', "too large"),
    (b'{"a":1,"a":2}', "'a' twice"),
    (b'{"a":{"b":1,"b":1}}', "'b' twice"),
    (b'{"a":1}{"a":2}', "not valid JSON"),
    (b'{"a":1,}', "not valid JSON"),
    (b"", "not valid JSON"),
    (b'{"a":' + nested(100_000) + b"}", "too deeply"),
    (b'{"a":"' + b"1" * 5000 + b'"}x', "not valid JSON"),
])
def test_what_readers_could_read_differently_is_refused_by_name(raw: bytes, named: str) -> None:
    for fold in (True, False):
        with pytest.raises(BadRequest, match=named.replace("(", r"\(")) as refused:
            load_strict(raw, "the body", fold=fold)
        assert refused.value.message.startswith("the body ")


def test_a_huge_integer_is_a_400_not_a_500() -> None:
    with pytest.raises(BadRequest, match="not valid JSON"):
        load_strict(json.dumps({"a": 0}).replace("0", "9" * 5000).encode())
