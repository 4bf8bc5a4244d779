"""A node's table of resumable streams: windows, the memory cap, what it logs and counts."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import pytest

from tcpgc.metrics import Metrics
from tcpgc.protocol.resumable import Retention
from tcpgc.relay.resume_table import ResumeTable


@dataclass(eq=False)
class StubStream:
    """What the table reads of a `ResumableRelay`, and what it calls."""

    stream_id: bytes
    window: float
    kept: int = 0
    label: str = "stream"
    waiting_since: float | None = None
    expired: list[str] = field(default_factory=list)
    out: Retention = field(init=False)

    def __post_init__(self) -> None:
        self.out = Retention(sent=self.kept, kept=b"x" * self.kept)

    def expire(self, why: str) -> None:
        self.expired.append(why)


def table(cap: int = 1 << 30) -> tuple[ResumeTable, Metrics]:
    metrics = Metrics("ll")
    return ResumeTable(logging.getLogger("test.resume"), metrics, cap), metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else float(value)


def test_a_stream_not_resumed_within_its_window_is_given_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def run() -> None:
        resumes, metrics = table()
        slow, quick = StubStream(b"a" * 16, 0.05, label="slow"), StubStream(b"b" * 16, 5.0)
        for stream in (slow, quick):
            resumes.add(stream)  # type: ignore[arg-type]
            resumes.broken(stream, "data connection reset")  # type: ignore[arg-type]
        assert sample(metrics, "tcpgc_streams_waiting") == 2
        await asyncio.sleep(0.2)
        assert slow.expired == ["not resumed within 0.05 s"]
        assert quick.expired == []
        resumes.resumed(quick, "web", 0.1, 10)  # type: ignore[arg-type]
        assert sample(metrics, "tcpgc_streams_waiting") == 0
        assert sample(metrics, "tcpgc_resumes_failed_total", reason="window") == 1
        assert sample(metrics, "tcpgc_streams_resumed_total", service="web") == 1
        assert sample(metrics, "tcpgc_resume_replayed_bytes_total") == 10

    with caplog.at_level(logging.INFO, "test.resume"):
        asyncio.run(run())
    assert "slow not resumed within 0.05 s: closing it" in caplog.text
    assert "stream resumed after 0.10 s: 10 bytes replayed" in caplog.text


def test_past_the_memory_cap_the_oldest_waiting_stream_is_given_up() -> None:
    async def run() -> None:
        resumes, metrics = table(cap=250)
        streams = [StubStream(bytes([i]) * 16, 60.0, kept=100) for i in range(4)]
        for stream in streams:
            resumes.add(stream)  # type: ignore[arg-type]
            resumes.broken(stream, "reset")  # type: ignore[arg-type]
        # 400 bytes held against a cap of 250: the two oldest go, the newest stay.
        assert [bool(s.expired) for s in streams] == [True, True, False, False]
        assert resumes.held() == 200
        assert sample(metrics, "tcpgc_resumes_failed_total", reason="memory") == 2
        resumes.give_up_all("stopping")
        assert all(s.expired for s in streams)

    asyncio.run(run())


def test_a_forgotten_stream_is_neither_found_nor_timed() -> None:
    async def run() -> None:
        resumes, _ = table()
        stream = StubStream(b"c" * 16, 0.05)
        resumes.add(stream)  # type: ignore[arg-type]
        assert resumes.find(stream.stream_id) is stream
        resumes.broken(stream, "reset")  # type: ignore[arg-type]
        resumes.forget(stream)  # type: ignore[arg-type]
        await asyncio.sleep(0.1)
        assert resumes.find(stream.stream_id) is None and stream.expired == []

    asyncio.run(run())
