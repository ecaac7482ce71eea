"""Hauler's error tree: one root, branches chosen by what the caller does next.

    HaulerError
    ├── ConfigError            fix a file or flag; names the file and key
    ├── JobError               the job failed or was refused; read its message
    │   ├── JobCodeError          the job's own code failed; shown to its submitter and project
    admins
    │   ├── UpdateRefused         a site's update broke a check: that site leaves the round
    │   └── TaskRefused           a site declined a task by its own policy (not an error)
    ├── ProtocolError
    │   ├── RemoteProtocolError   the peer broke the protocol: close and report, never retried
    │   │   └── DigestError          its data contradicts its own manifest
    │   └── LocalProtocolError    our own bug: report it
    ├── TransferTimeout        a peer went silent for one of the seed's timeouts: resume
    ├── ConnectionLost         the link dropped: reconnect and resume
    ├── IntegrityError         a chunk failed its checksum: re-send it
    ├── SiteRestarted          a site came back as a new process: its task starts over
    └── SecurityError          refused on security grounds: fatal, never retried

Every error ends with what to do about it. Errors from grpc, ssl, the OS and
pydantic are mapped into this tree at the edge of the layer that meets them.
"""

from __future__ import annotations


class HaulerError(Exception):
    """Root of every error Hauler raises on purpose."""

    exit_code: int = 1


class ConfigError(HaulerError):
    """A configuration file, job definition or flag is wrong."""

    exit_code = 2


class JobError(HaulerError):
    """A job could not be accepted, or it failed while running."""


class JobCodeError(JobError):
    """The job's own code failed (building round 0, or training on a site). Its message may tell
    what that code could see, so it is shown to the job's submitter and project admins only."""


class UpdateRefused(JobError):
    """A site's contribution broke a check (its weight, non-finite values, its norm): the site
    is dropped from the round and the round goes on without it; nothing of it is aggregated."""


class TaskRefused(JobError):
    """A site declined a task by its own policy (e.g. `share_local_model = false`): nothing
    failed, and asking again would not help."""


class ProtocolError(HaulerError):
    """Someone broke the Hauler wire protocol."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow; the connection is closed."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol does not allow: a bug in Hauler."""


class TransferTimeout(HaulerError):
    """A peer stayed silent longer than one of the timeouts (named in `timeout_name`)."""

    def __init__(self, timeout_name: str, seconds: float, what: str) -> None:
        self.timeout_name = timeout_name
        self.seconds = seconds
        super().__init__(
            f"{what}: no progress for {seconds:g} s ({timeout_name}); "
            f"the peer is stopped or the link is black-holed. Raise {timeout_name} "
            "only if the peer is known to pause longer than that."
        )


class ConnectionLost(HaulerError):
    """The connection dropped before the exchange finished; reconnect and resume."""


class IntegrityError(HaulerError):
    """Received bytes do not match their checksum; the chunk must be re-sent."""


class DigestError(RemoteProtocolError):
    """Every chunk matched its checksum, yet a tensor (or a whole encoded stream) does not match
    the digest its sender announced: the sender's data and manifest disagree, so sending again
    would not help."""


class SiteRestarted(HaulerError):
    """A site came back as a new process: the work it had under way is gone, and its task
    starts over from the beginning (no transfer of the old process can be resumed)."""


class SecurityError(HaulerError):
    """Refused for security reasons: a bad certificate, identity or permission."""

    exit_code = 3
