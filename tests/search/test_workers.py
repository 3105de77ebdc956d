"""Several workers on one study: real `python -m search.run` processes on PostgreSQL and on a journal file,
and the trials of workers that died are failed and measured again."""

import datetime
import json
import os
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import psycopg
import pytest
import sqlalchemy
from optuna.trial import TrialState

from pruning.architecture import ModelSpec
from search import run
from search.sampler import ARCH_ATTR
from search.space import SearchSpace
from search.study import open_storage, retry_dead_workers
from search.trial_objective import WORKER
from tests.conftest import service_unavailable
from tests.search.test_run import args

pytestmark = pytest.mark.slow  # real worker processes and end-to-end runs

ROOT = Path(__file__).resolve().parents[2]
# A bare postgresql:// URL, as users write it (SQLAlchemy 2 maps it to psycopg 3, which the postgres extra installs).
POSTGRES = os.environ.get("PRUNESEARCH_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
TRIALS = 7  # five startup trials, then guided ones slow enough that both workers overlap
WORKER_TIMEOUT_S = 240
HOST = socket.gethostname()


@pytest.fixture(scope="module")
def evaluation(tiny_model_dir, tmp_path_factory):
    """A shorter held-out text (about 60 windows of 32 tokens), so baselines and summaries are quick to measure."""
    path = tmp_path_factory.mktemp("text") / "evaluation.txt"
    path.write_text((tiny_model_dir / "evaluation.txt").read_text()[:4000])
    return path


def cli(tiny_model_dir, evaluation, out, *extra):
    return [*args(tiny_model_dir, out, "--budget", "75%", "--evaluation", str(evaluation)), *extra]


@dataclass
class Worker:
    process: subprocess.Popen
    out: Path
    log: Path


def start_workers(command_for, tmp_path, n=2):
    """`n` worker processes, one thread each (two cores, two workers), each with its own run directory."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    workers = []
    for i in range(n):
        out, log = tmp_path / f"worker{i}", tmp_path / f"worker{i}.log"
        with log.open("w") as sink:
            command = [sys.executable, "-m", "search.run", *command_for(out)]
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        workers.append(Worker(process, out, log))
    return workers


def wait(workers):
    try:
        for w in workers:
            w.process.wait(timeout=WORKER_TIMEOUT_S)
    finally:
        for w in workers:
            if w.process.poll() is None:
                w.process.kill()
                w.process.wait()
    for w in workers:
        assert w.process.returncode == 0, f"worker exited {w.process.returncode}:\n{w.log.read_text()[-3000:]}"


def check_shared_study(study, workers, storage):
    trials = study.get_trials()
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    assert [t.number for t in trials] == list(range(len(trials))), "a trial number is missing"
    assert [t.number for t in trials if t.state not in finished] == [], "a trial was left unfinished"
    # a worker stops once the study holds TRIALS finished trials; the other's trial in flight then still finishes
    assert TRIALS <= len(trials) <= TRIALS + 1
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    archs = [t.user_attrs[ARCH_ATTR] for t in complete]
    assert len(set(archs)) == len(archs), "an architecture was measured twice"
    # every measurement is one of these workers'; how many each made depends on the scheduler (one may start
    # after the other has finished them all), so that both measured is not asserted
    assert {t.user_attrs["worker"] for t in complete} <= {f"{HOST}:{w.process.pid}" for w in workers}
    for w in workers:  # each worker summarised the shared study into its own run directory
        summary = json.loads((w.out / "summary.json").read_text())
        assert (summary["study_name"], summary["storage"]) == (study.study_name, storage)
        assert trials[summary["best_trial"]].state == TrialState.COMPLETE
        assert (w.out / "best_architecture.json").exists()


@pytest.fixture
def postgres_url():
    """A fresh schema in the test database, so the workers create the tables together as on a first deployment."""
    try:
        admin = psycopg.connect(POSTGRES, connect_timeout=5, autocommit=True)
    except psycopg.OperationalError as err:
        service_unavailable(f"needs PostgreSQL at {POSTGRES} (or set PRUNESEARCH_TEST_POSTGRES): {err}")
    schema = f"prunesearch_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE SCHEMA {schema}")
    yield f"{POSTGRES}?options=-csearch_path%3D{schema}"
    with admin.cursor() as cursor:
        cursor.execute(f"DROP SCHEMA {schema} CASCADE")
    admin.close()


@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.postgres), "journal"])
def test_two_worker_processes_share_one_study(backend, tiny_model_dir, evaluation, tmp_path, request):
    storage = request.getfixturevalue("postgres_url") if backend == "postgresql" else f"journal:{tmp_path}/journal.log"
    name = f"workers-{uuid.uuid4().hex[:12]}"

    def command(out):
        return cli(tiny_model_dir, evaluation, out, "--trials", str(TRIALS), "--storage", storage, "--study-name", name)

    workers = start_workers(command, tmp_path)
    wait(workers)
    study = optuna.load_study(study_name=name, storage=open_storage(storage))
    try:
        check_shared_study(study, workers, storage)
    finally:
        optuna.delete_study(study_name=name, storage=open_storage(storage))


def space_of(study):
    identity = study.user_attrs["identity"]
    spec = ModelSpec.from_dict(identity["spec"])
    return SearchSpace(spec, identity["budget"], ffn_step=identity["ffn_step"], allow_drop=identity["allow_drop"])


def unmeasured(study, seed=7):
    """Parameters and architecture JSON of a candidate no trial of the study holds."""
    space, rng = space_of(study), np.random.default_rng(seed)
    held = {t.user_attrs.get(ARCH_ATTR) for t in study.trials}
    arch = next(a for a in (space.random(rng) for _ in range(100)) if a.to_json() not in held)
    return space.to_params(arch), arch.to_json()


def abandoned_trial(study, worker, seed=7):
    """A trial as a worker leaves it when it dies while measuring: running, parameters and architecture written."""
    params, arch_json = unmeasured(study, seed)
    study.enqueue_trial(params)
    trial = study.ask()
    for name, d in space_of(study).distributions().items():
        trial.suggest_int(name, d.low, d.high, step=d.step)
    trial.set_user_attr(ARCH_ATTR, arch_json)
    trial.set_user_attr("worker", worker)
    return trial, params, arch_json


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


@pytest.mark.parametrize("backend", ["sqlite", "journal", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_dead_workers_trial_is_failed_requeued_and_measured(backend, tiny_model_dir, evaluation, tmp_path, request):
    out = tmp_path / "run"
    storage = {"sqlite": f"sqlite:///{tmp_path}/study.db", "journal": f"journal:{tmp_path}/journal.log"}.get(backend) \
        or request.getfixturevalue("postgres_url")
    assert run.main(cli(tiny_model_dir, evaluation, out, "--trials", "5", "--storage", storage)) == 0
    study = optuna.load_study(study_name="run", storage=open_storage(storage))
    dead, params, arch_json = abandoned_trial(study, f"{HOST}:{dead_pid()}")
    for seed, worker in enumerate((WORKER, f"elsewhere:{dead_pid()}", "no worker attribute"), start=1):
        abandoned_trial(study, worker, seed)  # alive here, another machine's, unknown: all left running
    assert dead.number == 5

    assert retry_dead_workers(study) == [5]
    trials = study.get_trials()
    assert [t.state for t in trials[5:]] == [TrialState.FAIL] + [TrialState.RUNNING] * 3 + [TrialState.WAITING]
    assert (trials[9].system_attrs["fixed_params"], trials[9].user_attrs) == (params, {"retry_of": 5})
    assert retry_dead_workers(study) == []

    assert run.main(cli(tiny_model_dir, evaluation, out, "--trials", "7", "--storage", storage)) == 0
    trials = study.get_trials()
    retried = trials[9]
    assert (retried.state, retried.params, retried.user_attrs[ARCH_ATTR]) == (TrialState.COMPLETE, params, arch_json)
    assert retried.user_attrs["worker"] == WORKER
    # seven measurements asked for, seven made: the killed trial is not one of them
    assert [t.number for t in trials if t.state == TrialState.COMPLETE] == [0, 1, 2, 3, 4, 9, 10]
    assert json.loads((out / "summary.json").read_text())["trials_failed"] == 0


def test_a_trial_with_a_stale_heartbeat_is_failed_and_measured_again(tiny_model_dir, evaluation, tmp_path):
    out = tmp_path / "run"
    assert run.main(cli(tiny_model_dir, evaluation, out, "--trials", "5")) == 0
    storage = open_storage(f"sqlite:///{out}/study.db")
    study = optuna.load_study(study_name="run", storage=storage)
    stale, params, arch_json = abandoned_trial(study, "elsewhere:1")  # another machine: only its heartbeat tells
    storage.record_heartbeat(stale._trial_id)
    with storage.engine.begin() as connection:  # its last beat, long before the grace period
        connection.execute(
            sqlalchemy.text("UPDATE trial_heartbeats SET heartbeat = :t WHERE trial_id = :id"),
            {"t": datetime.datetime(2000, 1, 1), "id": stale._trial_id},
        )

    assert run.main(cli(tiny_model_dir, evaluation, out, "--trials", "7")) == 0
    trials = study.get_trials()
    # seven measurements asked for: the stale trial's retry is one, and one more is made
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5 + [TrialState.FAIL] + [TrialState.COMPLETE] * 2
    retried = trials[6]
    assert (retried.system_attrs["failed_trial"], retried.params, retried.user_attrs[ARCH_ATTR]) == (
        stale.number,
        params,
        arch_json,
    )
