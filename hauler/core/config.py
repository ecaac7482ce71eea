"""Validated configuration: the server's, a site's, an admin's and a job's.

Every model forbids unknown keys, so a typo is an error that names the key.
Precedence is defaults < file < command-line flag; `load_toml` turns pydantic's
errors into one `ConfigError` whose lines read `file: key: message`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from hauler.core.errors import ConfigError

MIB = 1 << 20


class Strict(BaseModel):
    """Base of every config model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(Strict):
    """The seed's timeout names, each measuring silence, never duration."""

    streaming_read_timeout: float = Field(
        300.0,
        gt=0,
        description="Receiver: seconds with no chunk arriving before the stream is dropped.",
    )
    streaming_ack_wait: float = Field(
        300.0, gt=0, description="Sender: seconds with a full window and no acknowledgement."
    )
    communication_timeout: float = Field(
        300.0,
        gt=0,
        description="Request/response: seconds without progress while sending, waiting for the "
        "peer's first byte, or receiving. Each stage restarts its timer on progress.",
    )
    heartbeat_interval: float = Field(5.0, gt=0, description="Seconds between a site's heartbeats.")


class DataPlane(Strict):
    """How model bytes move on the tensor-stream connections."""

    chunk_bytes: int = Field(
        4 * MIB,
        ge=4096,
        le=64 * MIB,
        multiple_of=8,
        description="Bytes of the model per chunk frame (before any codec); a chunk may span "
        "several tensors.",
    )
    window_bytes: int = Field(
        64 * MIB,
        ge=4096,
        le=4096 * MIB,
        description="Unacknowledged payload bytes in flight per connection (at least one chunk "
        "is always allowed).",
    )
    connections: int = Field(
        8,
        ge=1,
        le=64,
        description="Parallel connections (lanes) per transfer, which long "
        "fat links need (measured: 8 fill a 100 ms, 1 Gbit/s path where 4 are held back by "
        "the kernel's 4 MiB send buffers); the server's value is used for every transfer.",
    )
    hello_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Seconds a new data connection has to "
        "finish its TLS handshake and send its HELLO before it is dropped.",
    )
    max_connections_per_peer: int = Field(
        256,
        ge=1,
        description="Data connections one participant may "
        "hold open at once (a transfer uses `connections` of them).",
    )
    congestion_control: str = Field(
        "bbr",
        description="TCP congestion control for data connections where the "
        'kernel offers it; "" keeps the system default.',
    )
    max_retries: int = Field(
        10,
        ge=0,
        le=1000,
        description="Reconnections per transfer before giving up; "
        "each resumes from the last acknowledged chunk.",
    )
    retry_backoff_s: float = Field(
        0.5, gt=0, description="First wait before reconnecting; doubles, with jitter."
    )
    retry_backoff_max_s: float = Field(
        30.0, gt=0, description="Longest wait between reconnections."
    )


class TlsFiles(Strict):
    """A participant's identity: its certificate and key, and the project CA that signed it."""

    ca_cert: Path = Field(description="PEM file of the project CA certificate.")
    cert: Path = Field(description="PEM file of this participant's certificate.")
    key: Path = Field(description="PEM file of this participant's private key (mode 0600).")


MLFLOW_LOCAL = "local"  # a tracking URI: the embedded store in the job's own folder
TrackingUri = Annotated[str, Field(min_length=1, max_length=2048, pattern=r"^\S+$")]


class ServerTracking(Strict):
    """Where this server may send its jobs' metrics: MLflow tracking URIs, each a place the
    server will connect to or write on a job's behalf, so jobs name only those listed here."""

    mlflow: TrackingUri | None = Field(
        None,
        description="Tracking URI of every job without a [tracking] table of its own; "
        f'"{MLFLOW_LOCAL}": a store in each job\'s folder. None: those jobs are not tracked.',
    )
    allowed_mlflow_uris: list[TrackingUri] = Field(
        [],
        description="Tracking URIs a job.toml's [tracking] mlflow may name, exactly as written, "
        f'besides `mlflow` and "{MLFLOW_LOCAL}"; a job naming another is refused.',
    )


class TrackingConfig(Strict):
    """A job's experiment tracking: its metrics records, as they are written, go to MLflow too."""

    mlflow: TrackingUri = Field(
        MLFLOW_LOCAL,
        description=f'MLflow tracking URI; "{MLFLOW_LOCAL}" (the default): a store in the '
        "job's folder. A server takes only the URIs its [tracking] allows.",
    )
    experiment: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="MLflow experiment; the job's name if absent.",
    )


class ServerConfig(Strict):
    """`hauler server --config server.toml`."""

    name: str = "server"
    host: str = "127.0.0.1"
    control_port: int = Field(8002, ge=0, le=65535)
    data_port: int = Field(8003, ge=0, le=65535)
    workspace: Path = Path("server-workspace")
    memory_budget_mib: int = Field(
        32,
        ge=0,
        description="Aggregator accumulators larger than this live in memory-mapped files.",
    )
    keep_rounds: int = Field(
        2,
        ge=2,
        description="Global round files kept per job besides round 0 (the initial model, "
        "always kept): the served one and the one being built; older ones lend their inode to "
        "new rounds.",
    )
    max_job_package_mib: int = Field(16, ge=1, description="Largest accepted job folder, zipped.")
    max_finished_jobs_gib: float | None = Field(
        None,
        gt=0,
        description="Disk the model files of ended jobs may take; beyond it the oldest "
        "jobs' model files are removed (their records, events and metrics stay). None: no cap.",
    )
    max_model_gib: float = Field(
        1024.0, gt=0, description="Largest initial model a job may upload."
    )
    allow_custom_code: bool = Field(
        False,
        description="Let jobs ask the server to build their round 0 from their own model code "
        '([model] build = "server"), in a confined child process. Off: no job code runs here.',
    )
    model_dirs: list[Path] = Field(
        [],
        description="Folders whose safetensors files jobs may name as their initial model "
        "([model] file = ...), e.g. pretrained checkpoints.",
    )
    tls: TlsFiles | None = Field(
        None, description="Mutual TLS on both planes; None only for local trials."
    )
    revoked: list[str] = Field(
        [], description="Names of participants refused at connect, whatever their certificate."
    )
    sites: list[str] | None = Field(
        None,
        description="The project's sites (`hauler provision` writes them): a job naming another "
        "is refused at submission. None: not checked.",
    )
    timeouts: Timeouts = Timeouts()
    dataplane: DataPlane = DataPlane()
    tracking: ServerTracking = Field(
        ServerTracking(), description="The MLflow tracking servers jobs may send metrics to."
    )


class SiteConfig(Strict):
    """`hauler client --config site.toml`."""

    name: str
    server_host: str = "127.0.0.1"
    control_port: int = Field(8002, ge=1, le=65535)
    data_port: int = Field(8003, ge=1, le=65535)
    workspace: Path = Path("site-workspace")
    allow_custom_code: bool = Field(
        True,
        description="Run any job's code; when false, run only the jobs "
        "whose code digest is in `trusted_code`.",
    )
    trusted_code: list[Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]] = Field(
        [],
        description="Digests of vetted job code this site runs even with allow_custom_code = false "
        "(`hauler jobs digest JOB_DIR` prints a job's).",
    )
    max_model_gib: float = Field(
        1024.0, gt=0, description="Largest model this site accepts to receive."
    )
    job_settings: dict[str, Any] = Field(
        {},
        description="Settings of this site that every job's code reads as context.settings, "
        'e.g. data_dir = "/data/digits"; they stay on the site.',
    )
    share_local_model: bool = Field(
        True,
        description="In cross-site evaluation, upload this site's last local model for the "
        "other sites to evaluate. false: it stays here, and this site evaluates the global "
        "model only (local models are shared among the sites that share theirs).",
    )
    tls: TlsFiles | None = None
    timeouts: Timeouts = Timeouts()
    dataplane: DataPlane = DataPlane()


class AdminConfig(Strict):
    """What `hauler submit` and `hauler jobs` need to reach the server."""

    name: str = "admin"
    server_host: str = "127.0.0.1"
    control_port: int = Field(8002, ge=1, le=65535)
    data_port: int = Field(8003, ge=1, le=65535)
    tls: TlsFiles | None = None
    timeouts: Timeouts = Timeouts()


CodecName = Literal["none", "bf16", "fp16", "int8", "int4", "zstd"]
OptimizerName = Literal["fedavg", "fedavgm", "nesterov", "fedadam", "fedyogi", "fedadagrad"]
IntegerPolicy = Literal["mean", "sum", "max", "keep"]


class OptimizerConfig(Strict):
    """A server optimizer and its settings (unset ones take the optimizer's defaults; a
    setting it does not use is an error)."""

    name: OptimizerName = "fedavg"
    lr: float | None = Field(None, description="Server learning rate.")
    momentum: float | None = Field(None, description="fedavgm and nesterov.")
    beta1: float | None = Field(None, description="fedadam, fedyogi and fedadagrad.")
    beta2: float | None = Field(None, description="fedadam and fedyogi.")
    tau: float | None = Field(None, description="The adaptive optimizers' epsilon.")


WorkflowName = Literal["scatter_and_gather", "cyclic", "cross_site_evaluation"]


class WorkflowConfig(Strict):
    """The workflow and its arguments: ScatterAndGather (FedAvg, the seed's), cyclic, or
    cross-site evaluation."""

    name: WorkflowName = Field(
        "scatter_and_gather",
        validation_alias=AliasChoices("name", "kind"),  # `kind`: the key of the first versions
        description="scatter_and_gather (every site trains each round, FedAvg), cyclic (the "
        "model goes from site to site) or cross_site_evaluation (scatter_and_gather, then every "
        "site evaluates the final global model and every other site's last local model).",
    )
    num_rounds: int = Field(
        1,
        ge=0,
        description="Rounds; in cyclic, passes of the model through every site; in "
        "cross_site_evaluation, the training rounds before it (0: evaluate round 0 only).",
    )
    order: Literal["fixed", "random"] = Field(
        "fixed",
        description="cyclic: the sites' order in each round: fixed (as the job's `sites` lists "
        "them, else as the federation does) or random (shuffled each round from `seed`).",
    )
    seed: int = Field(0, description="cyclic: the random order's seed (the same, the same order).")
    min_clients: int = Field(1, ge=1)
    train_timeout: float | None = Field(
        None,
        gt=0,
        description="Seconds of local work per site, counted from when the model has arrived.",
    )
    wait_time_after_min_received: float = Field(
        10.0, ge=0, description="Seconds to wait for more results once min_clients are in."
    )
    max_weight: float = Field(
        1e9,
        gt=0,
        allow_inf_nan=False,
        description="Largest weight a site may announce; a result above it fails that site's task.",
    )
    max_update_norm: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Largest norm of a site's update (its model minus the global model) relative "
        "to the global model's; a site above it is dropped from the round. None: unchecked.",
    )
    optimizer: OptimizerConfig = Field(
        OptimizerConfig(),
        description="The server optimizer that turns the round's averaged update into the next "
        "global model: a name, or a table with `name` and its settings.",
    )
    integers: dict[str, IntegerPolicy] = Field(
        {},
        description="How non-float tensors (counters, flags) are aggregated, by name pattern "
        "(fnmatch; the first match wins): mean (weighted, rounded half to even: the default), "
        "sum (the global value plus every site's change), max, or keep (the global value).",
    )

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer_by_name(cls, value: object) -> object:
        """`optimizer = "fedadam"` is short for `optimizer = { name = "fedadam" }`."""
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _rounds_to_run(self) -> WorkflowConfig:
        """Only cross-site evaluation has something to do without a training round."""
        if self.num_rounds == 0 and self.name != "cross_site_evaluation":
            raise ValueError(f"num_rounds must be at least 1 for {self.name}")
        return self

    @model_validator(mode="after")
    def _relay_as_it_is(self) -> WorkflowConfig:
        """A cyclic round passes each site's model on as it is: no server optimizer steps it."""
        if self.name == "cyclic" and self.optimizer.name != "fedavg":
            raise ValueError(
                "cyclic passes each site's model on as it is, with no server step between "
                f'sites: drop optimizer {self.optimizer.name!r} (keep the default, "fedavg")'
            )
        return self


class TransferConfig(Strict):
    """What travels between the server and the sites: codecs per direction.

    With a codec, a site uploads its update (its model minus the round's global model) encoded
    chunk by chunk, and a site that holds the previous round downloads the round's global delta,
    encoded once by the server, instead of the whole model. Non-float tensors always travel
    exact."""

    upload: CodecName = Field("none", description="Codec of the sites' updates.")
    download: CodecName = Field(
        "none", description="Codec of the global model's change from the previous round."
    )
    error_feedback: bool = Field(
        True,
        description="Carry what a lossy codec dropped into the next round (a residual per site "
        "for uploads, on the server for downloads) instead of losing it.",
    )
    block_elements: int = Field(
        512,
        ge=16,
        le=1 << 16,
        description="Elements sharing one scale and offset in int8 and int4 (smaller: less error, "
        "more bytes; bench.codecs measures the trade-off).",
    )


class ModelConfig(Strict):
    """Where a job's round 0 comes from: built from its model module (`layout(config)` and
    `fill(name, out, config)`) where it is submitted, by default; built on the server, where the
    server allows custom code; or a safetensors file in the server's model_dirs. `hauler submit
    --initial-model FILE` uploads a file instead of all three."""

    module: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Module of the job folder with layout(config) and fill().",
    )
    config: dict[str, Any] = {}
    build: Literal["submitter", "server"] = Field(
        "submitter",
        description="Where `module` runs to build round 0: on the submitter's machine "
        "(uploaded with the job) or, where allow_custom_code is set, confined on the server.",
    )
    file: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="A safetensors file in one of the server's model_dirs.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if self.module is not None and self.file is not None:
            raise ValueError("give `module` (build round 0) or `file` (a server file), not both")
        if self.build == "server" and self.module is None:
            raise ValueError('build = "server" needs the `module` to build round 0 with')
        return self


class ExecutorConfig(Strict):
    """How a site trains: a module's `train(model, context)`, or a script that calls
    `hauler.receive()` / `hauler.send()`; in the site process, or in a subprocess of it."""

    module: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Module of the job folder with train(model, context).",
    )
    script: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9_./-]*\.py$",
        description="Python file of the job folder that uses hauler.receive()/send().",
    )
    mode: Literal["in_process", "subprocess"] = Field(
        "in_process",
        description="Run the training code in a thread of the site process, or in a child "
        "process that reaches the model through the site's memory-mapped model file.",
    )
    config: dict[str, Any] = {}

    @model_validator(mode="after")
    def _one_entry_point(self) -> ExecutorConfig:
        if (self.module is None) == (self.script is None):
            raise ValueError(
                "give exactly one of `module` (with train(model, context)) or `script`"
            )
        if self.script is not None and ".." in self.script.split("/"):
            raise ValueError(f"script {self.script!r} must stay inside the job folder")
        return self


class JobConfig(Strict):
    """A job folder's `job.toml`."""

    name: str = Field(min_length=1, max_length=128)
    workflow: WorkflowConfig = WorkflowConfig()
    model: ModelConfig = Field(ModelConfig(), description="Where round 0 comes from.")
    executor: ExecutorConfig = Field(
        description="What every site runs to train: a module or a script."
    )
    transfer: TransferConfig = Field(
        TransferConfig(), description="Codecs of the updates and of the global model."
    )
    sites: list[str] | None = Field(
        None, description="Sites that take part; all connected sites if absent."
    )
    tracking: TrackingConfig | None = Field(
        None,
        description="Send the job's metrics to MLflow too; if absent, where the server's "
        "[tracking] mlflow says (by default nowhere).",
    )

    @model_validator(mode="after")
    def _no_delta_to_relay(self) -> JobConfig:
        """In cyclic, no site holds the model of the hop before: a download delta helps nobody."""
        if self.workflow.name == "cyclic" and self.transfer.download != "none":
            raise ValueError(
                "cyclic: [transfer] download must be none: each site receives the model the site "
                "before it made, which it does not hold, so it downloads the whole model anyway"
            )
        return self


Config = TypeVar("Config", bound=BaseModel)


def describe_errors(source: str, error: ValidationError) -> str:
    """Render pydantic errors as `source: key: message`, one per line."""
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        if item["type"] == "literal_error":
            message += f", not {item['input']!r}"
        lines.append(f"{source}: {key}: {message}")
    return "\n".join(lines)


def parse(model: type[Config], data: dict[str, Any], source: str) -> Config:
    """Validate `data` as `model`; errors name `source` and the key at fault."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(describe_errors(source, error)) from None


def load_toml(model: type[Config], path: Path, **overrides: Any) -> Config:
    """Read a TOML file as `model`; flags given as `overrides` win over the file.

    Relative paths in it (`workspace`, the `tls` files) are relative to the file's own
    folder, so a startup kit works wherever it is copied."""
    try:
        data = tomllib.loads(Path(path).read_bytes().decode())
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file; check the path or run `hauler poc prepare`"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read it as a TOML file: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    data.update({key: value for key, value in overrides.items() if value is not None})
    _resolve_paths(data, Path(path).parent)
    return parse(model, data, str(path))


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    if isinstance(data.get("workspace"), str):
        data["workspace"] = str(base / data["workspace"])
    if isinstance(data.get("model_dirs"), list):
        data["model_dirs"] = [
            str(base / value) if isinstance(value, str) else value for value in data["model_dirs"]
        ]
    if isinstance(data.get("tls"), dict):
        data["tls"] = {
            key: str(base / value) if isinstance(value, str) else value
            for key, value in data["tls"].items()
        }
