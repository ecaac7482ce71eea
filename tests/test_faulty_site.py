"""A site that fails mid-upload, or lies about its result, leaves the aggregate exact.

A real server and one real site (site-1) run as processes. The test plays site-2, with
site-2's own startup kit (mutual TLS) and Hauler's own pieces (the control channel, the
data plane, frames): it downloads the model, writes 1e6 everywhere, announces a manifest,
then breaks its upload part-way in one of several ways, or announces a hostile manifest.
Chunks it sent were folded as they landed, so the server must refold the round from
site-1 alone: the final model must equal initial + rounds x increment exactly, with no
trace of 1e6."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w
from helpers import (
    REPO,
    assert_models_equal,
    edit_configs,
    federation,
    hauler,
    hello_expected,
    hello_job,
    ok,
    read_jsonl,
    submitted_job_id,
)
from safetensors.numpy import load_file

from hauler.core.config import SiteConfig, load_toml
from hauler.core.errors import HaulerError
from hauler.core.messages import (
    EndJob,
    Evaluated,
    Hello,
    ResultReady,
    Task,
    UploadReady,
    Welcome,
    encode,
    parse_server_message,
)
from hauler.model import ChunkPlan, Manifest, ModelFile, chunk_checksum
from hauler.transfer import FileSink, FrameHeader, Kind, ReceiveLedger, control_frame
from hauler.transport import (
    Connection,
    ControlChannel,
    DataAddress,
    fetch_model,
    open_transfer,
)

pytestmark = pytest.mark.slow  # real processes, seconds each: `pytest -m 'not slow'` skips them

# The server waits communication_timeout for a broken upload to resume before it gives up on it.
FAST = {"communication_timeout": 2, "streaming_read_timeout": 5, "streaming_ack_wait": 5}
CHUNK_BYTES = 16384
LANES = 2  # the model is 25 chunks; the faulty site sends every one on lane 0
GARBAGE = 1e6
MODES = ["drop_connection", "cancel_session", "corrupt_chunk", "bad_digest"]


def shifted(
    manifest: Manifest, *, shape: tuple[int, ...] | None = None, length_delta: int = 0
) -> dict:
    """`manifest`'s JSON with its first tensor's shape and/or length changed."""
    data = manifest.to_json()
    first = data["tensors"][0]
    first[2], first[4] = list(shape or first[2]), first[4] + length_delta
    return data


HOSTILE_MANIFESTS = {  # what a lying site may announce in ResultReady
    "length_beyond_shape": lambda m: shifted(m, length_delta=8),
    "2**50_elements": lambda m: shifted(
        m, shape=(1 << 50,), length_delta=(4 << 50) - m.tensors[0].length
    ),
    "another_layout": lambda m: Manifest.build(
        [(t.name, t.dtype, (t.length // 4 + 1,)) for t in m.tensors], m.chunk_bytes
    ).to_json(),
}
HOSTILE_WEIGHTS = {
    "weight_infinity": float("inf"),
    "weight_nan": float("nan"),
    "weight_1e300": 1e300,
    "weight_negative": -1.0,
}
POISONED_VALUES = {  # tensor -> value; the other tensors hold GARBAGE, as in every mode
    "nan_in_a_tensor": {"array_2": float("nan")},
    "inf_in_a_tensor": {"array_1": float("-inf")},
    "update_far_above_max_update_norm": {"array_0": 1e30, "array_3": 1e30},
}
MAX_UPDATE_NORM = 10.0  # set in the job of the norm mode only: honest updates are far below it,
# and GARBAGE is far above it, so with it set a NaN's refusal would race the norm's
FAULTY_KIT = "faulty-site-2"  # not site-*: `hauler poc start` leaves it to the test


@pytest.fixture(scope="module")
def poc(tmp_path_factory):
    """Kits for a server, site-1 and site-2, with short timeouts and small chunks; the
    server and site-1 run as processes, site-2's kit is kept aside for the test."""
    workspace = tmp_path_factory.mktemp("faulty") / "poc"

    def configure(workspace: Path) -> None:
        edit_configs(workspace, "timeouts", FAST)
        edit_configs(
            workspace,
            "dataplane",
            {"chunk_bytes": CHUNK_BYTES, "window_bytes": 4 * CHUNK_BYTES, "connections": LANES},
        )
        (workspace / "site-2").rename(workspace / FAULTY_KIT)

    with federation(workspace, sites=2, configure=configure):
        yield workspace


class FaultySite:
    """site-2: downloads the global model, fills it with 1e6, then misbehaves per `mode`: one of
    MODES (breaks its upload), HOSTILE_MANIFESTS (lies in ResultReady) or bad_digest_then_resume."""

    def __init__(self, workspace: Path, folder: Path, mode: str) -> None:
        config = load_toml(SiteConfig, workspace / FAULTY_KIT / "site.toml")
        self.host, self.control_port, self.data_port = (
            config.server_host,
            config.control_port,
            config.data_port,
        )
        self.tls, self.timeouts = config.tls, config.timeouts
        self.address = DataAddress(
            config.server_host, config.data_port, config.tls, config.dataplane
        )
        self.folder, self.mode = folder, mode
        self.connected = asyncio.Event()
        self.results: dict[str, tuple[ModelFile, Manifest]] = {}
        self.downloads = self.upload_requests = self.broken_uploads = 0

    async def run(self) -> None:
        channel = ControlChannel(self.host, self.control_port, self.tls)
        stream = channel.session()
        try:
            await stream.send(encode(Hello(site="site-2")))
            assert isinstance(parse_server_message(await stream.receive() or {}), Welcome)
            self.connected.set()
            while (raw := await stream.receive()) is not None:
                message = parse_server_message(raw)
                if isinstance(message, Task):
                    await self.train(stream, message)
                elif isinstance(message, UploadReady):
                    await self.upload(message)
                    if self.mode == "cancel_session":
                        return  # the site vanishes, control session and all
                elif isinstance(message, EndJob):
                    return
        finally:
            stream.cancel()
            await channel.close()
            for model, _ in self.results.values():
                model.close()

    async def train(self, stream, task: Task) -> None:
        manifest = Manifest.from_json(task.manifest)
        model = ModelFile.create(self.folder / f"{task.task_id}.safetensors", manifest)
        plan = ChunkPlan(manifest)
        await fetch_model(
            self.address,
            task.download,
            ReceiveLedger(plan, task.lanes),
            FileSink(model, plan),
            timeouts=self.timeouts,
        )
        self.downloads += 1
        if self.mode == "metrics_for_a_model":  # answers a training task as an evaluation
            await stream.send(encode(Evaluated(task_id=task.task_id, metrics={"accuracy": 1.0})))
            return
        honest = model.compute_digests()
        for array in model.arrays().values():
            array[...] = GARBAGE
        announced = model.compute_digests()
        if self.mode.startswith("bad_digest"):  # the first tensor's digest is not that of its data
            announced = announced.with_digests(
                [honest.tensors[0].digest] + [t.digest for t in announced.tensors[1:]]
            )
        self.results[task.task_id] = (model, announced)
        if self.mode in POISONED_VALUES:
            for name, value in POISONED_VALUES[self.mode].items():
                model.arrays()[name][...] = value
            announced = model.compute_digests()
        lie = HOSTILE_MANIFESTS.get(self.mode)
        claim = announced.to_json() if lie is None else lie(announced)
        result = json.loads(
            encode(ResultReady(task_id=task.task_id, weight=1000.0, manifest=claim))
        )
        await stream.send(
            {**result, "weight": HOSTILE_WEIGHTS.get(self.mode, 1000.0)}
        )  # as JSON allows

    async def upload(self, message: UploadReady) -> None:
        self.upload_requests += 1
        model, manifest = self.results[message.task_id]
        lane = list(
            manifest.chunks()
        )  # lane 0 carries every chunk, in plan order; the other lanes stay idle
        connection, _ = await self.dial(message.upload, 0)
        try:
            if self.mode in ("drop_connection", "cancel_session"):
                await send_and_wait_for_acks(connection, model, lane[:10])
                header, payload = frame(model, lane[10])
                connection.write(header + payload[: len(payload) // 2])  # half a chunk, then gone
            elif self.mode == "corrupt_chunk":
                await send_and_wait_for_acks(connection, model, lane[:10])
                header, payload = frame(model, lane[10])
                connection.write(header + payload[:-1] + bytes([payload[-1] ^ 0xFF]))
                await wait_for_hang_up(connection)
            elif self.mode in POISONED_VALUES:  # every chunk, each with its right checksum
                connection.write(b"".join(b"".join(frame(model, chunk)) for chunk in lane))
                await wait_for_hang_up(connection)
            elif self.mode.startswith("bad_digest"):  # every chunk of the first tensor
                plan = ChunkPlan(manifest)
                first_tensor = [c for c in lane if any(p.tensor == 0 for p in plan.pieces(c))]
                await send_and_wait_for_acks(connection, model, first_tensor[:-1])
                connection.write(b"".join(frame(model, first_tensor[-1])))
                await wait_for_hang_up(connection)
            self.broken_uploads += 1
        finally:
            connection.abort()
        if self.mode == "bad_digest_then_resume":  # come back and finish, as if nothing happened
            connection, held = await self.dial(message.upload, 0)
            try:
                await send_and_wait_for_acks(connection, model, lane[held:])
                connection.write(control_frame(Kind.END))
            finally:
                connection.close()

    async def dial(self, transfer_id: str, lane: int) -> tuple[Connection, int]:
        """A connection to one lane of a transfer, and how many of its chunks the server holds."""
        connection = await open_transfer(
            self.host, self.data_port, transfer_id, lane=lane, tls=self.tls
        )
        start = await connection.next_frame()
        assert start.header.kind is Kind.ACK
        return connection, start.header.seq


def frame(model: ModelFile, chunk) -> tuple[bytes, bytes]:
    payload = bytes(model.chunk_view(chunk))
    header = FrameHeader.data(chunk.seq, chunk.length, chunk_checksum(memoryview(payload)))
    return header.encode(), payload


async def send_and_wait_for_acks(connection: Connection, model: ModelFile, chunks) -> None:
    """Send `chunks` and wait until the server acknowledged (so folded) every one (lane 0 carries
    the chunks in plan order, so the count it acknowledges is the next chunk's seq)."""
    if not chunks:
        return
    for chunk in chunks:
        connection.write(b"".join(frame(model, chunk)))
    while True:
        ack = await connection.next_frame()
        assert ack.header.kind is Kind.ACK
        if ack.header.seq == chunks[-1].seq + 1:
            return


async def wait_for_hang_up(connection: Connection) -> None:
    with pytest.raises(HaulerError):
        while True:
            await connection.next_frame()


async def run_job_with_faulty_site(
    workspace: Path, job: Path, faulty: FaultySite
) -> tuple[int, str, str]:
    site = asyncio.create_task(faulty.run())
    try:
        await asyncio.wait_for(faulty.connected.wait(), 30)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "hauler",
            "submit",
            str(job),
            "--workspace",
            str(workspace),
            "--wait",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, "COLUMNS": "200"},
            cwd=REPO,
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        return process.returncode, stdout.decode(), stderr.decode()
    finally:
        site.cancel()
        await asyncio.gather(site, return_exceptions=True)


def assert_site_2_left_no_trace(poc: Path, tmp_path: Path, job: Path, stdout: str) -> list[dict]:
    """The job finished on site-1 alone, exactly; returns the job's events."""
    assert "job.finished" in stdout
    job_id = submitted_job_id(stdout)
    ok(hauler("jobs", "download", job_id, "-o", tmp_path / "out", "--workspace", poc))
    final = load_file(str(tmp_path / "out" / "global.safetensors"))
    assert all((array < GARBAGE / 2).all() for array in final.values())  # no trace of site-2
    assert_models_equal(final, hello_expected(job, rounds=2))
    server_job = poc / "server" / "jobs" / job_id
    events = read_jsonl(server_job / "events.jsonl")
    assert any(
        e["event"] == "site.failed" and e["site"] == "site-2" and e["round"] == 0 for e in events
    )
    rounds = [row for row in read_jsonl(server_job / "metrics.jsonl") if row["kind"] == "round"]
    assert [(row["round"], row["sites"]) for row in rounds] == [(0, ["site-1"]), (1, ["site-1"])]
    return events


def run_with(
    poc: Path, tmp_path: Path, mode: str, **workflow: float
) -> tuple[Path, FaultySite, str]:
    job = hello_job(tmp_path, rounds=2, min_clients=1, wait_s=30, arrays=4, array_bytes=100_004)
    if workflow:
        config = tomllib.loads((job / "job.toml").read_text())
        config["workflow"].update(workflow)
        (job / "job.toml").write_text(tomli_w.dumps(config))
    faulty = FaultySite(poc, tmp_path, mode)
    returncode, stdout, stderr = asyncio.run(run_job_with_faulty_site(poc, job, faulty))
    assert returncode == 0, f"{stdout}\n{stderr}"
    return job, faulty, stdout


@pytest.mark.parametrize("mode", MODES)
def test_site_failing_mid_upload_leaves_the_aggregate_exact(poc, tmp_path, mode):
    job, faulty, stdout = run_with(poc, tmp_path, mode)
    assert (
        faulty.downloads >= 1 and faulty.broken_uploads >= 1
    )  # site-2 really took part, and really failed
    events = assert_site_2_left_no_trace(poc, tmp_path, job, stdout)
    assert any(
        e["event"] == "round.refold" and e["round"] == 0 for e in events
    )  # its folds were undone


@pytest.mark.parametrize("mode", HOSTILE_MANIFESTS)
def test_result_with_a_hostile_manifest_is_refused_before_any_upload(poc, tmp_path, mode):
    job, faulty, stdout = run_with(poc, tmp_path, mode)
    assert faulty.downloads >= 1 and faulty.upload_requests == 0  # refused on the manifest alone
    events = assert_site_2_left_no_trace(poc, tmp_path, job, stdout)
    assert not any(e["event"] == "round.refold" for e in events)  # nothing of it was ever folded


def test_tensor_that_failed_its_digest_is_not_aggregated_when_the_site_resumes(poc, tmp_path):
    job, faulty, stdout = run_with(poc, tmp_path, "bad_digest_then_resume")
    assert faulty.broken_uploads >= 1
    assert_site_2_left_no_trace(poc, tmp_path, job, stdout)


def test_an_answer_of_another_kind_than_the_task_s_fails_that_site(poc, tmp_path):
    """Metrics (an evaluation's answer) for a training task are the peer's protocol error."""
    job, faulty, stdout = run_with(poc, tmp_path, "metrics_for_a_model")
    assert faulty.downloads >= 1 and faulty.upload_requests == 0
    events = assert_site_2_left_no_trace(poc, tmp_path, job, stdout)
    assert "site-2 answered a train task with evaluated" in site_2_failures(events)[0]


def site_2_failures(events: list[dict]) -> list[str]:
    return [e["error"] for e in events if e["event"] == "site.failed" and e["site"] == "site-2"]


@pytest.mark.parametrize("mode", HOSTILE_WEIGHTS)
def test_a_weight_that_is_not_finite_positive_and_at_most_max_weight_fails_that_site(
    poc, tmp_path, mode
):
    job, faulty, stdout = run_with(poc, tmp_path, mode)
    assert (
        faulty.downloads >= 1 and faulty.upload_requests == 0
    )  # refused before anything was folded
    events = assert_site_2_left_no_trace(poc, tmp_path, job, stdout)
    error = site_2_failures(events)[0]
    assert (
        f"site-2 announced weight {HOSTILE_WEIGHTS[mode]!r}" in error
        and "max_weight = 1e+09" in error
    ), error


@pytest.mark.parametrize("mode", POISONED_VALUES)
def test_an_update_with_poisoned_values_is_dropped_from_the_round_exactly(poc, tmp_path, mode):
    workflow = (
        {"max_update_norm": MAX_UPDATE_NORM} if mode == "update_far_above_max_update_norm" else {}
    )
    job, faulty, stdout = run_with(poc, tmp_path, mode, **workflow)
    assert faulty.upload_requests >= 1
    events = assert_site_2_left_no_trace(poc, tmp_path, job, stdout)
    error = site_2_failures(events)[0]
    if mode == "update_far_above_max_update_norm":
        assert "x the global model's is above max_update_norm = 10" in error, error
    else:
        tensor = next(iter(POISONED_VALUES[mode]))
        assert f"non-finite values in tensor '{tensor}'" in error, error
