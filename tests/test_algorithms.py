"""hauler.algorithms: FedProx's term and gradient, and FedProx and SCAFFOLD over two rounds of
a small linear regression on 2-3 sites (under `hauler.simulate`, and SCAFFOLD on a real
federation), against the same rounds written out plainly in numpy."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from helpers import REPO, federation, hauler, ok, submitted_job_id
from safetensors.numpy import load_file

import hauler as api
from hauler.algorithms import fedprox, scaffold
from hauler.client.tensors import to_torch
from hauler.core.errors import ConfigError, JobError
from hauler.model import Manifest, ModelFile

ROUNDS, STEPS, LR, MU = 2, 5, 0.1, 0.5
EXAMPLE = REPO / "examples" / "hello-pytorch"
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}  # float32 training against float64 formulas

DATA = '''"""Each site's regression data, fixed by its index; sites differ in size and target."""

import numpy as np

FEATURES = 3


def site_data(index):
    rng = np.random.default_rng(index)
    x = rng.normal(size=(4 + 3 * index, FEATURES)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5]) + 2.0 * index).astype(np.float32)
    return x, y
'''

MODEL = '''"""A linear regression; with `algorithm = "scaffold"`, SCAFFOLD's variates too."""

from hauler.algorithms import scaffold

FEATURES = 3  # regression_data.py's (a model module imports its siblings relatively)


def layout(config):
    rows = [("linear.weight", "F32", (1, FEATURES)), ("linear.bias", "F32", (1,))]
    return scaffold.layout(rows) if config.get("algorithm") == "scaffold" else rows


def fill(name, out, config):
    out[...] = 0.0 if scaffold.is_variate(name) else 0.25
'''

TRAIN = '''"""Full-batch SGD on half the mean squared error, corrected by the algorithm."""

import torch
from regression_data import FEATURES, site_data

import hauler
from hauler.algorithms import fedprox, scaffold


def local(config, net, model, workdir):
    if config["algorithm"] == "scaffold":
        return scaffold.Scaffold(net, model, workdir, lr=config["lr"])
    return fedprox.FedProx(net, model, mu=config["mu"])


while hauler.is_running():
    context, config = hauler.context(), hauler.context().config
    x, y = map(torch.from_numpy, site_data(context.settings["site_index"]))
    model = hauler.receive("torch")
    net = torch.nn.Sequential()
    net.add_module("linear", torch.nn.Linear(FEATURES, 1))
    net.load_state_dict(scaffold.weights(model))
    algorithm = local(config, net, model, context.workdir)
    optimiser = torch.optim.SGD(net.parameters(), lr=config["lr"])
    for _ in range(config["steps"]):
        optimiser.zero_grad()
        loss = ((net(x).squeeze(1) - y) ** 2).mean() / 2
        if config.get("by_term"):
            loss = loss + algorithm.term()
        loss.backward()
        if not config.get("by_term"):
            algorithm.correct()
        optimiser.step()
    hauler.send(net.state_dict() | algorithm.update(), weight=len(y))
'''


def regression_job(
    folder: Path, algorithm: str, *, sites: int, mode: str = "in_process", **more: object
) -> Path:
    """The regression job above, for `algorithm` on `sites` sites; `more` goes into job.toml
    (`transfer`, `workflow`) or the executor's config."""
    job_dir = folder / f"regression-{algorithm}"
    job_dir.mkdir()
    for name, text in (("regression_data.py", DATA), ("model.py", MODEL), ("train.py", TRAIN)):
        (job_dir / name).write_text(text)
    workflow = {"num_rounds": ROUNDS, "min_clients": sites, **more.pop("workflow", {})}
    transfer = more.pop("transfer", {})
    executor = {"algorithm": algorithm, "lr": LR, "steps": STEPS, "mu": MU, **more}
    job = {
        "name": f"regression-{algorithm}",
        "workflow": workflow,
        "model": {"module": "model", "config": {"algorithm": algorithm}},
        "executor": {"script": "train.py", "mode": mode, "config": executor},
        "transfer": transfer,
    }
    (job_dir / "job.toml").write_text(tomli_w.dumps(job))
    return job_dir


def site_data(index: int) -> tuple[np.ndarray, np.ndarray]:
    """The job's own data function, run here."""
    namespace: dict = {}
    exec(DATA, namespace)
    return namespace["site_data"](index)


def gradient(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> dict:
    """Of half the mean squared error of x @ w.T + b against y, in float64."""
    residual = x @ params["linear.weight"][0] + params["linear.bias"][0] - y
    return {
        "linear.weight": (residual @ x / len(y))[None, :],
        "linear.bias": np.array([residual.mean()]),
    }


def local_steps(algorithm: str, x: dict, c: dict, c_site: dict, features, targets) -> dict:
    """A site's STEPS steps of SGD from x, each gradient corrected as the algorithm says:
    FedProx adds mu (w - x), SCAFFOLD adds c - c_i."""
    y = {name: value.copy() for name, value in x.items()}
    for _ in range(STEPS):
        g = gradient(y, features, targets)
        for n in y:
            g[n] += MU * (y[n] - x[n]) if algorithm == "fedprox" else c[n] - c_site[n]
            y[n] -= LR * g[n]
    return y


def reference(algorithm: str, sites: int) -> tuple[dict[str, np.ndarray], list[dict]]:
    """The global model (with SCAFFOLD's server variate) after ROUNDS rounds, and every site's
    own variate, by the papers' rules: SCAFFOLD's sites set c_i+ = c_i - c + (x - y)/(K lr);
    the server takes the weighted mean of the models and adds the weighted mean of the sites'
    changes c_i+ - c_i to c."""
    x = {"linear.weight": np.full((1, 3), 0.25), "linear.bias": np.full((1,), 0.25)}
    c = {name: np.zeros_like(value) for name, value in x.items()}
    c_sites = [dict(c) for _ in range(sites)]
    data = [tuple(a.astype(np.float64) for a in site_data(i)) for i in range(sites)]
    weights = np.array([len(y) for _, y in data], np.float64) / sum(len(y) for _, y in data)
    for _ in range(ROUNDS):
        models = [local_steps(algorithm, x, c, c_sites[i], *data[i]) for i in range(sites)]
        new = [
            {n: c_i[n] - c[n] + (x[n] - y[n]) / (STEPS * LR) for n in x}
            for c_i, y in zip(c_sites, models)
        ]
        c = {n: c[n] + sum(w * (a[n] - b[n]) for w, a, b in zip(weights, new, c_sites)) for n in c}
        c_sites = new
        x = {n: sum(w * y[n] for w, y in zip(weights, models)) for n in x}
    if algorithm != "scaffold":
        return x, []
    return x | {scaffold.variate_name(n): value for n, value in c.items()}, c_sites


def final_model(job: api.LocalJob) -> dict[str, np.ndarray]:
    return load_file(str(job.folder.folder / "global" / f"round-{ROUNDS}.safetensors"))


def assert_site_variates(site_dirs: list[Path], expected: list[dict[str, np.ndarray]]) -> None:
    """Each site's own variate, in its work folder, against the reference's c_i."""
    for site_dir, variates in zip(site_dirs, expected, strict=True):
        store = scaffold.SiteVariates(site_dir / scaffold.SITE_FOLDER)
        kept = load_file(str(store.path(store.current)))
        assert_close(kept, {scaffold.variate_name(n): value for n, value in variates.items()})


def assert_close(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], **tolerance):
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, err_msg=name, **(tolerance or TOLERANCE))


# ----- FedProx's term and gradient -----------------------------------------------------------


def small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


@pytest.fixture
def received(tmp_path) -> dict[str, torch.Tensor]:
    """A global model as `hauler.receive("torch")` gives it: tensors viewing a model file."""
    net = small_net()
    rng = np.random.default_rng(1)
    layout = [(name, "F32", tuple(t.shape)) for name, t in net.state_dict().items()]
    model = ModelFile.create(tmp_path / "global.safetensors", Manifest.build(layout, 4096))
    for array in model.arrays().values():
        array[...] = rng.normal(size=array.shape)
    return to_torch(model.arrays())


def test_fedprox_term_and_its_gradient_are_mu_over_2_squared_distance_and_mu_distance(received):
    net = small_net()
    proximal = fedprox.FedProx(net, received, mu=MU)
    term = proximal.term()
    term.backward()
    for name, w in net.named_parameters():
        distance = w.detach().numpy().astype(np.float64) - received[name].numpy()
        np.testing.assert_allclose(w.grad.numpy(), MU * distance, **TOLERANCE)
    distances = [
        ((w.detach().numpy().astype(np.float64) - received[name].numpy()) ** 2).sum()
        for name, w in net.named_parameters()
    ]
    np.testing.assert_allclose(float(term.detach()), MU / 2 * sum(distances), **TOLERANCE)


def test_fedprox_correct_adds_the_term_s_gradient_to_the_loss_s(received):
    net = small_net()
    inputs = torch.from_numpy(np.random.default_rng(2).normal(size=(5, 4)).astype(np.float32))
    net(inputs).square().sum().backward()
    plain = {name: w.grad.numpy().copy() for name, w in net.named_parameters()}
    fedprox.FedProx(net, received, mu=MU).correct()
    for name, w in net.named_parameters():
        distance = w.detach().numpy() - received[name].numpy()
        np.testing.assert_allclose(w.grad.numpy(), plain[name] + MU * distance, **TOLERANCE)


def test_fedprox_reads_the_received_file_itself_not_a_copy(received):
    net = small_net()
    proximal = fedprox.FedProx(net, received, mu=MU)
    before = float(proximal.term().detach())
    received["0.bias"].add_(10.0)  # a change of the file shows in the term
    assert float(proximal.term().detach()) > before + 1.0
    with pytest.raises(ConfigError, match="mu >= 0"):
        fedprox.FedProx(net, received, mu=-1.0)


# ----- SCAFFOLD's layout and site file -----------------------------------------------------------


def test_scaffold_layout_adds_a_float_variate_per_float_tensor_and_none_for_the_rest():
    base = [
        ("w", "BF16", (2, 3)),
        ("d", "F64", (4,)),
        ("steps", "I64", ()),
        ("head", "BF16", (2, 3), "w"),
    ]
    assert scaffold.layout(base) == [
        *base,
        ("scaffold.c/w", "F32", (2, 3)),
        ("scaffold.c/d", "F64", (4,)),
    ]
    assert scaffold.layout(base, names=["d"]) == [*base, ("scaffold.c/d", "F64", (4,))]


def test_scaffold_without_variates_in_the_model_says_how_to_add_them(received, tmp_path):
    with pytest.raises(ConfigError, match=r"scaffold\.layout"):
        scaffold.Scaffold(small_net(), received, tmp_path, lr=LR)


def test_a_site_variate_file_of_another_model_is_refused_naming_it(tmp_path):
    slots = {"scaffold.c/w": torch.zeros(3)}
    scaffold.open_site_variates(tmp_path / "c.safetensors", slots).close()
    with pytest.raises(JobError, match="another model"):
        scaffold.open_site_variates(tmp_path / "c.safetensors", {"scaffold.c/w": torch.zeros(4)})


def global_with_variates(folder: Path, seed: int) -> dict[str, torch.Tensor]:
    """small_net's layout with SCAFFOLD's variates, every value drawn from `seed`, as
    `hauler.receive("torch")` gives it (the same seed: the same global model, sent again)."""
    layout = [(name, "F32", tuple(t.shape)) for name, t in small_net().state_dict().items()]
    model = ModelFile.create(
        folder / "global.safetensors", Manifest.build(scaffold.layout(layout), 4096)
    )
    rng = np.random.default_rng(seed)
    for array in model.arrays().values():
        array[...] = rng.normal(size=array.shape)
    return to_torch(model.arrays())


def train_scaffold_round(folder: Path, workdir: Path, seed: int) -> dict[str, np.ndarray]:
    """One site's round: three SGD steps from global model `seed`; its c_i afterwards."""
    model = global_with_variates(folder, seed)
    net = small_net()
    net.load_state_dict(scaffold.weights(model))
    algorithm = scaffold.Scaffold(net, model, workdir, lr=LR)
    optimiser = torch.optim.SGD(net.parameters(), lr=LR)
    for step in range(3):
        optimiser.zero_grad()
        net(torch.full((2, 4), float(step))).square().sum().backward()
        algorithm.correct()
        optimiser.step()
    algorithm.update()
    store = scaffold.SiteVariates(workdir / scaffold.SITE_FOLDER)
    return {name: value.copy() for name, value in load_file(str(store.path(store.current))).items()}


def test_a_site_training_the_same_global_model_again_advances_its_variate_once(tmp_path):
    """A restarted site, or a round retried after a lost upload, trains the same global model
    again: it starts from the variate before that round's, not from the one it made."""
    work = tmp_path / "work"
    first = train_scaffold_round(tmp_path, work, seed=1)
    assert all(np.abs(c).max() > 0 for c in first.values())
    again = train_scaffold_round(tmp_path, work, seed=1)
    assert_close(again, first)
    following = train_scaffold_round(tmp_path, work, seed=2)  # the next round's global model
    fresh = train_scaffold_round(tmp_path, tmp_path / "fresh", seed=2)  # from zeros instead
    assert not all(np.allclose(following[n], fresh[n]) for n in fresh)  # started from `first`
    store = scaffold.SiteVariates(work / scaffold.SITE_FOLDER)
    assert (store.before, store.current) == (2, 3)  # the retry's replaced the first's
    assert sorted(p.name for p in store.folder.glob("c-*")) == [
        "c-2.safetensors",
        "c-3.safetensors",
    ]


def test_a_crash_while_a_site_writes_its_variate_leaves_the_last_whole_one(tmp_path):
    work = tmp_path / "work"
    first = train_scaffold_round(tmp_path, work, seed=1)
    store = scaffold.SiteVariates(work / scaffold.SITE_FOLDER)
    torn = store.path(store.current + 1)
    torn.write_bytes(store.path(store.current).read_bytes()[:100])  # the crash came mid-write
    assert_close(train_scaffold_round(tmp_path, work, seed=1), first)  # retried: as before
    assert not torn.exists() or torn.stat().st_size > 100  # written anew, or gone
    store.state_path.write_text('{"current": 3')  # a state torn by hand: said, not guessed
    with pytest.raises(JobError, match="remove .*scaffold to start"):
        train_scaffold_round(tmp_path, work, seed=2)


# ----- two rounds against numpy ------------------------------------------------------------------


@pytest.mark.parametrize("by_term", [False, True], ids=["gradient", "term"])
def test_fedprox_over_two_rounds_under_the_simulator_matches_numpy(tmp_path, by_term):
    job_dir = regression_job(tmp_path, "fedprox", sites=3, by_term=by_term)
    job = api.simulate(job_dir, sites=3, workers=2, workspace=tmp_path / "sim")
    assert_close(final_model(job), reference("fedprox", 3)[0])


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_scaffold_over_two_rounds_under_the_simulator_matches_numpy(tmp_path, codec):
    """The global model and the server's variate, and every site's own variate in its file;
    with a (lossless) codec, uploads and downloads are deltas, the variates' included."""
    transfer = {"upload": codec, "download": codec}
    job_dir = regression_job(tmp_path, "scaffold", sites=3, transfer=transfer)
    job = api.simulate(job_dir, sites=3, workers=2, workspace=tmp_path / "sim")
    expected, sites = reference("scaffold", 3)
    assert_close(final_model(job), expected)
    assert_site_variates([job.folder.folder / "sites" / f"site-{k}" for k in (1, 2, 3)], sites)


def test_scaffold_with_int8_both_ways_stays_near_numpy(tmp_path):
    """Uploads are then int8 deltas (the variate slots carry c_i+ - c_i), and so are downloads."""
    job_dir = regression_job(
        tmp_path, "scaffold", sites=3, transfer={"upload": "int8", "download": "int8"}
    )
    job = api.simulate(job_dir, sites=3, workers=2, workspace=tmp_path / "sim")
    assert_close(final_model(job), reference("scaffold", 3)[0], rtol=0, atol=0.05)


def test_scaffold_with_a_server_optimizer_other_than_fedavg_is_refused(tmp_path):
    job_dir = regression_job(tmp_path, "scaffold", sites=2, workflow={"optimizer": "fedavgm"})
    with pytest.raises(ConfigError, match='optimizer = "fedavg"'):
        api.simulate(job_dir, sites=2, workers=1, workspace=tmp_path / "sim")


@pytest.mark.slow
def test_hello_pytorch_runs_scaffold_when_both_configs_say_so(tmp_path):
    job_dir = tmp_path / "hello-pytorch"
    shutil.copytree(EXAMPLE, job_dir, ignore=shutil.ignore_patterns("__pycache__"))
    config = tomllib.loads((job_dir / "job.toml").read_text())
    config["workflow"].update(num_rounds=2)
    config["model"]["config"].update(algorithm="scaffold")
    config["executor"].update(mode="in_process")  # torch is imported here already; its
    # scripts' sibling modules (data, model) join this process's sys.modules under those names
    config["executor"]["config"].update(algorithm="scaffold", epochs=1)
    (job_dir / "job.toml").write_text(tomli_w.dumps(config))
    job = api.simulate(job_dir, sites=3, workers=2, workspace=tmp_path / "sim")
    variates = scaffold.variates(final_model(job))
    assert len(variates) == 4 and all(np.abs(c).max() > 0 for c in variates.values())
    sites = [job.folder.folder / "sites" / f"site-{k}" / scaffold.SITE_FOLDER for k in (1, 2, 3)]
    assert all(scaffold.SiteVariates(site).current > 0 for site in sites)  # each advanced


@pytest.mark.slow
def test_fedprox_and_scaffold_on_a_real_federation_match_numpy(tmp_path):
    """A server and two site processes, the script in a child process of each site; one job of
    each algorithm on the same federation."""
    workspace = tmp_path / "poc"
    with federation(workspace, sites=2):
        jobs = {
            algorithm: run_job(
                regression_job(tmp_path, algorithm, sites=2, mode="subprocess"),
                workspace,
                tmp_path / f"out-{algorithm}",
            )
            for algorithm in ("fedprox", "scaffold")
        }
    for algorithm, job_id in jobs.items():
        expected, sites = reference(algorithm, 2)
        assert_close(load_file(str(tmp_path / f"out-{algorithm}" / "global.safetensors")), expected)
        if algorithm == "scaffold":
            job_dirs = [workspace / f"site-{k}" / "jobs" / job_id for k in (1, 2)]
            assert_site_variates(job_dirs, sites)


def run_job(job_dir: Path, workspace: Path, out: Path) -> str:
    """Submit `job_dir` to the POC in `workspace`, wait for it and download its model to `out`;
    returns its id."""
    job_id = submitted_job_id(
        ok(hauler("submit", job_dir, "--workspace", workspace, "--wait")).stdout
    )
    ok(hauler("jobs", "download", job_id, "-o", out, "--workspace", workspace))
    return job_id
