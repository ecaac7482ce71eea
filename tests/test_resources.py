"""A process's own CPU and memory readings: RssAnon follows anonymous memory that is touched,
CPU follows work, the meter samples on its own pace, and the server's recorder puts samples
into the metrics of the jobs their processes take part in."""

from __future__ import annotations

import asyncio
import math
import mmap
import subprocess
import sys
import time

from hauler.core.events import JsonLines, read_json_lines
from hauler.core.resources import ProcessMeter, ResourceSample, rss_anon_bytes
from hauler.server.resources import MAX_CLOCK_SKEW_S, ResourceRecorder
from hauler.server.sites import SiteRegistry

MIB = 1 << 20


def test_rss_anon_grows_when_anonymous_memory_is_touched_and_shrinks_when_freed():
    before = rss_anon_bytes()
    block = mmap.mmap(
        -1, 64 * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    )  # not resident until touched
    assert rss_anon_bytes() - before < 16 * MIB
    for offset in range(0, 64 * MIB, mmap.PAGESIZE):
        block[offset] = 1
    touched = rss_anon_bytes()
    assert touched - before >= 60 * MIB
    block.close()
    assert touched - rss_anon_bytes() >= 60 * MIB


def test_meter_reads_this_process():
    meter = ProcessMeter()
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # burn CPU so the next reading sees it
        pass
    sample = meter.read()
    assert abs(sample.t - time.time()) < 5
    assert sample.cpu_percent > 10
    assert sample.rss_bytes >= sample.rss_anon_bytes > 0
    assert sample.record("site-1") == {
        "kind": "resources",
        "process": "site-1",
        **sample.model_dump(),
    }


def test_collect_samples_every_interval_across_calls():
    async def collect() -> list[list[ResourceSample]]:
        meter = ProcessMeter(interval_s=0.1)  # in the loop: its ticks count from the first call
        return [await meter.collect(0.25) for _ in range(4)]  # 1 s in all, in pieces off the tick

    batches = asyncio.run(collect())
    times = [sample.t for batch in batches for sample in batch]
    # 10 ticks; a stall of the loop (a loaded machine; a full GC, about 0.2 s in a worker that
    # imported torch) makes a tick late, and one more than an interval late skips the ticks it
    # missed: an 80 ms stall made gaps of 0.18 and 0.02 s. One reading a call would be 4.
    assert 6 <= len(times) <= 11, times
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(0 <= gap < 0.5 for gap in gaps), gaps
    assert (times[-1] - times[0]) / len(gaps) > 0.075, gaps  # never more often than the interval


def sample_at(t: float) -> ResourceSample:
    return ResourceSample(t=t, cpu_percent=1.0, rss_bytes=2048, rss_anon_bytes=1024)


async def test_recorder_keeps_a_job_s_samples_within_its_span_once_and_late_ones_within_grace(
    tmp_path,
):
    sites = SiteRegistry()
    in_job, _ = await sites.join("site-1", "", None), await sites.join("site-2", "", None)
    recorder = ResourceRecorder(sites, grace_s=0.3)
    metrics = tmp_path / "metrics.jsonl"
    recorder.open("job", JsonLines(metrics))
    in_job.deployed_jobs.add("job")
    await asyncio.sleep(1.01 - time.time() % 1)  # early in a second: the replays stay within it
    during = time.time()
    recorder.record(
        "site-1", [sample_at(during - 60), sample_at(during)]
    )  # the first is from before the job
    recorder.record("site-2", [sample_at(during)])  # not part of the job
    recorder.record("server", [sample_at(during)])
    recorder.record(
        "server", [sample_at(during), *(sample_at(during + k / 1000) for k in range(100))]
    )  # replayed
    recorder.record(
        "site-1", [sample_at(during + 60), sample_at(during + 3600)]
    )  # dated in the future
    await asyncio.sleep(
        math.floor(during) + 1.05 - time.time()
    )  # one sample per second of the server's clock
    before_end = time.time()
    recorder.close("job")
    in_job.deployed_jobs.discard("job")  # the job ended on the site too
    recorder.record(
        "site-1", [sample_at(before_end), sample_at(time.time() + 1)]
    )  # late; the second after the end
    await asyncio.sleep(0.5)
    recorder.record(
        "site-1", [sample_at(before_end)]
    )  # later than the grace: the metrics are closed
    assert [(r["process"], r["t"]) for r in read_json_lines(metrics)] == [
        ("site-1", during),
        ("server", during),
        ("site-1", before_end),
    ]


async def test_a_site_sending_samples_as_fast_as_it_can_gets_one_a_second_into_the_job(tmp_path):
    """Future-dated samples and floods do not grow a job's metrics faster than real time."""
    sites = SiteRegistry()
    (await sites.join("site-1", "", None)).deployed_jobs.add("job")
    recorder = ResourceRecorder(sites, grace_s=0)
    started = time.time()
    recorder.open("job", JsonLines(tmp_path / "metrics.jsonl"))
    while time.time() - started < 2.0:
        now = time.time()
        recorder.record(
            "site-1", [sample_at(now + k / 10) for k in range(-50, 100)]
        )  # 15 s of samples
        await asyncio.sleep(0.01)
    recorder.close("job")
    ended = time.time()  # about started + 2 s; later if the machine stalled the loop
    kept = [r["t"] for r in read_json_lines(tmp_path / "metrics.jsonl")]
    seconds = math.floor(ended + MAX_CLOCK_SKEW_S) - math.floor(started) + 1
    assert 1 <= len(kept) <= seconds  # one in each second elapsed, and of the skew allowed
    assert all(started <= t <= ended + MAX_CLOCK_SKEW_S for t in kept)
    assert len({math.floor(t) for t in kept}) == len(kept)


def test_a_meter_of_children_adds_up_the_processes_it_started():
    """A site's samples include its training code run as child processes."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nblock = bytearray(200 << 20)\n"
            "block[::4096] = b'x' * len(block[::4096])\nprint('ready', flush=True)\ntime.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        with_children, alone = ProcessMeter(children=True).read(), ProcessMeter().read()
        assert with_children.rss_anon_bytes - alone.rss_anon_bytes > 150 << 20
    finally:
        child.kill()
        child.wait()
    assert ProcessMeter(children=True).read().rss_anon_bytes < alone.rss_anon_bytes + (
        50 << 20
    )  # gone with it
