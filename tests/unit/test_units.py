"""units: human sizes and durations in, bytes and seconds out, and back."""

from __future__ import annotations

import pytest

from orchestrator.units import format_bytes, format_duration, parse_duration, parse_memory


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512", 512),
        ("512b", 512),
        ("4k", 4096),
        ("512m", 512 * 1024**2),
        ("512MB", 512 * 1024**2),
        ("2g", 2 * 1024**3),
        ("1.5GiB", 3 * 1024**3 // 2),
        (" 2 g ", 2 * 1024**3),
        ("1t", 1024**4),
        (268435456, 268435456),
    ],
)
def test_parse_memory_reads_binary_multiples(text: str | int, size: int) -> None:
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["2x", "2i", "2ib", "g", "", "-1g", "1,5g", "2 gigs", 0, -5, 1.5, True, None])
def test_parse_memory_refuses_what_is_not_a_positive_size(text: object) -> None:
    with pytest.raises(ValueError, match=r"not a memory size|must be positive"):
        parse_memory(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("90s", 90.0),
        ("20m", 1200.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("500ms", 0.5),
        ("2d", 172800.0),
        ("1.5h", 5400.0),
        (45, 45.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration_reads_units_and_plain_numbers(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "20 minutes", "5min", "-5s", "1e3", "m", "", True, None, [1]])
def test_parse_duration_refuses_what_does_not_parse(text: object) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("value", [0, "0s", float("inf"), float("nan"), -1])
def test_parse_duration_refuses_durations_that_are_not_positive_and_finite(value: object) -> None:
    with pytest.raises(ValueError, match="positive and finite"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (256 * 1024**2, "256 MiB"), (64 * 1024**3, "64 GiB"),
     (2.5 * 1024**4, "2.5 TiB")],
)
def test_format_bytes_picks_the_largest_whole_unit(size: float, text: str) -> None:
    assert format_bytes(size) == text


@pytest.mark.parametrize(("seconds", "text"), [(0.42, "0.42s"), (12.34, "12.3s"), (75, "1m15s"), (3700, "1h01m")])
def test_format_duration_reads_like_a_stopwatch(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_memory_round_trips_through_its_text() -> None:
    assert parse_memory(format_bytes(256 * 1024**2).replace(" ", "")) == 256 * 1024**2
