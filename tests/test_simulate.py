"""`hauler simulate` and `hauler.simulate`: a job on N virtual sites, W workers at a time, over the
real workflow, fold, client API and in-process transport, writing the job folder a server writes."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from helpers import (
    REPO,
    assert_matrix,
    assert_models_equal,
    cross_site_job,
    edit_job,
    expected_matrix,
    hauler,
    hello_expected,
    hello_job,
    ok,
    read_jsonl,
    with_evaluate,
)
from safetensors.numpy import load_file, save_file

import hauler as api
from hauler.admin.report import FIGURES
from hauler.core.config import WorkflowConfig
from hauler.core.errors import ConfigError
from hauler.model import ModelFile
from hauler.simulator import SimulationPlan
from hauler.simulator.runner import site_settings
from hauler.workflows import Cyclic

SITES, WORKERS, ROUNDS = 16, 3, 3


def fedavg_of_identical_sites(job_dir: Path, sites: int, rounds: int) -> dict[str, np.ndarray]:
    """What FedAvg gives when every site adds `increment` to the same global model: the fold's
    own float32 arithmetic (weight x value summed in place, then x 1/total), round after round."""
    config = tomllib.loads((job_dir / "job.toml").read_text())
    increment, weight = (
        np.float32(config["executor"]["config"]["increment"]),
        config["executor"]["config"]["steps"],
    )
    model = {name: np.array(array) for name, array in initial_model(job_dir).items()}
    for _ in range(rounds):
        for name, array in model.items():
            trained = array + increment
            total = np.multiply(trained, weight, dtype=np.float32)
            for _ in range(sites - 1):
                total += np.multiply(trained, weight, dtype=np.float32)
            model[name] = np.multiply(total, 1.0 / (weight * sites), dtype=np.float32)
    return model


def initial_model(job_dir: Path) -> dict[str, np.ndarray]:
    import importlib.util

    from hauler.model import numpy_dtype

    config = tomllib.loads((job_dir / "job.toml").read_text())["model"]["config"]
    spec = importlib.util.spec_from_file_location(f"sim_model_{id(job_dir)}", job_dir / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    arrays = {}
    for name, dtype, shape in module.layout(config):
        arrays[name] = np.empty(shape, numpy_dtype(dtype))
        module.fill(name, arrays[name], config)
    return arrays


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> tuple[Path, api.LocalJob]:
    folder = tmp_path_factory.mktemp("simulated")
    job_dir = hello_job(
        folder, rounds=ROUNDS, min_clients=2, arrays=3, array_bytes=400_004, increment=0.1, steps=3
    )
    with_evaluate(job_dir)
    return job_dir, api.simulate(job_dir, sites=SITES, workers=WORKERS, workspace=folder / "sim")


def test_16_virtual_sites_on_3_workers_give_exactly_fedavg_of_every_site(simulated, tmp_path):
    job_dir, job = simulated
    assert job.record()["status"] == "finished" and job.record()["rounds_done"] == ROUNDS
    downloaded = job.download(tmp_path / "out")
    assert_models_equal(load_file(downloaded), fedavg_of_identical_sites(job_dir, SITES, ROUNDS))


def test_every_virtual_site_trains_every_round_on_at_most_w_workers(simulated):
    _, job = simulated
    results = [e for e in job.events() if e["event"] == "site.result"]
    names = [f"site-{k}" for k in range(1, SITES + 1)]
    for round in range(ROUNDS):
        assert sorted(e["site"] for e in results if e["round"] == round) == sorted(names), round
    assert {e["worker"] for e in results} == set(range(1, WORKERS + 1))
    assert sorted(p.name for p in (job.folder.folder / "workers").iterdir()) == [
        f"worker-{k}" for k in (1, 2, 3)
    ]


def test_every_site_validates_the_global_model_it_received_before_training(simulated):
    """The module's evaluate(model, context) runs on each round's global model, per site."""
    job_dir, job = simulated
    sites = [r for r in job.metrics() if r["kind"] == "site"]
    for record in sites:
        expected = fedavg_of_identical_sites(job_dir, SITES, record["round"])["array_0"][0]
        index = int(record["site"].split("-")[1]) - 1
        assert record["validation"] == {"first": float(expected), "site": index}, record
    assert len(sites) == SITES * ROUNDS


@pytest.mark.parametrize("order", ["fixed", "random"])
def test_cyclic_passes_the_model_from_site_to_site_exactly(tmp_path, order):
    """Each hop's model is the site's upload bit for bit (not weight x model / weight): after
    2 passes through 3 sites, the initial model plus 6 x 0.1, added in float32 one at a time."""
    job_dir = hello_job(tmp_path, rounds=2, arrays=2, array_bytes=40_004, increment=0.1, steps=3)
    workflow = {"name": "cyclic", "order": order, "seed": 7}
    edit_job(job_dir, "workflow", workflow)
    job = api.simulate(job_dir, sites=3, workers=2, workspace=tmp_path / "sim")
    assert_models_equal(load_file(job.download(tmp_path / "out")), hello_expected(job_dir, 6))
    hops = sorted((r["round"], r["sites"]) for r in job.metrics() if r["kind"] == "round")
    cyclic, sites = Cyclic(WorkflowConfig(**workflow)), ["site-1", "site-2", "site-3"]
    assert [sites for _, sites in hops] == [[s] for c in (0, 1) for s in cyclic.order(sites, c)]
    assert (job.record()["rounds_done"], job.record()["num_rounds"]) == (6, 6)


FAILING_HOP = '''"""hello-numpy's training, but site-2 fails hop 1."""

from hauler.client import TrainContext, TrainOutput


def train(model, context: TrainContext) -> TrainOutput:
    if context.settings["site_index"] == 1 and context.round == 1:
        raise RuntimeError("site-2 fails its turn")
    for array in model.values():
        array += context.config["increment"]
    return TrainOutput(weight=context.config["steps"])
'''


def test_a_site_that_fails_its_hop_hands_it_to_the_next_and_the_order_goes_on(tmp_path):
    """Hop 1 is site-2's; it fails, so site-3 takes the same model, and hop 2 is site-3's as
    the order says: every hop is made, and which site takes one depends on the hop alone."""
    job_dir = hello_job(tmp_path, rounds=2, arrays=2, array_bytes=40_004, increment=0.1, steps=3)
    (job_dir / "train.py").write_text(FAILING_HOP)
    edit_job(job_dir, "workflow", {"name": "cyclic"})
    job = api.simulate(job_dir, sites=3, workers=2, workspace=tmp_path / "sim")
    assert_models_equal(load_file(job.download(tmp_path / "out")), hello_expected(job_dir, 6))
    hops = sorted((r["round"], r["sites"]) for r in job.metrics() if r["kind"] == "round")
    takers = ["site-1", "site-3", "site-3", "site-1", "site-2", "site-3"]
    assert hops == [(hop, [site]) for hop, site in enumerate(takers)]
    failed = [(e["round"], e["site"]) for e in job.events() if e["event"] == "site.failed"]
    assert failed == [(1, "site-2")]
    assert (job.record()["rounds_done"], job.record()["num_rounds"]) == (6, 6)


@pytest.mark.parametrize("kept", [[], ["site-2"]])
def test_cross_site_evaluation_of_3_sites_with_known_models(tmp_path, kept):
    """Every site evaluates the global model and every other site's local model it is shared;
    a site that keeps its own (share_local_model = false) evaluates the global model only."""
    settings = {site: {"share_local_model": False} for site in kept}
    job = api.simulate(
        cross_site_job(tmp_path), sites=3, workers=2, workspace=tmp_path / "sim", settings=settings
    )
    [summary] = [r for r in job.metrics() if r["kind"] == "cross_site"]
    assert summary["kept"] == kept
    assert_matrix(summary["matrix"], expected_matrix(3, kept))
    stored = sorted(path.name for path in (job.folder.folder / "local").glob("*.safetensors"))
    assert stored == [f"{s}.safetensors" for s in ("site-1", "site-2", "site-3") if s not in kept]
    made = job.report(tmp_path / "report")
    assert (tmp_path / "report" / "cross_site.png") in made.paths
    assert made.report.matrix.text("first", ("site-1", "site-3")) == "0.375"


def test_cross_site_evaluation_alone_evaluates_a_given_model_on_every_site(tmp_path):
    job_dir = edit_job(cross_site_job(tmp_path), "workflow", {"num_rounds": 0})
    given = tmp_path / "given.safetensors"
    save_file({"array_0": np.full(7, 0.5, np.float32)}, str(given))
    job = api.simulate(job_dir, sites=2, workers=2, workspace=tmp_path / "sim", initial_model=given)
    [summary] = [r for r in job.metrics() if r["kind"] == "cross_site"]
    assert (summary["models"], summary["kept"]) == (["global"], [])
    assert summary["matrix"]["first"] == [[0.5], [0.5]]
    assert not [r for r in job.metrics() if r["kind"] == "site"]  # nothing trained


def test_cross_site_evaluation_after_training_is_refused_on_ray_before_connecting(tmp_path):
    with pytest.raises(ConfigError, match="without --ray"):
        api.simulate(cross_site_job(tmp_path), sites=2, workspace=tmp_path / "sim", ray="auto")


def test_the_job_folder_is_a_server_s(simulated):
    """Round files, events and metrics where a server writes them, in the records a server
    writes."""
    _, job = simulated
    folder = job.folder.folder
    assert (folder / "global" / f"round-{ROUNDS}.safetensors").exists()
    kinds = {record["kind"] for record in read_jsonl(folder / "metrics.jsonl")}
    assert {"site", "round", "resources"} <= kinds
    rounds = [r for r in read_jsonl(folder / "metrics.jsonl") if r["kind"] == "round"]
    assert sorted(r["round"] for r in rounds) == list(range(ROUNDS))


def test_jobs_report_and_list_read_a_simulated_job(simulated, tmp_path):
    _, job = simulated
    workspace = job.folder.folder.parent.parent
    listed = ok(hauler("jobs", "list", "--workspace", workspace)).stdout
    assert job.id in listed and "finished" in listed
    shown = ok(
        hauler("jobs", "report", job.id, "-o", tmp_path / "report", "--workspace", workspace)
    ).stdout
    assert "site-16" in shown and "validation/first" in shown
    for name in FIGURES:  # hello-numpy reports its increment: metrics.png is drawn too
        assert (tmp_path / "report" / name).stat().st_size > 0, name


def test_the_cli_runs_a_job_and_ends_with_its_summary(tmp_path):
    job_dir = hello_job(tmp_path, rounds=2, arrays=2, array_bytes=40_004)
    shown = ok(
        hauler("simulate", job_dir, "--sites", 4, "--workers", 2, "--workspace", tmp_path / "sim")
    ).stdout
    assert "round 1: 4/4 sites" in shown and "site-4" in shown and "job.finished" in shown, shown
    assert "hauler jobs report" in shown  # and says how to look further


def test_a_job_without_a_model_is_refused_with_what_to_do(tmp_path):
    job_dir = hello_job(tmp_path)
    config = tomllib.loads((job_dir / "job.toml").read_text())
    del config["model"]
    (job_dir / "job.toml").write_text(tomli_w.dumps(config))
    failed = hauler("simulate", job_dir, "--sites", 2, "--workspace", tmp_path / "sim")
    assert failed.returncode != 0 and "--initial-model" in failed.stderr, failed.stderr
    assert "Traceback" not in failed.stderr


def test_site_settings_default_to_index_and_count_under_what_a_file_gives(tmp_path):
    given = tmp_path / "sites.toml"
    given.write_text('[site-2]\ndata_dir = "/data/two"\n')
    settings = site_settings(SimulationPlan(tmp_path, 3, tmp_path, settings=given))
    assert settings["site-1"] == {"site_index": 0, "num_sites": 3}
    assert settings["site-2"] == {"site_index": 1, "num_sites": 3, "data_dir": "/data/two"}


@pytest.mark.parametrize("content", ["[site-9]\nx = 1\n", "site-1 = 3\n", "[site-1\n"])
def test_site_settings_for_unknown_sites_or_not_tables_are_refused(tmp_path, content):
    given = tmp_path / "sites.toml"
    given.write_text(content)
    with pytest.raises(ConfigError, match="site settings|cannot read"):
        site_settings(SimulationPlan(tmp_path, 3, tmp_path, settings=given))


@pytest.mark.slow
def test_hello_pytorch_learns_under_the_simulator_in_two_rounds(tmp_path):
    job_dir = tmp_path / "hello-pytorch"
    shutil.copytree(
        REPO / "examples" / "hello-pytorch", job_dir, ignore=shutil.ignore_patterns("__pycache__")
    )
    config = tomllib.loads((job_dir / "job.toml").read_text())
    config["workflow"].update(num_rounds=2)
    config["executor"]["config"].update(epochs=1)
    (job_dir / "job.toml").write_text(tomli_w.dumps(config))
    job = api.simulate(job_dir, sites=3, workers=2, workspace=tmp_path / "sim")
    sites = [r for r in job.metrics() if r["kind"] == "site"]
    start = {r["round"]: r["validation"]["accuracy_all"] for r in sites}  # the same on every site
    assert start[0] < 0.3 and start[1] > start[0] + 0.3, start
    assert {r["site"] for r in sites} == {"site-1", "site-2", "site-3"}


TIED_MODEL = '''"""hello-numpy's model with a second name tied to array_0, as an output layer
tied to an embedding; and a counter."""

import numpy as np

from .model_base import fill as base_fill, layout as base_layout


def layout(config):
    rows = base_layout(config)
    name, dtype, shape = rows[0]
    return [*rows, ("tied_head", dtype, shape, name), ("count", "I64", (2,))]


def fill(name, out, config):
    if name == "count":
        out[...] = [3, 4]
    else:
        base_fill(name, out, config)
'''

TIED_TRAIN = '''"""Adds `increment` once to every tensor the model holds (a tied name is the
same memory)."""

import numpy as np

import hauler


def main():
    while hauler.is_running():
        model = hauler.receive()
        assert np.shares_memory(model["tied_head"], model["array_0"]), "received untied"
        trained = {name: np.array(array) for name, array in model.items() if name != "tied_head"}
        for name, array in trained.items():
            array += 1 if name == "count" else np.float32(hauler.context().config["increment"])
        trained["tied_head"] = trained["array_0"]  # tied in what is sent too
        hauler.send(trained, weight=1.0)


main()
'''


def test_codecs_an_optimizer_and_tied_weights_in_the_simulator(tmp_path):
    """int8 both ways, server momentum and a tied tensor under `hauler.simulate`: the tied
    tensor is stored and folded once, the counter follows its policy, every upload and every
    later download is encoded, and the model lands where server momentum puts it."""
    job_dir = hello_job(tmp_path, rounds=3, min_clients=2, arrays=2, array_bytes=200_004)
    (job_dir / "model.py").rename(job_dir / "model_base.py")
    (job_dir / "model.py").write_text(TIED_MODEL)
    (job_dir / "train.py").write_text(TIED_TRAIN)
    config = tomllib.loads((job_dir / "job.toml").read_text())
    config["executor"] = {"script": "train.py", "config": {"increment": 0.125}}
    config["workflow"].update(optimizer="fedavgm", integers={"count": "sum"})
    config["transfer"] = {"upload": "int8", "download": "int8"}
    (job_dir / "job.toml").write_text(tomli_w.dumps(config))
    job = api.simulate(job_dir, sites=3, workers=2, workspace=tmp_path / "sim")
    assert job.record()["status"] == "finished"
    rounds = job.folder.folder / "global"
    with ModelFile.open(rounds / "round-0.safetensors", chunk_bytes=4 << 20) as first:
        start = {name: np.array(array) for name, array in first.arrays().items()}
    with ModelFile.open(rounds / "round-3.safetensors", chunk_bytes=4 << 20) as final:
        assert final.manifest.ties == (("tied_head", "array_0"),)
        arrays = final.arrays()
        moved = 0.125 * (1 + 1.9 + 2.71)  # fedavgm, momentum 0.9: steps d, 1.9 d, 2.71 d
        np.testing.assert_allclose(arrays["array_0"], start["array_0"] + moved, atol=1e-3)
        assert np.shares_memory(arrays["tied_head"], arrays["array_0"])
        assert arrays["count"].tolist() == [3 + 3 * 3, 4 + 3 * 3]  # sum: every site's +1, kept
    sites = [r for r in job.metrics() if r.get("kind") == "site"]
    assert all(r["upload"]["codec"] == "int8" for r in sites)
    assert [r["download"]["codec"] for r in sites if r["round"] == 0] == ["none"] * 3
    assert all(r["download"]["codec"] == "int8" for r in sites if r["round"] > 0)
    assert all(r["upload"]["wire_bytes"] < 0.3 * r["upload"]["bytes"] for r in sites)
