"""`parse_duration` / `format_duration`: the duration syntax of DESIGN section 9 (`90s`, `15m`, `1h`, `30d`)."""

from __future__ import annotations

import pytest

from gateway.durations import format_duration, parse_duration

MINUTE, HOUR, DAY, WEEK = 60, 3600, 86400, 7 * 86400


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("1s", 1),
        ("15m", 15 * MINUTE),
        ("1h", HOUR),
        ("36h", 36 * HOUR),
        ("30d", 30 * DAY),
        ("90d", 90 * DAY),
        ("2w", 2 * WEEK),
        ("1h30m", 5400),
        ("1h 30m", 5400),
        ("1d12h", 36 * 3600),
        ("2w3d4h5m6s", 2 * WEEK + 3 * DAY + 4 * 3600 + 5 * 60 + 6),
        ("3600", 3600),  # a bare number is seconds
        ("7", 7),
        (" 15m ", 15 * MINUTE),
        ("15 m", 15 * MINUTE),
        ("007s", 7),
        ("100000d", 100000 * DAY),
    ],
)
def test_parse_duration_accepts(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("value", "seconds"), [(1, 1), (3600, 3600), (90.0, 90), (2592000, 2592000)])
def test_parse_duration_numbers_are_seconds(value: int | float, seconds: int) -> None:
    result = parse_duration(value)
    assert result == seconds
    assert type(result) is int


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "abc",
        "h",
        "s15",
        "0s",
        "0",
        "0d",
        "00m",
        "-5s",
        "-5",
        "+5s",
        "1.5h",
        "1H",  # units are lower case
        "15M",
        "10x",
        "1y",
        "30m1h",  # compound: largest unit first
        "1h1h",  # each unit once
        "1h30",  # every number has its unit
        "15 minutes",
        "1e3",
        "P1D",
        "15mm",
        "s",
    ],
)
def test_parse_duration_rejects_text(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    # The message names the input and shows how to write one.
    message = str(info.value)
    assert repr(text) in message
    if text.strip() not in ("0", "0s", "0d", "00m"):
        assert "30d" in message


@pytest.mark.parametrize("value", [0, -1, -3600, 0.0, -0.5, True, False])
def test_parse_duration_rejects_non_positive_and_bool(value: int | float | bool) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_parse_duration_fraction_of_a_second_is_not_zero() -> None:
    # A positive input must never come back as a zero-second duration (every other way of
    # writing zero is rejected); either refuse it or round it up.
    try:
        seconds = parse_duration(0.5)
    except ValueError:
        return
    assert seconds > 0


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_parse_duration_rejects_non_finite_numbers_with_value_error(value: float) -> None:
    # YAML reads `.inf` / `.nan` as floats; callers (the config loader) turn ValueError into a
    # message naming the key, so anything else escapes as a crash.
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (1, "1s"),
        (59, "59s"),
        (60, "1m"),
        (90, "90s"),
        (900, "15m"),
        (5400, "90m"),
        (3600, "1h"),
        (3660, "61m"),
        (3601, "3601s"),
        (86400, "1d"),
        (90000, "25h"),
        (2592000, "30d"),
        (7776000, "90d"),
        (604800, "7d"),
        (1209600, "14d"),
        (91 * DAY, "91d"),
    ],
)
def test_format_duration(seconds: int, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [1, 59, 60, 61, 90, 3599, 3600, 5400, 86399, 86400, 90000, 604800,
                                     2592000, 7776000, 31536000, 123456789])
def test_format_then_parse_round_trips(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["90s", "15m", "1h", "30d", "2w", "36h", "61m"])
def test_parse_then_format_round_trips(text: str) -> None:
    assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)
