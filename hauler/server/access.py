"""Who may do what: a peer is the identity in its certificate, never what it claims.

Sites may only run their own session and transfers. Admins act by role:
`project_admin` everything; `org_admin` submits, and manages its own organisation's
jobs; `member` reads (list, status, metrics, events, logs, sites, watch). Revoked names are refused
at connect.
On a plaintext server (local trials only) there are no identities and no checks.
"""

from __future__ import annotations

from hauler.core.errors import SecurityError
from hauler.security import Identity, Role
from hauler.transport import Peer

ADMIN_ROLES = {Role.PROJECT_ADMIN, Role.ORG_ADMIN, Role.MEMBER}
READ_OPERATIONS = {"info", "list_jobs", "status", "metrics", "events", "logs", "sites", "watch"}
JOB_OPERATIONS = {"abort", "delete", "download"}  # on one existing job


class AccessPolicy:
    def __init__(self, revoked: list[str]) -> None:
        self.revoked = set(revoked)

    def _admitted(self, peer: Identity) -> None:
        if peer.name in self.revoked:
            raise SecurityError(
                f"{peer.name}'s certificate is revoked on this server; ask the project admin"
            )

    def check_site(self, peer: Peer, claimed: str) -> None:
        """A site session: the certificate must be a site's, and name the site that says hello."""
        if peer is None:
            return
        self._admitted(peer)
        if peer.role is not Role.SITE or peer.name != claimed:
            raise SecurityError(
                f"certificate of {peer.name} ({peer.role.value}) cannot act as site {claimed!r}"
            )

    def check_transfer(self, peer: Peer, owner: str) -> None:
        """A data-plane connection may only serve a transfer bound to its own name."""
        if peer is None:
            return
        self._admitted(peer)
        if peer.name != owner:
            raise SecurityError(f"{peer.name} may not use a transfer of {owner}")

    def check_admin(self, peer: Peer, operation: str, job_org: str | None = None) -> None:
        """An admin operation; `job_org` is the submitter's organisation for per-job operations."""
        if peer is None:
            return
        self._admitted(peer)
        if peer.role not in ADMIN_ROLES:
            raise SecurityError(f"{peer.name} is a {peer.role.value}, not an admin")
        if peer.role is Role.PROJECT_ADMIN or operation in READ_OPERATIONS:
            return
        if peer.role is Role.ORG_ADMIN and (operation == "submit" or job_org == peer.org):
            return
        raise SecurityError(
            f"{peer.name} ({peer.role.value}, {peer.org}) may not {operation} "
            f"{'this job' if operation in JOB_OPERATIONS else 'jobs'}; ask a project_admin"
        )


def sees_private(peer: Peer, submitter_name: str) -> bool:
    """Whether `peer` may read what a job's own code said: its submitter and project admins."""
    return peer is None or peer.role is Role.PROJECT_ADMIN or peer.name == submitter_name


def submitter(peer: Peer) -> tuple[str, str]:
    """(name, organisation) recorded for a job."""
    return ("local", "") if peer is None else (peer.name, peer.org)
