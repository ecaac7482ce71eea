"""Hauler across emulated wide-area links (bench/netem.py): real delay, real rate, mutual TLS.

The server and two sites run as processes in their own network namespaces; each site reaches
the server's one address through its own linkemu link. Skipped where namespaces, TUN devices
or gcc are not available.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real processes, seconds each: `pytest -m 'not slow'` skips them

REPO = Path(__file__).resolve().parent.parent

from helpers import (  # noqa: E402
    assert_models_equal,
    hello_expected,
    hello_job,
    read_jsonl,
)

from bench import netem  # noqa: E402
from bench.netem import LinkSpec  # noqa: E402
from bench.wan import outcome, start_federation, stop, submit, write_kits  # noqa: E402
from hauler.core.config import ServerConfig, load_toml  # noqa: E402
from hauler.model.rounds import RoundStore  # noqa: E402

LINK = LinkSpec(delay_ms=20, rate_mbit=200)
PORT = 18199


@pytest.fixture(scope="module")
def emulation() -> None:
    """Skip unless links can be emulated here; build linkemu once."""
    reason = netem.unavailable()
    if reason:
        pytest.skip(reason)
    netem.build()


def connect_ms(topology: netem.Topology, site: str, times: int) -> list[float]:
    """Milliseconds for each of TIMES TCP connects from SITE to the server: one round trip each."""
    elapsed = []
    with netem.socket_in(topology.server) as listener:
        listener.bind((netem.SERVER_ADDRESS, PORT))
        listener.listen(times)
        for _ in range(times):
            with netem.socket_in(topology.sites[site]) as client:
                started = time.perf_counter()
                client.connect((netem.SERVER_ADDRESS, PORT))
                elapsed.append((time.perf_counter() - started) * 1e3)
    return elapsed


def test_a_tcp_connect_across_the_link_takes_a_round_trip(emulation):
    with netem.wan({"site-1": LinkSpec(delay_ms=40, rate_mbit=100)}) as topology:
        rtts = connect_ms(topology, "site-1", times=3)
    assert min(rtts) >= 80.0, rtts
    assert max(rtts) < 80.0 + 50.0, (
        rtts
    )  # the emulator adds little beyond the delay it is asked for
    assert topology.links["site-1"].stats["a_to_b"]["packets"] >= 3


def test_a_two_site_job_finishes_correctly_over_emulated_links_with_mutual_tls(emulation, tmp_path):
    links = {"site-1": LINK, "site-2": LINK}
    kits = write_kits(tmp_path, list(links), timeouts={}, dataplane={})
    assert load_toml(ServerConfig, kits / "server" / "server.toml").tls is not None
    job_dir = hello_job(
        tmp_path, rounds=1, min_clients=2, wait_s=5.0, arrays=3, array_bytes=1 << 20
    )
    with netem.wan(links) as topology:
        processes = start_federation(topology, kits, tmp_path)
        try:
            job_id, _ = submit(topology, kits, job_dir, tmp_path, timeout_s=60.0)
        finally:
            stop(processes)
    server_job = kits / "server" / "workspace" / "jobs" / job_id
    assert outcome(server_job) == ("job.finished", ""), (tmp_path / "server.log").read_text()[
        -3000:
    ]
    with RoundStore(server_job, keep_rounds=2).open(1) as model:
        assert_models_equal(model.arrays(), hello_expected(job_dir, rounds=1))
    sites = [row for row in read_jsonl(server_job / "metrics.jsonl") if row.get("kind") == "site"]
    assert sorted(row["site"] for row in sites) == ["site-1", "site-2"]
    for (
        row
    ) in sites:  # every transfer crossed the link: at least one round trip, and all model bytes
        assert (
            row["download_s"] >= 2 * LINK.delay_ms / 1e3
            and row["upload_s"] >= 2 * LINK.delay_ms / 1e3
        )
        assert row["download"]["bytes"] == row["upload"]["bytes"] == 3 << 20
    for link in topology.links.values():
        assert link.stats["a_to_b"]["bytes"] > 3 << 20 and link.stats["b_to_a"]["bytes"] > 3 << 20
