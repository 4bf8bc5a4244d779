"""Token buckets and the limits a relay answers to, with time as a parameter; the
throttle of one direction with a stand-in source; the rate keys of the LL's config and
what `tcpgc check` says of bad ones."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from unittest.mock import MagicMock

import pytest

from tcpgc.config import Address, LLConfig, ServiceListener, ll_config_from
from tcpgc.errors import UsageError
from tcpgc.ll.agents import AgentSession
from tcpgc.ll.clients import UNLIMITED, Clients, Service
from tcpgc.metrics import Metrics
from tcpgc.ops.check import run_check
from tcpgc.rates import MIN_RATE
from tcpgc.relay.rate_limit import (
    MAX_WAIT,
    MIN_BURST,
    RateLimits,
    Throttle,
    TokenBucket,
    admit,
    combine,
)

MBIT = 1_000_000


def test_a_new_bucket_lets_its_burst_through_then_asks_to_wait_for_the_debt() -> None:
    bucket = TokenBucket(80 * MBIT, now=0.0)  # 10 MB/s
    assert bucket.burst == 500_000  # 50 ms worth
    assert bucket.take(500_000, now=0.0) == 0.0
    # 100 kB more is owed: 10 ms at 10 MB/s.
    assert bucket.take(100_000, now=0.0) == pytest.approx(0.010)
    # 10 ms later the debt is paid, and nothing is held yet.
    assert bucket.take(0, now=0.010) == 0.0
    assert bucket.level == pytest.approx(0.0)


def test_the_bucket_refills_at_its_rate_up_to_its_burst_only() -> None:
    bucket = TokenBucket(8 * MBIT, now=0.0)  # 1 MB/s, burst 50 kB
    bucket.take(50_000, now=0.0)
    assert bucket.take(20_000, now=0.020) == 0.0  # 20 kB came back in 20 ms
    # A long idle time refills only the burst: 50 kB now, then 10 ms per 10 kB.
    assert bucket.take(60_000, now=100.0) == pytest.approx(0.010)


def test_over_time_the_bucket_moves_its_rate() -> None:
    """A sender that moves 64 KiB whenever the bucket lets it moves the rate, plus one
    burst, whatever the size of its reads."""
    bucket = TokenBucket(80 * MBIT, now=0.0)
    now, moved = 0.0, 0
    while now < 10.0:
        moved += 65536
        now += bucket.take(65536, now)
    assert moved == pytest.approx(10.0 * 10_000_000 + bucket.burst, rel=0.01)


def test_a_slow_rate_keeps_a_burst_of_16_kib() -> None:
    bucket = TokenBucket(120_000, now=0.0)  # 15 kB/s: 50 ms would be 750 bytes
    assert bucket.burst == MIN_BURST
    assert bucket.take(MIN_BURST, now=0.0) == 0.0
    assert bucket.take(15_000, now=0.0) == pytest.approx(1.0)


def test_reconfigure_changes_the_rate_and_keeps_the_debt() -> None:
    bucket = TokenBucket(80 * MBIT, now=0.0)
    bucket.take(600_000, now=0.0)  # 100 kB owed
    bucket.reconfigure(8 * MBIT)  # 1 MB/s: the same debt takes 100 ms to pay
    assert bucket.burst == 50_000
    assert bucket.take(0, now=0.0) == pytest.approx(0.100)
    bucket.reconfigure(800 * MBIT)
    assert bucket.take(0, now=0.0) == pytest.approx(0.001)
    with pytest.raises(ValueError):
        bucket.reconfigure(0)


def test_a_full_bucket_reconfigured_smaller_holds_the_new_burst_only() -> None:
    bucket = TokenBucket(800 * MBIT, now=0.0)
    bucket.reconfigure(8 * MBIT)
    assert bucket.take(50_000, now=0.0) == 0.0
    assert bucket.take(10_000, now=0.0) == pytest.approx(0.010)


def test_limits_combine_per_direction_and_none_is_no_limit() -> None:
    service = RateLimits.of(80 * MBIT)
    client = RateLimits.of(10 * MBIT)
    both = service + client
    assert both.up == (service.up[0], client.up[0])
    assert both.down == (service.down[0], client.down[0])
    assert service.up[0] is not service.down[0]  # each direction has its own
    assert service + None is service
    assert None + service is service
    assert combine(None, None) is None
    assert combine(None, client, None) == client
    assert combine(service, client, None) == both


def test_limits_reconfigure_every_bucket() -> None:
    limits = RateLimits.of(80 * MBIT)
    limits.reconfigure(10 * MBIT)
    assert [b.bits_per_s for b in limits.up + limits.down] == [10 * MBIT, 10 * MBIT]


class _Source:
    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0
        self.resumed = asyncio.Event()

    def pause(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume(self) -> None:
        self.paused = False
        self.resumed.set()


def _fire(throttle: Throttle) -> None:
    """The throttle's timer, run now, its debt paid: time is not what these tests are
    about."""
    assert throttle.timer is not None
    throttle.timer.cancel()
    for bucket in throttle.buckets:
        bucket.level = bucket.burst
    throttle._due()


def test_throttle_pauses_its_source_for_the_slowest_bucket_and_counts_the_pause() -> None:
    async def main() -> None:
        source, hits = _Source(), []
        fast, slow = TokenBucket(800 * MBIT), TokenBucket(8 * MBIT)  # bursts 5 MB, 50 kB
        throttle = Throttle([fast, slow], source.pause, source.resume, lambda: hits.append(1))
        throttle.moved(50_000)
        assert not source.paused and not throttle.waiting
        throttle.moved(5_000)  # 5 ms owed to the slow bucket
        assert source.paused and throttle.waiting and hits == [1]
        throttle.moved(5_000)  # read before the pause took: 10 ms owed, still one pause
        assert hits == [1] and source.pauses == 1
        await asyncio.wait_for(source.resumed.wait(), 2)
        assert not throttle.waiting

    asyncio.run(main())


def test_back_pressure_and_the_rate_do_not_lift_each_others_pause() -> None:
    async def main() -> None:
        source = _Source()
        throttle = Throttle([TokenBucket(8 * MBIT)], source.pause, source.resume)
        throttle.moved(60_000)  # 10 ms owed
        throttle.block()  # and the destination is full
        _fire(throttle)
        assert source.paused, "the rate's end resumed a source back-pressure holds"
        throttle.unblock()
        assert not source.paused
        throttle.moved(60_000)
        throttle.block()
        throttle.unblock()
        assert source.paused, "back-pressure's end resumed a source the rate holds"
        throttle.stop()
        assert throttle.timer is None
        throttle.unblock()
        assert source.paused, "a stopped throttle resumed its source"

    asyncio.run(main())


def test_a_lifted_limit_frees_a_paused_source_soon() -> None:
    """A reload that lifts a limit frees a source paused for a long debt within
    MAX_WAIT, not after what the old rate made it owe."""

    async def main() -> None:
        source = _Source()
        bucket = TokenBucket(MIN_RATE)  # 15 kB/s
        throttle = Throttle([bucket], source.pause, source.resume)
        throttle.moved(16_384 + 150_000)  # 10 s owed at that rate
        assert source.paused
        bucket.reconfigure(10**15)  # lifted
        await asyncio.wait_for(source.resumed.wait(), MAX_WAIT + 1)
        assert not source.paused

    asyncio.run(main())


def _ll(text_services: dict[str, object], **top: object) -> dict[str, object]:
    return {"cc": "127.0.0.1:0", "services": text_services, **top}


def test_config_reads_rates_in_bits_per_second() -> None:
    config = ll_config_from(
        _ll(
            {
                "web": {"clients": "127.0.0.1:0", "rate_limit": "80Mbit"},
                "ssh": {"clients": "127.0.0.1:0", "client_rate_limit": "1.5 Mbit/s"},
                "free": {"clients": "127.0.0.1:0"},
            },
            client_rate_limit="10Mbit",
        ),
        "ll.toml",
    )
    assert config.services["web"].rate_limit == 80 * MBIT
    assert config.services["free"].rate_limit is None
    assert config.client_rate_of("web") == 10 * MBIT  # the top-level default
    assert config.client_rate_of("ssh") == 1_500_000  # its own
    assert ll_config_from(_ll({"a": {"clients": ":0"}}), "x").client_rate_of("a") is None


@pytest.mark.parametrize(
    ("where", "value"),
    [("service", "80MB"), ("service", 80_000_000), ("client", "1kbit"), ("top", "fast")],
)
def test_a_bad_rate_is_one_problem_naming_its_key(where: str, value: object) -> None:
    service: dict[str, object] = {"clients": "127.0.0.1:0"}
    top: dict[str, object] = {}
    if where == "service":
        service["rate_limit"] = value
        key = "services.web.rate_limit"
    elif where == "client":
        service["client_rate_limit"] = value
        key = "services.web.client_rate_limit"
    else:
        top["client_rate_limit"] = value
        key = "client_rate_limit"
    with pytest.raises(UsageError) as caught:
        ll_config_from(_ll({"web": service}, **top), "ll.toml")
    lines = caught.value.args[0].splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"ll.toml: {key}: ")


def test_check_reports_a_bad_rate_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ll.toml"
    path.write_text(
        'cc = "127.0.0.1:0"\n[services.web]\nclients = "127.0.0.1:0"\nrate_limit = "80 MB"\n'
    )
    assert run_check(path, "ll") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"tcpgc: {path}:4: services.web.rate_limit: expected a rate")
    path.write_text(path.read_text().replace("80 MB", "80 Mbit"))
    assert run_check(path, "ll") == 0


def test_a_reload_reconfigures_a_service_buckets_in_place() -> None:
    listener = ServiceListener(Address("127.0.0.1", 0), rate_limit=80 * MBIT)
    service = Service("web", listener, cast(Any, None), listener.listen)
    held = service.limits
    assert held is not None
    service.reconfigure(replace(listener, rate_limit=10 * MBIT))
    assert service.limits is held  # the clients being relayed hold these buckets
    assert [b.bits_per_s for b in held.up + held.down] == [10 * MBIT, 10 * MBIT]
    service.reconfigure(replace(listener, rate_limit=None))
    assert service.limits is None
    assert all(b.bits_per_s >= UNLIMITED for b in held.up + held.down)  # lifted for them
    service.reconfigure(listener)
    assert service.limits is not None and service.limits is not held
    assert service.limits.up[0].bits_per_s == 80 * MBIT


def test_a_client_answers_to_its_service_its_own_limit_and_its_agent() -> None:
    async def main() -> None:
        web = ServiceListener(Address("127.0.0.1", 0), rate_limit=80 * MBIT)
        free = ServiceListener(Address("127.0.0.1", 0))
        config = LLConfig(services={"web": web, "free": free}, client_rate_limit=10 * MBIT)
        services = {
            name: Service(name, listener, cast(Any, None), listener.listen)
            for name, listener in config.services.items()
        }
        clients = Clients(
            services, pairing=cast(Any, None), ready=cast(Any, None),
            resumes=cast(Any, SimpleNamespace(config=config)), metrics=Metrics("ll", False),
            tasks=cast(Any, None),
        )  # fmt: skip
        agent = AgentSession("a", "127.0.0.1:1", "127.0.0.1", ("web",), MagicMock())
        first, second = (clients._limits(services["web"], agent) for _ in range(2))
        assert first is not None and second is not None
        assert first.up[0] is second.up[0]  # the service's bucket: shared
        assert first.up[1] is not second.up[1]  # each client's own
        assert [b.bits_per_s for b in first.up] == [80 * MBIT, 10 * MBIT]
        assert first.on_limited is not None
        agent.rate = RateLimits.of(5 * MBIT)
        third = clients._limits(services["web"], agent)
        assert third is not None and third.down[-1] is agent.rate.down[0]
        config.client_rate_limit = None
        agent.rate = None
        assert clients._limits(services["free"], agent) is None  # no cost at all

    asyncio.run(main())


def test_admit_polices_datagrams_without_debt() -> None:
    """A datagram fits in every bucket or is refused whole; a refusal takes nothing."""
    fast, slow = TokenBucket(8_000_000, now=0.0), TokenBucket(400_000, now=0.0)
    burst = int(slow.burst)  # 16 KiB: the slow one's burst is the floor
    assert admit((fast, slow), burst, 0.0)
    assert not admit((fast, slow), 1, 0.0)  # the slow bucket is empty
    assert fast.level == fast.burst - burst  # and the refusal took nothing from either
    assert slow.level == 0
    assert admit((fast, slow), 5000, 0.1)  # 0.1 s at 50 kB/s refilled 5,000 bytes
    assert not admit((fast, slow), 1, 0.1)
