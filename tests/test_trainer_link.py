"""The training-code end of the client API (`TrainerLink`), driven over a real queue channel
against real model files: task by task, with numpy and torch, full models and deltas."""

from __future__ import annotations

import queue

import ml_dtypes
import numpy as np
import pytest
import torch
from helpers import MIXED_LAYOUT, create_model, fill_exact_values

from hauler.client import api
from hauler.client.api import QueueChannel, TrainerLink
from hauler.client.tensors import to_numpy, to_torch
from hauler.core.errors import JobError
from hauler.model import ArraySource

LAYOUT = [
    ("w", "F32", (64, 33)),
    ("b", "F32", (33,)),
    ("bf", "BF16", (5000,)),
    ("steps", "I64", (3,)),
]


class Site:
    """The site's side of a queue channel: puts tasks, collects what the code sends."""

    def __init__(self, model):
        self.model, self.inbox, self.sent = model, queue.Queue(), []
        self.link = TrainerLink(QueueChannel(self.inbox, self.sent.append), in_process=True)

    def offer(self, round: int, **task: str) -> None:
        self.inbox.put(
            {
                **task,
                "type": "task",
                "task_id": f"t{round}",
                "job_id": "j",
                "site": "site-1",
                "round": round,
                "config": {"lr": 0.5},
                "workdir": "/tmp",
                "model": self.model,
            }
        )


@pytest.fixture
def site(tmp_path):
    model = create_model(tmp_path / "m.safetensors", LAYOUT, fill=fill_exact_values)
    yield Site(model)
    model.close()


def test_rounds_end_when_the_site_says_so(site):
    site.offer(0)
    site.inbox.put({"type": "end"})
    assert site.link.is_running() and site.link.context().round == 0
    assert site.link.context().config == {"lr": 0.5}
    site.link.send(site.link.receive(), weight=2)
    assert not site.link.is_running() and not site.link.is_running()
    with pytest.raises(JobError, match="the job has ended"):
        site.link.receive()


def test_send_without_receive_and_bad_weight_are_refused(site):
    with pytest.raises(JobError, match="needs a model from hauler.receive"):
        site.link.send({}, weight=1)
    site.offer(0)
    model = site.link.receive()
    with pytest.raises(JobError, match="weight must be positive"):
        site.link.send(model, weight=0)


def test_in_process_send_streams_from_the_tensors_themselves(site):
    site.offer(0)
    received = site.link.receive("torch")
    assert received["bf"].dtype == torch.bfloat16
    assert received["w"].data_ptr() == site.model.arrays()["w"].ctypes.data  # a view, no copy
    trained = {name: tensor.clone() + 1 for name, tensor in received.items()}
    site.link.send(trained, weight=3, metrics={"loss": torch.tensor(0.25)})
    [result] = site.sent
    assert (result["task_id"], result["weight"], result["metrics"], result["delta"]) == (
        "t0",
        3.0,
        {"loss": 0.25},
        False,
    )
    source = result["source"]
    assert isinstance(source, ArraySource)
    index = [t.name for t in site.model.manifest.tensors].index("w")
    assert (
        np.frombuffer(source.tensor_bytes(index), np.float32).ctypes.data == trained["w"].data_ptr()
    )
    digested = source.compute_digests()
    assert digested.same_layout(site.model.manifest) and digested != site.model.compute_digests()


def test_a_model_of_another_shape_names_every_difference(site):
    site.offer(0)
    model = dict(site.link.receive())
    model["w"] = np.zeros((33, 64), np.float32)
    model["b"] = model["b"].astype(np.float64)
    del model["steps"]
    model["extra"] = np.zeros(1)
    with pytest.raises(JobError) as error:
        site.link.send(model)
    for part in (
        "missing 'steps'",
        "unexpected 'extra'",
        "'w' has shape (33, 64)",
        "'b' is float64",
    ):
        assert part in str(error.value)
    assert (
        site.link.pending_round == 0 and not site.sent
    )  # nothing was sent; the round can still be sent


def test_delta_is_written_into_the_model_file_in_place(site):
    site.offer(0)
    received = {name: array.copy() for name, array in site.link.receive().items()}
    trained = {name: (array + np.array(1).astype(array.dtype)) for name, array in received.items()}
    site.link.send(trained, weight=1, delta=True)
    assert site.sent[0]["delta"] and site.sent[0]["source"] is None
    for name, array in site.model.arrays().items():  # float tensors: the update; others: values
        expected = trained[name] - received[name] if name != "steps" else trained[name]
        np.testing.assert_array_equal(array, expected.astype(array.dtype), err_msg=name)


def test_delta_of_a_model_trained_in_place_is_refused(site):
    site.offer(0)
    model = site.link.receive()
    model["w"] += 1
    with pytest.raises(JobError, match="trained in place"):
        site.link.send(model, delta=True)


def test_module_functions_need_a_site():
    with pytest.raises(JobError, match="no Hauler site is running this code"):
        api.is_running()


@pytest.mark.parametrize(
    "name, dtype, shape",
    [(n, d, s) for n, d, s in MIXED_LAYOUT if d != "BOOL"] + [("flags", "BOOL", (33,))],
)
def test_torch_and_numpy_share_memory_for_every_dtype(tmp_path, name, dtype, shape):
    model = create_model(tmp_path / "m.safetensors", [(name, dtype, shape)])
    arrays = model.arrays()
    tensors = to_torch(arrays)
    back = to_numpy(tensors)
    assert back[name].dtype == arrays[name].dtype and back[name].shape == arrays[name].shape
    if arrays[name].size:
        assert np.shares_memory(back[name], arrays[name])
        assert tensors[name].data_ptr() == arrays[name].ctypes.data
    assert (tensors[name].dtype == torch.bfloat16) == (arrays[name].dtype == ml_dtypes.bfloat16)
    del tensors, back, arrays
    model.close()


def test_a_refused_delta_leaves_the_received_model_untouched(site):
    site.offer(0)
    received = site.link.receive()
    before = {name: array.copy() for name, array in received.items()}
    trained = {name: array + np.array(1).astype(array.dtype) for name, array in received.items()}
    trained["bf"] = received["bf"]  # the last float tensor was trained in place: refused at once
    with pytest.raises(JobError, match="'bf' was trained in place"):
        site.link.send(trained, delta=True)
    for name, array in site.model.arrays().items():
        np.testing.assert_array_equal(array, before[name], err_msg=name)


def test_the_global_model_s_validation_goes_with_the_round_s_result(site):
    site.offer(0)
    model = site.link.receive()
    site.link.evaluate({"accuracy": np.float32(0.5)})
    assert not site.sent  # nothing is said until the round's result
    site.link.send(model, weight=2, metrics={"loss": 1.0})
    [result] = site.sent
    assert (result["metrics"], result["validation"]) == ({"loss": 1.0}, {"accuracy": 0.5})


def test_an_evaluation_task_answers_with_metrics_and_sends_no_model(site):
    site.offer(0, task="evaluate", model_name="site-2")
    model = site.link.receive()
    context = site.link.context()
    assert (context.task, context.model_name) == ("evaluate", "site-2")
    with pytest.raises(JobError, match="hauler.evaluate"):
        site.link.send(model)
    site.link.evaluate({"accuracy": 0.75})
    assert site.sent == [{"type": "evaluated", "task_id": "t0", "metrics": {"accuracy": 0.75}}]
    assert site.link.pending_round is None


@pytest.mark.parametrize(
    "metrics, reason",
    [
        ({"loss": float("nan")}, "loss = nan"),
        ({"m" * 200: 1.0}, "too long"),
        ({f"m{k}": 1.0 for k in range(300)}, "300 given"),
        (0.5, "dict of names to numbers"),
    ],
)
def test_metrics_the_server_would_refuse_are_refused_by_the_code_s_own_call(site, metrics, reason):
    site.offer(0)
    site.link.receive()
    with pytest.raises(JobError, match=reason):
        site.link.evaluate(metrics)


def test_metrics_must_be_numbers(site):
    site.offer(0)
    with pytest.raises(JobError, match="metrics must be numbers"):
        site.link.send(site.link.receive(), metrics={"note": "fine"})
