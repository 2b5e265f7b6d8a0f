"""Shared test setup: no test writes MLflow runs into the working directory; hypothesis
runs derandomized in CI so a run is reproducible from its commit.

Perturbations that move float rounding (``docs/findings.md``): every test that asserts a finding of
trained models (``@pytest.mark.finding``) must hold under each of them. They are read from the
environment, so any run of the suite can be made under one:

- ``DUBITO_TEST_THREADS=N``: PyTorch intra-op threads for the whole suite (also ``OMP_NUM_THREADS``
  for the processes tests start; it overrides the ``one_thread`` fixture);
- ``DUBITO_TEST_CHANNELS_LAST=0|1``: the MC engine's ``channels_last`` (default ``auto``: on for
  convolutional models);
- ``DUBITO_TEST_MC_CHUNK=K``: the MC engine's ``chunk_size`` (default ``auto``);
- ``DUBITO_TEST_SEED_OFFSET=S``: finding tests shift their seeds by S (``finding.seed``);
- ``DUBITO_FINDINGS_LOG=FILE``: every checked finding (test, quantity, value, threshold, the
  perturbation) is appended to FILE as a JSON line, and a test checks all of its findings before
  failing. ``python -m tests.findings`` runs the finding tests under each perturbation this way
  and writes the table of ``docs/findings.md``.
"""

from __future__ import annotations

import json
import operator
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

PERTURBATIONS = (
    "DUBITO_TEST_THREADS",
    "DUBITO_TEST_CHANNELS_LAST",
    "DUBITO_TEST_MC_CHUNK",
    "DUBITO_TEST_SEED_OFFSET",
)


def _threads() -> int | None:
    value = os.environ.get("DUBITO_TEST_THREADS")
    return int(value) if value else None


def _worker_threads() -> int | None:
    """Under pytest-xdist: the cores this process may use shared among the workers (one at least)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(workers))


def pytest_configure(config) -> None:
    threads = _threads() or _worker_threads()
    if threads:
        import torch

        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the dubito commands tests run in subprocesses
    forced = {}
    if os.environ.get("DUBITO_TEST_CHANNELS_LAST"):
        forced["channels_last"] = os.environ["DUBITO_TEST_CHANNELS_LAST"] == "1"
    if os.environ.get("DUBITO_TEST_MC_CHUNK"):
        value = os.environ["DUBITO_TEST_MC_CHUNK"]
        forced["chunk_size"] = value if value == "auto" else int(value)
    if forced:  # every caller of the MC engine in this process (spawned workers keep the defaults)
        import functools

        import dubito.agents.agents
        import dubito.platform
        import dubito.platform.mc
        import dubito.platform.service

        original = dubito.platform.mc.mc_samples

        @functools.wraps(original)
        def perturbed(*args, **kwargs):
            return original(*args, **{**kwargs, **forced})

        for module in (dubito.platform.mc, dubito.platform.service, dubito.agents.agents, dubito.platform):
            module.mc_samples = perturbed


# the test files that use the one shared Ray instance (``ray_session``): ``make test``'s workers run
# them all in one worker (pytest-xdist with ``--dist loadfile``; the other files go to any worker)
RAY_TEST_FILES = (
    "tests/acquisition/test_distributed.py",
    "tests/acquisition/test_plugins.py",
    "tests/experiments/test_sweep.py",
    "tests/platform/test_ray_train.py",
    "tests/test_benchmarks.py",
)


def _misplaced(item) -> str | None:
    file = item.nodeid.split("::", 1)[0]
    if "ray_session" in getattr(item, "fixturenames", ()) and file not in RAY_TEST_FILES:
        return f"{item.nodeid} uses ray_session: add {file} to RAY_TEST_FILES in tests/conftest.py"
    return None


def pytest_runtest_setup(item) -> None:
    """A Ray test outside :data:`RAY_TEST_FILES` fails (its worker would start a Ray of its own)."""
    message = _misplaced(item)
    if message:
        pytest.fail(message, pytrace=False)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: without xdist the suite runs in one process
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` (and plain ``-n N``): a file's tests in one worker, so its module-scoped
    trained fixtures are built once, with the files of :data:`RAY_TEST_FILES` as one unit: one
    worker, one Ray instance. (pytest-xdist's ``loadgroup`` marks are not read under pytest 9.)"""
    if config.getvalue("dist") not in ("load", "loadfile"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class _Files(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return "ray" if file in RAY_TEST_FILES else file

    return _Files(config, log)


_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


class Findings:
    """``check(quantity, value, op, threshold)`` asserts one finding of a trained model and records
    it; ``seed(s)`` is a seed shifted by ``DUBITO_TEST_SEED_OFFSET``."""

    def __init__(self, test: str) -> None:
        self.test = test
        self.log = os.environ.get("DUBITO_FINDINGS_LOG")
        self.offset = int(os.environ.get("DUBITO_TEST_SEED_OFFSET") or 0)
        self.failed: list[str] = []

    def seed(self, seed: int) -> int:
        return seed + self.offset

    def check(self, quantity: str, value: float, op: str, threshold: float, detail: object = None) -> None:
        ok = bool(_OPS[op](value, threshold))
        if self.log:
            perturbation = {
                k[len("DUBITO_TEST_") :].lower(): os.environ[k] for k in PERTURBATIONS if os.environ.get(k)
            }
            with open(self.log, "a") as f:
                f.write(
                    json.dumps(
                        {
                            "test": self.test,
                            "quantity": quantity,
                            "value": float(value),
                            "op": op,
                            "threshold": float(threshold),
                            "ok": ok,
                            "perturbation": perturbation,
                        }
                    )
                    + "\n"
                )
        message = f"{quantity} = {value:.4g}, expected {op} {threshold:g}" + (
            f" ({detail})" if detail is not None else ""
        )
        if not ok:
            if not self.log:
                raise AssertionError(message)
            self.failed.append(message)


@pytest.fixture
def finding(request):
    """Checks of a trained model's statistics (see :class:`Findings`)."""
    found = Findings(request.node.nodeid)
    yield found
    if found.failed:
        pytest.fail("; ".join(found.failed))


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, created once (MLflow's schema migrations take seconds);
    every test gets its own copy."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient("sqlite:///" + str(path.resolve())).search_experiments()
    return path


def _fresh_store(template: Path, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mlflow.db"
    shutil.copyfile(template, path)
    return "sqlite:///" + str(path.resolve())


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch, _mlflow_template) -> str:
    """A temporary absolute SQLite tracking URI, also exported as MLFLOW_TRACKING_URI."""
    uri = _fresh_store(_mlflow_template, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(autouse=True)
def _no_stray_mlflow(tmp_path_factory, monkeypatch, _mlflow_template):
    """Tests that forget the mlflow_uri fixture still log into a temporary store."""
    if "MLFLOW_TRACKING_URI" not in os.environ:
        uri = _fresh_store(_mlflow_template, tmp_path_factory.mktemp("mlflow"))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: on a busy 2-core machine extra threads make
    them several times slower (``DUBITO_TEST_THREADS`` overrides it). The previous count is
    restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(_threads() or 1)
    yield
    torch.set_num_threads(threads)


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process on this machine."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry.name)] = (parent, command)
    return table


def ray_processes(session: str) -> set[int]:
    """Process ids of one Ray session on this machine: its daemons (their command lines name the
    session) and every process they started (workers)."""
    table = _processes()
    ours = {pid for pid, (_, command) in table.items() if session in command}
    grown = True
    while grown:
        children = {pid for pid, (parent, _) in table.items() if parent in ours} - ours
        ours |= children
        grown = bool(children)
    return ours


@pytest.fixture(scope="session")
def ray_session():
    """The one local Ray instance the tests share (2 CPUs, no dashboard, small object store);
    its address, for commands run in a subprocess (``RAY_ADDRESS``). Shut down at the end, and
    checked: no process of its session is left behind."""
    import time

    import ray

    from dubito.platform.cluster import connect

    os.environ.pop("RAY_ADDRESS", None)
    connect(num_cpus=2)
    address = ray.get_runtime_context().gcs_address
    session = Path(ray._private.worker._global_node.get_session_dir_path()).name
    yield address
    ours = ray_processes(
        session
    )  # before shutting down: workers orphaned by it would no longer look like ours

    def alive() -> set[int]:
        return {pid for pid in ours if Path(f"/proc/{pid}").exists()} | ray_processes(session)

    ray.shutdown()
    deadline = time.monotonic() + 30
    while (left := alive()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of Ray session {session} left behind: {sorted(left)}"
