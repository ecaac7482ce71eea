"""Config files: unknown keys and bad values are ConfigErrors that name the file and the key."""

from __future__ import annotations

import re
from typing import get_args

import pytest

from hauler.aggregate import OPTIMIZER_NAMES, Recipe
from hauler.core.config import (
    AdminConfig,
    CodecName,
    JobConfig,
    OptimizerName,
    ServerConfig,
    SiteConfig,
    TransferConfig,
    load_toml,
    parse,
)
from hauler.core.errors import ConfigError
from hauler.model.codecs import CODEC_NAMES, DEFAULT_BLOCK_ELEMENTS

JOB = 'name = "j"\n[model]\nmodule = "model"\n[executor]\nmodule = "train"\n'

UNKNOWN_KEYS = {
    "server_top_level": (ServerConfig, "control_prot = 1\n", "control_prot"),
    "server_timeouts": (
        ServerConfig,
        "[timeouts]\nstreaming_red_timeout = 5\n",
        "timeouts.streaming_red_timeout",
    ),
    "server_dataplane": (ServerConfig, "[dataplane]\nchunk_mib = 4\n", "dataplane.chunk_mib"),
    "site_top_level": (SiteConfig, 'name = "s"\nserver = "x"\n', "server"),
    "site_timeouts": (
        SiteConfig,
        'name = "s"\n[timeouts]\ntrain_timeout = 1\n',
        "timeouts.train_timeout",
    ),
    "admin": (AdminConfig, "port = 1\n", "port"),
    "job_workflow": (JobConfig, JOB + "[workflow]\nnm_rounds = 3\n", "workflow.nm_rounds"),
    "job_top_level": (JobConfig, "rounds = 3\n" + JOB, "rounds"),
}


@pytest.mark.parametrize("model, text, key", UNKNOWN_KEYS.values(), ids=UNKNOWN_KEYS.keys())
def test_unknown_key_names_file_and_key(tmp_path, model, text, key):
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_toml(model, path)
    assert f"{path}: {key}: unknown key" in str(raised.value).splitlines()
    assert raised.value.exit_code == 2


BAD_VALUES = {
    "port_out_of_range": (ServerConfig, "control_port = 70000\n", "control_port"),
    "port_not_a_number": (ServerConfig, 'data_port = "eighty"\n', "data_port"),
    "zero_timeout": (
        ServerConfig,
        "[timeouts]\ncommunication_timeout = 0\n",
        "timeouts.communication_timeout",
    ),
    "chunk_too_small": (
        SiteConfig,
        'name = "s"\n[dataplane]\nchunk_bytes = 100\n',
        "dataplane.chunk_bytes",
    ),
    "site_without_name": (SiteConfig, "control_port = 1\n", "name"),
    "zero_rounds": (JobConfig, JOB + "[workflow]\nnum_rounds = 0\n", "workflow"),
    "unknown_workflow": (JobConfig, JOB + '[workflow]\nname = "gossip"\n', "workflow.name"),
    "module_with_a_path": (
        JobConfig,
        'name = "j"\n[model]\nmodule = "../x"\n[executor]\nmodule = "t"\n',
        "model.module",
    ),
}


@pytest.mark.parametrize("model, text, key", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_value_names_file_and_key(tmp_path, model, text, key):
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_toml(model, path)
    assert any(line.startswith(f"{path}: {key}: ") for line in str(raised.value).splitlines()), str(
        raised.value
    )


def test_every_error_gets_its_own_line(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text("colour = 1\ncontrol_port = -1\n[timeouts]\nheartbeat = 2\n")
    with pytest.raises(ConfigError) as raised:
        load_toml(ServerConfig, path)
    lines = str(raised.value).splitlines()
    assert len(lines) == 3
    assert {line.split(": ")[1] for line in lines} == {
        "colour",
        "control_port",
        "timeouts.heartbeat",
    }


def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text('name = "unterminated\n')
    with pytest.raises(ConfigError, match=f"^{path}: not valid TOML"):
        load_toml(SiteConfig, path)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'nope.toml'}: no such file"):
        load_toml(ServerConfig, tmp_path / "nope.toml")


@pytest.mark.parametrize("kind", ["not_utf8", "directory"])
def test_unreadable_file_is_a_config_error(tmp_path, kind):
    path = tmp_path / "server.toml"
    if kind == "not_utf8":
        path.write_bytes(b'name = "\xff\xfe"\n')
    else:
        path.mkdir()
    with pytest.raises(ConfigError) as raised:
        load_toml(ServerConfig, path)
    assert str(raised.value).startswith(f"{path}: ")


def test_flags_override_the_file_and_none_means_unset(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text("control_port = 9000\ndata_port = 9001\n")
    config = load_toml(ServerConfig, path, control_port=9100, data_port=None)
    assert (config.control_port, config.data_port) == (9100, 9001)


def test_defaults_are_the_seeds_timeouts(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text('name = "site-1"\n')
    timeouts = load_toml(SiteConfig, path).timeouts
    assert (
        timeouts.streaming_read_timeout,
        timeouts.streaming_ack_wait,
        timeouts.communication_timeout,
    ) == (300,) * 3


def test_the_job_config_offers_exactly_the_codecs_and_optimizers_there_are():
    """job.toml's names are checked by pydantic at load; they must be the ones the codec and
    optimizer modules make, and the default block the codecs' own."""
    assert set(get_args(CodecName)) == set(CODEC_NAMES)
    assert set(get_args(OptimizerName)) == set(OPTIMIZER_NAMES)
    assert TransferConfig().block_elements == DEFAULT_BLOCK_ELEMENTS == Recipe().block_elements


@pytest.mark.parametrize(
    "table, message",
    [
        ({"transfer": {"upload": "int3"}}, "transfer.upload: Input should be 'none', "),
        ({"transfer": {"download": "gzip"}}, "not 'gzip'"),
        ({"workflow": {"optimizer": "adam"}}, "workflow.optimizer.name: Input should be 'fedavg'"),
        ({"workflow": {"optimizer": {"name": "fedadam", "lr": 0}}}, None),
        ({"workflow": {"integers": {"*": "median"}}}, "workflow.integers.*: Input should be"),
    ],
)
def test_an_unknown_codec_optimizer_or_policy_is_named_with_the_valid_ones(table, message):
    data = {"name": "x", "executor": {"module": "train"}, **table}
    if message is None:  # a value pydantic lets through: the optimizer refuses it by name
        job = parse(JobConfig, data, "job.toml")
        with pytest.raises(ConfigError, match="lr = 0"):
            Recipe.of(job)
        return
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(JobConfig, data, "job.toml")


def test_a_setting_the_optimizer_does_not_use_is_refused_naming_it():
    data = {
        "name": "x",
        "executor": {"module": "train"},
        "workflow": {"optimizer": {"name": "nesterov", "beta2": 0.9}},
    }
    with pytest.raises(ConfigError, match="does not use beta2; its settings are lr, momentum"):
        Recipe.of(parse(JobConfig, data, "job.toml"))


@pytest.mark.parametrize(
    "table, message",
    [
        ({"workflow": {"name": "cyclic", "optimizer": "fedadam"}}, "drop optimizer 'fedadam'"),
        ({"workflow": {"name": "cyclic"}, "transfer": {"download": "int8"}}, "download must be"),
    ],
)
def test_a_workflow_refuses_what_makes_no_sense_for_it(table, message):
    data = {"name": "x", "executor": {"module": "train"}, **table}
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(JobConfig, data, "job.toml")


def test_the_workflow_s_first_key_kind_still_names_it():
    data = {"name": "x", "executor": {"module": "train"}, "workflow": {"kind": "cyclic"}}
    assert parse(JobConfig, data, "job.toml").workflow.name == "cyclic"
