"""`hauler provision`: the project CA and startup kits, written to real files."""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import typer
from cryptography import x509
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from hauler.cli.provision import provision as provision_command
from hauler.core.config import (
    AdminConfig,
    ServerConfig,
    SiteConfig,
    TlsFiles,
    load_toml,
)
from hauler.core.errors import ConfigError
from hauler.security import client_ssl_context, provision, server_ssl_context

PROJECT = """\
name: example-project
server: {host: server.example.org, control_port: 8002, data_port: 8003}
sites:
  - {name: site-1, org: hospital-a}
  - {name: site-2, org: hospital-b, allow_custom_code: false}
admins:
  - {name: alice@example.org, org: hospital-a, role: project_admin}
  - {name: bob@example.org, org: hospital-b, role: member}
"""
SITE_3 = "  - {name: site-3, org: hospital-c}\n"
KITS = {  # name: (config file, config model, org, role)
    "server": ("server.toml", ServerConfig, "example-project", "server"),
    "site-1": ("site.toml", SiteConfig, "hospital-a", "site"),
    "site-2": ("site.toml", SiteConfig, "hospital-b", "site"),
    "alice@example.org": ("admin.toml", AdminConfig, "hospital-a", "project_admin"),
    "bob@example.org": ("admin.toml", AdminConfig, "hospital-b", "member"),
}


def project_file(folder: Path, text: str = PROJECT) -> Path:
    path = folder / "PROJECT.yml"
    path.write_text(text)
    return path


def run_cli(*arguments: str | Path):  # type: ignore[no-untyped-def]
    app = typer.Typer()
    app.command()(provision_command)
    return CliRunner().invoke(app, [str(argument) for argument in arguments])


def files_of(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def tls_files(kit: Path, config: ServerConfig | SiteConfig | AdminConfig) -> TlsFiles:
    """The kit's TLS files: written relative to the kit, and resolved against it when loaded."""
    raw = next(tomllib.loads(path.read_text()) for path in kit.glob("*.toml"))
    assert not Path(raw["tls"]["cert"]).is_absolute()
    assert config.tls is not None and config.tls.cert.parent == kit
    return config.tls


def subject(cert: x509.Certificate) -> tuple[str, ...]:
    oids = (NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME)
    return tuple(str(cert.subject.get_attributes_for_oid(oid)[0].value) for oid in oids)


def test_every_participant_gets_a_kit_that_works(tmp_path: Path) -> None:
    out = tmp_path / "out"
    written = provision(project_file(tmp_path), out)
    assert [kit.name for kit in written] == list(KITS)
    for name, (config_file, model, org, role) in KITS.items():
        kit = out / name
        config = load_toml(model, kit / config_file)
        assert config.name == name
        files = tls_files(kit, config)
        assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
        assert files.ca_cert.read_bytes() == (out / "ca" / "ca.pem").read_bytes()
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        assert subject(cert) == (name, org, role)
        (server_ssl_context if role == "server" else client_ssl_context)(files)  # pairs, CA, dates
    assert stat.S_IMODE((out / "ca" / "ca.key").stat().st_mode) == 0o600


def test_configs_point_at_the_project_server(tmp_path: Path) -> None:
    out = tmp_path / "out"
    provision(project_file(tmp_path), out)
    server = load_toml(ServerConfig, out / "server" / "server.toml")
    assert (server.host, server.control_port, server.data_port) == (
        "server.example.org",
        8002,
        8003,
    )
    assert (
        server.workspace == out / "server" / "workspace"
    )  # relative in the kit, resolved against it
    site = load_toml(SiteConfig, out / "site-2" / "site.toml")
    assert (site.server_host, site.control_port, site.data_port) == (
        "server.example.org",
        8002,
        8003,
    )
    assert site.allow_custom_code is False
    assert load_toml(SiteConfig, out / "site-1" / "site.toml").allow_custom_code is True
    certificate = x509.load_pem_x509_certificate((out / "server" / "server.pem").read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["server.example.org", "localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


@pytest.mark.parametrize(
    "kit, command",
    [
        ("server", "exec hauler server --config server.toml"),
        ("site-1", "exec hauler client --config site.toml"),
    ],
)
def test_start_script_runs_the_role_from_its_kit(tmp_path: Path, kit: str, command: str) -> None:
    provision(project_file(tmp_path), tmp_path / "out")
    script = tmp_path / "out" / kit / "start.sh"
    assert os.access(script, os.X_OK)
    assert script.read_text().splitlines()[-2:] == ['cd "$(dirname "$0")" || exit 1', command]


def test_the_ca_key_is_in_no_kit(tmp_path: Path) -> None:
    out = tmp_path / "out"
    provision(project_file(tmp_path), out)
    ca_key = (out / "ca" / "ca.key").read_bytes()
    outside_ca = {path: data for path, data in files_of(out).items() if path.parent != out / "ca"}
    assert outside_ca and not [path for path, data in outside_ca.items() if ca_key in data]


def test_add_site_issues_only_its_kit_and_leaves_the_others_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    provision(project_file(tmp_path), out)
    before = files_of(out)
    result = run_cli(
        project_file(tmp_path, PROJECT.replace("admins:", SITE_3 + "admins:")),
        "-o",
        out,
        "--add-site",
        "site-3",
    )
    assert result.exit_code == 0, result.output
    assert "site-3" in result.stdout
    after = files_of(out)
    server_config = out / "server" / "server.toml"
    assert {path: after[path] for path in before if path != server_config} == {
        path: data for path, data in before.items() if path != server_config
    }
    assert load_toml(ServerConfig, server_config).sites == [
        "site-1",
        "site-2",
        "site-3",
    ]  # the only change there
    assert {path.relative_to(out).parts[0] for path in set(after) - set(before)} == {"site-3"}
    config = load_toml(SiteConfig, out / "site-3" / "site.toml")
    client_ssl_context(tls_files(out / "site-3", config))  # signed by the same CA


def test_rerun_refuses_existing_kits_unless_asked_and_keeps_the_ca(tmp_path: Path) -> None:
    out, project = tmp_path / "out", project_file(tmp_path)
    provision(project, out)
    before = files_of(out)
    with pytest.raises(ConfigError, match="kits exist for server, site-1, .*; pass --overwrite"):
        provision(project, out)
    assert files_of(out) == before
    provision(project, out, overwrite=True)
    after = files_of(out)
    assert after[out / "ca" / "ca.key"] == before[out / "ca" / "ca.key"]
    assert after[out / "site-1" / "site-1.key"] != before[out / "site-1" / "site-1.key"]


def test_add_site_needs_the_site_in_the_project_file_and_an_existing_ca(tmp_path: Path) -> None:
    project, out = project_file(tmp_path), tmp_path / "out"
    with pytest.raises(ConfigError, match="no project CA; provision the whole project first"):
        provision(project, out, ["site-1"])
    provision(project, out)
    with pytest.raises(
        ConfigError, match=r"PROJECT.yml: sites: no site named site-9; add it there first"
    ):
        provision(project, out, ["site-9"])
    with pytest.raises(ConfigError, match="kits exist for site-1"):
        provision(project, out, ["site-1"])


@pytest.mark.parametrize(
    "change, message",
    [
        (("org: hospital-a}", "org: hospital-a, colour: red}"), "sites.0.colour: unknown key"),
        (("{host: server.example.org, ", "{"), "server.host: Field required"),
        (("role: member", "role: owner"), "admins.1.role: Input should be"),
        (
            ("name: site-2", "name: site-1"),
            "sites.1.name: 'site-1' is already taken by sites.0.name",
        ),
        (("name: site-2", "name: CA"), "sites.1.name: 'CA' is already taken by the CA's folder"),
        (("name: site-2", "name: ../site-2"), "sites.1.name: String should match pattern"),
        (("sites:", "sites: ["), "not valid YAML"),
        ((PROJECT, "- just a list\n"), "(top level): expected a mapping"),
    ],
    ids=["unknown-key", "missing-key", "bad-role", "duplicate", "reserved", "path", "yaml", "list"],
)
def test_a_bad_project_file_names_the_key(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    path = project_file(tmp_path, PROJECT.replace(*change))
    with pytest.raises(ConfigError) as caught:
        provision(path, tmp_path / "out")
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda path: path.write_bytes(b"name: caf\xe9\n"), "not valid YAML"),
        (lambda path: path.mkdir(), "cannot read it (Is a directory)"),
        (lambda path: None, "no such file"),
    ],
    ids=["not-utf8", "directory", "missing"],
)
def test_an_unreadable_project_file_is_a_config_error(
    tmp_path: Path, write: Callable[[Path], object], message: str
) -> None:
    path = tmp_path / "PROJECT.yml"
    write(path)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        provision(path, tmp_path / "out")


def test_cli_reports_an_error_in_one_line(tmp_path: Path) -> None:
    result = run_cli(
        project_file(tmp_path, PROJECT.replace("role: member", "role: owner")), "-o", tmp_path
    )
    assert result.exit_code == 2
    assert "admins.1.role" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
