"""Control-plane messages: whatever a peer sends is validated before use, and anything
malformed is the peer's RemoteProtocolError."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hauler.core.errors import RemoteProtocolError
from hauler.core.messages import (
    MAX_HEARTBEAT_SAMPLES,
    Evaluated,
    Heartbeat,
    Hello,
    ResultReady,
    Task,
    TaskFailed,
    UploadReady,
    encode,
    parse_server_message,
    parse_site_message,
)
from hauler.core.untrusted_json import parse_object

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
message_like = st.dictionaries(
    st.sampled_from(
        [
            "type",
            "site",
            "task_id",
            "weight",
            "manifest",
            "error",
            "job_id",
            "upload",
            "download",
            "round",
        ]
    )
    | st.text(max_size=8),
    json_values | st.sampled_from(["hello", "result_ready", "task", "upload_ready"]),
    max_size=8,
)


def test_a_heartbeat_carries_a_bounded_list_of_valid_samples():
    sample = {"t": 1.5, "cpu_percent": 12.0, "rss_bytes": 2048, "rss_anon_bytes": 1024}
    beat = parse_site_message({"type": "heartbeat", "resources": [sample] * 3})
    assert isinstance(beat, Heartbeat) and beat.resources[2].rss_anon_bytes == 1024
    assert parse_site_message({"type": "heartbeat"}) == Heartbeat()  # a site that samples nothing
    for bad in (
        [sample] * (MAX_HEARTBEAT_SAMPLES + 1),
        [{**sample, "rss_bytes": -1}],
        [{**sample, "pid": 1}],
    ):
        with pytest.raises(RemoteProtocolError):
            parse_site_message({"type": "heartbeat", "resources": bad})


@given(message_like)
def test_garbage_from_a_site_is_refused_as_remote_protocol_error(data):
    try:
        message = parse_site_message(data)
    except RemoteProtocolError:
        return
    assert parse_site_message(json.loads(encode(message))) == message


@given(message_like)
def test_garbage_from_the_server_is_refused_as_remote_protocol_error(data):
    try:
        message = parse_server_message(data)
    except RemoteProtocolError:
        return
    assert parse_server_message(json.loads(encode(message))) == message


@pytest.mark.parametrize(
    "data",
    [
        {"type": "hello", "site": "../../etc"},
        {"type": "hello", "site": ""},
        {"type": "hello", "site": "s" * 65},
        {"type": "hello", "site": "site-1", "admin": True},
        {
            "type": "result_ready",
            "task_id": "t",
            "weight": 1,
            "manifest": {},
            "metrics": {"m" * 200: 1.0},
        },
        {
            "type": "result_ready",
            "task_id": "t",
            "weight": 1,
            "manifest": {},
            "metrics": {f"m{k}": 1.0 for k in range(1000)},
        },
        {
            "type": "result_ready",
            "task_id": "t",
            "weight": 1,
            "manifest": {},
            "metrics": {"loss": float("nan")},
        },
        {
            "type": "result_ready",
            "task_id": "t",
            "weight": 1,
            "manifest": {},
            "validation": {"accuracy": float("inf")},
        },
        {"type": "task_failed", "task_id": "t", "error": "x" * 5000},
        {"type": "welcome", "site": "site-1"},  # a server message, not a site's
    ],
    ids=[
        "path_in_name",
        "empty_name",
        "long_name",
        "extra_field",
        "long_metric_name",
        "too_many_metrics",
        "nan_metric",
        "infinite_validation",
        "long_error",
        "wrong_direction",
    ],
)
def test_invalid_site_message_is_refused(data):
    with pytest.raises(RemoteProtocolError):
        parse_site_message(data)


def test_messages_round_trip_through_json():
    messages = [
        Hello(site="site-1"),
        ResultReady(task_id="t", weight=8.0, manifest={"chunk_bytes": 8}, validation={"a": 0.5}),
        Evaluated(task_id="t", metrics={"accuracy": 0.5}),
        TaskFailed(task_id="t", error="keeps its model", refused=True),
        Task(task_id="t", job_id="j", round=1, manifest={}, download="d"),
        Task(
            kind="evaluate",
            task_id="t",
            job_id="j",
            round=1,
            manifest={},
            download="d",
            model_name="site-2",
        ),
        UploadReady(task_id="t", upload="u"),
    ]
    for message in messages:
        parse = (
            parse_site_message
            if isinstance(message, (Hello, ResultReady, Evaluated, TaskFailed))
            else parse_server_message
        )
        assert parse(json.loads(encode(message))) == message


@pytest.mark.parametrize("weight", [0.0, -1.0, float("inf"), float("nan"), 1e300])
def test_a_result_s_weight_is_taken_as_sent_so_the_server_can_refuse_it_by_name(weight):
    """Validation of the weight is the federation's (against max_weight), not a protocol error."""
    sent = encode(ResultReady(task_id="t", weight=weight, manifest={}))  # as JSON allows
    message = parse_site_message(parse_object(sent, what="a result"))  # as the server parses
    assert message.weight == weight or (weight != weight and message.weight != message.weight)
