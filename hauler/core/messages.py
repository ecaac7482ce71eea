"""Control-plane messages: what sites, the server and admins say to each other.

Each is a pydantic model with a `type` tag; `parse_message` validates anything
that arrives before it is used. Model bytes never appear here, only manifests
(names, shapes, digests) and transfer ids that the data plane then serves.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from hauler.core.errors import RemoteProtocolError
from hauler.core.logs import MAX_MESSAGE_CHARS
from hauler.core.resources import ResourceSample

MAX_HEARTBEAT_SAMPLES = 600  # ten minutes of one-second samples
MAX_HEARTBEAT_LINES = 200  # log lines a heartbeat carries; the rest wait for the next
MAX_METRICS = 256  # training metrics per result: a site cannot bloat every round's records
MAX_METRIC_NAME = 128
# A site's numbers: finite, named briefly, a bounded count (JSON carries NaN and Infinity too)
Metrics = Annotated[
    dict[
        Annotated[str, Field(max_length=MAX_METRIC_NAME)],
        Annotated[float, Field(allow_inf_nan=False)],
    ],
    Field(max_length=MAX_METRICS),
]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


# site -> server
class Hello(_Message):
    """A site's first message; `instance` is random per site process, so the server tells a site
    that reconnects (its work goes on) from one that restarted (its work starts again)."""

    type: Literal["hello"] = "hello"
    site: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    instance: str = Field("", max_length=64, pattern=r"^[A-Za-z0-9]*$")


class LogLine(_Message):
    """A line of a site's log about one job (its own records, or its training code's output)."""

    t: float
    job: str = Field(min_length=1, max_length=128)  # as the server named it; checked there
    level: str = Field(max_length=16)
    message: str = Field(max_length=MAX_MESSAGE_CHARS)


class Heartbeat(_Message):
    """The site is alive; `resources` are its own CPU and memory readings since its last heartbeat,
    `logs` its log lines about jobs since then."""

    type: Literal["heartbeat"] = "heartbeat"
    resources: list[ResourceSample] = Field([], max_length=MAX_HEARTBEAT_SAMPLES)
    logs: list[LogLine] = Field([], max_length=MAX_HEARTBEAT_LINES)


class Encoding(_Message):
    """How a model travels encoded: the codec and its block size, and the digest of its
    encoded chunks' checksums (which the receiver's ledger checks once all have landed)."""

    codec: str = Field(min_length=1, max_length=16)
    block_elements: int = Field(ge=1, le=1 << 20)
    digest: str = Field(min_length=1, max_length=64)


class ResultReady(_Message):
    """The site trained; its model (described by `manifest`) waits to be uploaded. With
    `delta`, its float tensors are its update (its model minus the global one); with
    `encoding`, that update travels encoded."""

    type: Literal["result_ready"] = "result_ready"
    task_id: str
    weight: float  # checked by the server against [workflow] max_weight, so a refusal names it
    metrics: Metrics = {}
    validation: Metrics = {}  # the received global model's, measured before training
    manifest: dict[str, Any]
    delta: bool = False  # float tensors hold the update minus the global model received
    encoding: Encoding | None = None


class Evaluated(_Message):
    """The site evaluated the model of an `evaluate` task on its own data: its metrics."""

    type: Literal["evaluated"] = "evaluated"
    task_id: str
    metrics: Metrics = {}


class TaskFailed(_Message):
    """The task failed on the site; `refused`: by the site's own policy (e.g. it does not share
    its local model), not by an error."""

    type: Literal["task_failed"] = "task_failed"
    task_id: str
    error: str = Field(max_length=4096)
    refused: bool = False


# server -> site
class Welcome(_Message):
    type: Literal["welcome"] = "welcome"
    site: str


class DeployJob(_Message):
    """A job's code, zipped and base64-encoded, how to run its executor, and its codecs."""

    type: Literal["deploy_job"] = "deploy_job"
    job_id: str
    package_b64: str
    executor: dict[str, Any]  # the job's [executor] table, validated by the site as ExecutorConfig
    transfer: dict[str, Any] = {}  # the job's [transfer] table, validated as TransferConfig


class DeltaOffer(_Message):
    """The round's global model as its encoded change from the model whose digest is `base`:
    a site holding that model may download transfer `transfer` instead of the whole model."""

    transfer: str
    base: str = Field(min_length=1, max_length=64)
    encoding: Encoding


class Task(_Message):
    """What a site does for a job, answered with ResultReady (then UploadReady) or Evaluated:
    - train: on the model served under transfer `download`; with `keep_local`, keep the
      trained model as its local model (the last round before cross-site evaluation);
    - evaluate: the model served under `download` (`model_name`: "global" or a site's), on
      the site's own data, and say its metrics;
    - submit: upload its local model, of `manifest`'s layout (nothing is downloaded)."""

    type: Literal["task"] = "task"
    kind: Literal["train", "evaluate", "submit"] = "train"
    task_id: str
    job_id: str
    round: int
    manifest: dict[str, Any]
    download: str
    lanes: int = Field(1, ge=1, le=64)
    delta: DeltaOffer | None = None
    keep_local: bool = False
    model_name: str = Field("", max_length=64)


class UploadReady(_Message):
    """Upload the result of `task_id` under transfer `upload` (again, if the server asks twice)."""

    type: Literal["upload_ready"] = "upload_ready"
    task_id: str
    upload: str
    lanes: int = Field(1, ge=1, le=64)


class AbortTask(_Message):
    type: Literal["abort_task"] = "abort_task"
    task_id: str
    reason: str = ""


class EndJob(_Message):
    """The job ended: stop its code; its model file is of no more use here."""

    type: Literal["end_job"] = "end_job"
    job_id: str


class DeleteJob(_Message):
    """Remove everything of the job this site still keeps (its folder)."""

    type: Literal["delete_job"] = "delete_job"
    job_id: str = Field(pattern=r"^[0-9a-f]{1,64}$")


SiteMessage = Annotated[
    Hello | Heartbeat | ResultReady | Evaluated | TaskFailed, Field(discriminator="type")
]
ServerMessage = Annotated[
    Welcome | DeployJob | Task | UploadReady | AbortTask | EndJob | DeleteJob,
    Field(discriminator="type"),
]
_SITE = TypeAdapter(SiteMessage)
_SERVER = TypeAdapter(ServerMessage)


def parse_site_message(
    data: dict[str, Any],
) -> Hello | Heartbeat | ResultReady | Evaluated | TaskFailed:
    """Validate a message a site sent; malformed ones are the peer's protocol error."""
    try:
        return _SITE.validate_python(data)
    except ValidationError as error:
        raise RemoteProtocolError(f"bad message from site: {error.errors()[0]['msg']}") from None


def parse_server_message(
    data: dict[str, Any],
) -> Welcome | DeployJob | Task | UploadReady | AbortTask | EndJob | DeleteJob:
    """Validate a message the server sent."""
    try:
        return _SERVER.validate_python(data)
    except ValidationError as error:
        raise RemoteProtocolError(f"bad message from server: {error.errors()[0]['msg']}") from None


def encode(message: _Message) -> bytes:
    """The message as JSON, made by pydantic in one pass (a manifest of thousands of tensors is
    several times faster to send this way than dumped to Python and then to JSON)."""
    return message.model_dump_json().encode()
