"""Startup kits: a folder per participant, made from a project file (PROJECT.yml).

    OUT/ca/ca.pem, ca.key       the project CA; its key never leaves this folder
    OUT/<server>/               ca.pem <server>.pem <server>.key server.toml start.sh
    OUT/<site>/                 ca.pem <site>.pem <site>.key site.toml start.sh
    OUT/<admin>/                ca.pem <admin>.pem <admin>.key admin.toml

Paths in a kit's config (tls files, workspace) are relative to the kit folder, so a kit
works wherever it is copied: hauler resolves them against the config file's folder, and
start.sh runs from the kit folder too. Re-running reuses OUT/ca. `add_sites` names sites
that are listed in the project file, the one place participants are declared, and issues
only their kits; every other file stays byte-identical. An existing kit is re-issued only
when `overwrite` is asked for.
"""

from __future__ import annotations

import datetime
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
import yaml
from pydantic import Field, StringConstraints

from hauler.core.config import Strict, parse
from hauler.core.errors import ConfigError
from hauler.security.ca import (
    CERT_MODE,
    Issued,
    Role,
    cert_pem,
    create_authority,
    issue,
    load_issued,
    write_file,
    write_issued,
)

# A name is a folder name and a certificate's CN or O: no slash, no leading dot, and at most
# 64 characters, the X.509 upper bound for both attributes.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=64)]
Host = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$", max_length=253)
]
CA_FOLDER = "ca"
SCRIPT_MODE = 0o755
_START = """\
#!/bin/sh
# Paths in {config} are relative to this kit folder.
cd "$(dirname "$0")" || exit 1
exec {command}
"""


class ServerEntry(Strict):
    """The project file's `server`: where sites find it, and its certificate's names."""

    name: Name = Field(
        "server", description="The server's name: its kit folder and certificate CN."
    )
    org: Name | None = Field(
        None, description="Organisation in its certificate; the project's name if absent."
    )
    host: Host = Field(
        description="DNS name or IPv4 address that sites dial, the server binds "
        "and the server's certificate names."
    )
    control_port: int = Field(8002, ge=1, le=65535)
    data_port: int = Field(8003, ge=1, le=65535)


class SiteEntry(Strict):
    """An entry of `sites`: a data owner that trains."""

    name: Name
    org: Name
    allow_custom_code: bool = Field(
        True, description="Let jobs bring their own Python code to this site."
    )


class AdminEntry(Strict):
    """An entry of `admins`: a person who submits and manages jobs; `role` says how much they
    may."""

    name: Name
    org: Name
    role: Literal["project_admin", "org_admin", "member"]


class Project(Strict):
    """A project file: the server, the sites and the admins, each of whom gets a kit."""

    name: Annotated[
        str, StringConstraints(pattern=NAME_PATTERN, max_length=61)
    ]  # the CA's CN: "<name> CA"
    server: ServerEntry
    sites: list[SiteEntry] = []
    admins: list[AdminEntry] = []


@dataclass(frozen=True)
class _Kit:
    """What one participant's kit holds, before any key exists."""

    name: str
    org: str
    role: Role
    config_file: str
    config: dict[str, Any]
    command: str | None = None
    hosts: tuple[str, ...] = ()


def provision(
    project_file: Path,
    out_dir: Path,
    add_sites: Sequence[str] | None = None,
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Write the project CA (or reuse OUT/ca) and the kits asked for; returns the kit folders.

    With `add_sites`, only those sites' kits. Nothing is written when any kit asked for
    already exists and `overwrite` is false.
    """
    project = load_project(project_file)
    kits = _select(_kits_of(project), add_sites, source=project_file)
    _refuse_existing(out_dir, kits, overwrite=overwrite)
    authority = _authority(project, out_dir, create=add_sites is None)
    written = [_write_kit(out_dir / kit.name, kit, authority) for kit in kits]
    if add_sites is not None:
        _update_server_sites(out_dir / project.server.name / "server.toml", project)
    return written


def _update_server_sites(config: Path, project: Project) -> None:
    """The server kit's list of the project's sites, with the new ones (copy it to the server)."""
    if config.exists():
        data = tomllib.loads(config.read_text())
        data["sites"] = [site.name for site in project.sites]
        write_file(config, tomli_w.dumps(data).encode(), mode=CERT_MODE)


def load_project(path: Path) -> Project:
    """Read and validate a project file; errors read `file: key: message`."""
    try:
        data = yaml.safe_load(Path(path).read_bytes())  # bytes: YAML reports a bad encoding itself
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file; write the project file (name, server, sites, admins)"
        ) from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read it ({error.strerror}); check the path") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: (top level): expected a mapping with name, server, sites and admins"
        )
    project = parse(Project, data, str(path))
    _check_names(project, source=path)
    return project


def _check_names(project: Project, *, source: Path) -> None:
    """Every name is unique (ignoring case, as some file systems do) and is not the CA's folder."""
    named = [("server.name", project.server.name)]
    named += [(f"sites.{index}.name", site.name) for index, site in enumerate(project.sites)]
    named += [(f"admins.{index}.name", admin.name) for index, admin in enumerate(project.admins)]
    seen: dict[str, str] = {CA_FOLDER: "the CA's folder"}
    for key, name in named:
        if name.lower() in seen:
            raise ConfigError(
                f"{source}: {key}: {name!r} is already taken by {seen[name.lower()]}; "
                "every participant needs its own name"
            )
        seen[name.lower()] = key


def _kits_of(project: Project) -> list[_Kit]:
    """Every participant's kit: the server's, then the sites', then the admins'."""
    server = project.server
    dial = {
        "server_host": server.host,
        "control_port": server.control_port,
        "data_port": server.data_port,
    }
    kits = [
        _Kit(
            server.name,
            server.org or project.name,
            Role.SERVER,
            "server.toml",
            {
                "name": server.name,
                "host": server.host,
                "control_port": server.control_port,
                "data_port": server.data_port,
                "workspace": "workspace",
                "sites": [site.name for site in project.sites],
            },
            command="hauler server --config server.toml",
            hosts=(server.host,),
        )
    ]
    kits += [
        _Kit(
            site.name,
            site.org,
            Role.SITE,
            "site.toml",
            {
                "name": site.name,
                **dial,
                "workspace": "workspace",
                "allow_custom_code": site.allow_custom_code,
            },
            command="hauler client --config site.toml",
        )
        for site in project.sites
    ]
    kits += [
        _Kit(admin.name, admin.org, Role(admin.role), "admin.toml", {"name": admin.name, **dial})
        for admin in project.admins
    ]
    return kits


def _select(kits: list[_Kit], add_sites: Sequence[str] | None, *, source: Path) -> list[_Kit]:
    """All kits, or only those of `add_sites`, each of which the project file must list."""
    if add_sites is None:
        return kits
    sites = {kit.name: kit for kit in kits if kit.role is Role.SITE}
    unknown = [name for name in add_sites if name not in sites]
    if unknown:
        raise ConfigError(
            f"{source}: sites: no site named {', '.join(unknown)}; add it there first "
            f"(- {{name: {unknown[0]}, org: ORG}}), then run again"
        )
    return [sites[name] for name in dict.fromkeys(add_sites)]


def _refuse_existing(out_dir: Path, kits: list[_Kit], *, overwrite: bool) -> None:
    """Refuse, before writing anything, to replace kits that exist, unless `overwrite`."""
    existing = [
        kit.name
        for kit in kits
        if (out_dir / kit.name).is_dir() and any((out_dir / kit.name).iterdir())
    ]
    if existing and not overwrite:
        raise ConfigError(
            f"{out_dir}: kits exist for {', '.join(existing)}; pass --overwrite to re-issue "
            "them, or --add-site NAME to issue only new sites"
        )


def _authority(project: Project, out_dir: Path, *, create: bool) -> Issued:
    """The project CA from OUT/ca, created there on the first run (never when adding sites)."""
    folder = out_dir / CA_FOLDER
    cert_path, key_path = folder / "ca.pem", folder / "ca.key"
    if cert_path.exists() or key_path.exists():
        return _load_authority(cert_path, key_path)
    if not create:
        raise ConfigError(
            f"{folder}: no project CA; provision the whole project first (without --add-site)"
        )
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    authority = create_authority(project.name)
    write_issued(authority, cert_path, key_path)
    return authority


def _load_authority(cert_path: Path, key_path: Path) -> Issued:
    """The CA of an earlier run; one that is unreadable or expired can sign nothing."""
    folder = cert_path.parent
    try:
        authority = load_issued(cert_path, key_path)
    except (OSError, ValueError, TypeError) as error:  # TypeError: an encrypted or non-EC key
        raise ConfigError(
            f"{folder}: cannot use the project CA ({error}); restore ca.pem and ca.key, "
            f"or move {folder} aside to start over (every kit must then be re-issued)"
        ) from None
    if authority.cert.not_valid_after_utc <= datetime.datetime.now(datetime.UTC):
        raise ConfigError(
            f"{folder}: the project CA expired on {authority.cert.not_valid_after_utc:%Y-%m-%d}; "
            f"move {folder} aside and re-issue every kit with --overwrite"
        )
    return authority


def _write_kit(folder: Path, kit: _Kit, authority: Issued) -> Path:
    """Issue the participant's certificate and write its kit; paths in its config are
    kit-relative."""
    folder.mkdir(parents=True, exist_ok=True)
    write_file(folder / "ca.pem", cert_pem(authority.cert), mode=CERT_MODE)
    write_issued(
        issue(authority, kit.name, org=kit.org, role=kit.role, hosts=kit.hosts),
        folder / f"{kit.name}.pem",
        folder / f"{kit.name}.key",
    )
    tls = {"ca_cert": "ca.pem", "cert": f"{kit.name}.pem", "key": f"{kit.name}.key"}
    write_file(
        folder / kit.config_file, tomli_w.dumps({**kit.config, "tls": tls}).encode(), mode=CERT_MODE
    )
    if kit.command is not None:
        script = _START.format(config=kit.config_file, command=kit.command)
        write_file(folder / "start.sh", script.encode(), mode=SCRIPT_MODE)
    return folder
