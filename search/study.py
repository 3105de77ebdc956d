"""Optuna storage and study: create or resume, refuse mismatched studies, retry dead workers' trials.

Storage URLs:
    sqlite:///runs/x/study.db      default, one machine (heartbeat on, so stale trials are retried)
    postgresql://host/db           several machines (heartbeat on)
    journal:runs/x/journal.log     several processes on one machine through a lock-protected file
For journal files, which have no heartbeat, a running trial whose worker process on
this host is gone is failed and its parameters are queued again (`retry_dead_workers`).

`--trials N` asks for N measurements (`is_measurement`): a trial whose worker died or
was interrupted mid-measurement is not one, so the run goes on until N trials have
measured (its queued retry, on any storage, measures the same architecture).
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from search.record import StudyRecord
from search.trials import enqueue_retry, trial_error, trial_worker

HEARTBEAT_S = 30
SCHEMA_ATTEMPTS = 3


class StudyMismatchError(ValueError):
    pass


class StorageError(ValueError):
    pass


def open_storage(url: str) -> BaseStorage:
    """Connect to (and create the tables of) an Optuna storage; errors say what to change."""
    try:
        if url.startswith("journal:"):
            return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
        return _rdb_storage(url)
    except Exception as err:  # sqlalchemy/driver errors: unreachable host, bad URL, missing driver
        raise StorageError(
            f"cannot open storage {url!r}: {str(err).splitlines()[0]}. Give sqlite:///path/study.db, "
            "journal:path/journal.log, or a reachable postgresql://user@host/db (pip install 'prunesearch[postgres]')"
        ) from err


def _rdb_storage(url: str) -> RDBStorage:
    """Workers started together on an empty database race to create Optuna's tables, in two
    transactions (the tables, then alembic's version table). A loser's error comes once the winner
    has committed, so each race costs it one more try and the third finds everything there."""
    options = dict(
        heartbeat_interval=HEARTBEAT_S,
        grace_period=4 * HEARTBEAT_S,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
        engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
    )
    for _ in range(SCHEMA_ATTEMPTS - 1):
        with contextlib.suppress(sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            return RDBStorage(url, **options)
    return RDBStorage(url, **options)


def open_study(
    storage: BaseStorage, name: str, sampler: optuna.samplers.BaseSampler | None, identity: dict[str, Any],
    direction: str = "minimize",
) -> optuna.Study:
    """Create the study (minimising or maximising the objective), or resume it when its `identity` (model, budget,
    space, objective) matches."""
    study = optuna.create_study(
        storage=storage, study_name=name, sampler=sampler, direction=direction, load_if_exists=True
    )
    stored = StudyRecord.from_study(study).identity
    if stored is None:
        StudyRecord(identity=identity).to_study(study)
    elif stored != identity:
        diff = sorted(k for k in identity if stored.get(k) != identity[k])
        raise StudyMismatchError(
            f"study {name!r} already exists for a different {', '.join(diff)}; "
            "give another --study-name or --out, or repeat the original command to resume it"
        )
    return study


def retry_dead_workers(study: optuna.Study) -> list[int]:
    """Fail running trials whose worker process on this host has died; queue their parameters again."""
    host = socket.gethostname()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = (trial_worker(trial) or "").rpartition(":")
        if worker_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:  # another worker starting up got there first and queued it
            continue
        enqueue_retry(study, trial)
        failed.append(trial.number)
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def count_trials(study: optuna.Study, *states: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def is_measurement(trial: optuna.trial.FrozenTrial) -> bool:
    """Measured, skipped as a duplicate, or failed on its own (out of memory, non-finite metric: the
    objective writes "error"); not a trial whose worker was killed or interrupted while measuring."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and trial_error(trial) is not None
    )


def count_measurements(study: optuna.Study) -> int:
    return sum(is_measurement(t) for t in study.get_trials(deepcopy=False))


class StopAfterMeasurements:
    """Optuna callback: stop the study once it holds `n` measurements (`MaxTrialsCallback` counts
    every failed trial, killed ones included, so a killed trial would cost the user a measurement)."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if count_measurements(study) >= self.n:
            study.stop()
