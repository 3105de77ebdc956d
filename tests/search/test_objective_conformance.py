"""What every registered objective must do, tested through the registry (the toy one of `toy_objective` included).

In the spirit of Optuna's `optuna/testing/pytest_samplers.py`: each objective is configured, checked,
built for both splits and measured on a tiny model exactly as a run does (`RunConfig` -> `prepare` ->
`Setup.objective`), and recorded on trials by `TrialObjective`.
"""

import json
import math

import optuna
import pytest

import tests.search.toy_objective  # noqa: F401 (registers the toy objective)
from pruning.importance import load_or_compute
from search import objectives, run
from search.config import RunConfig
from search.objectives import REGISTRY, Objective, register_objective
from search.record import StudyRecord
from search.report import RunSummary
from search.setup import prepare
from search.trial_objective import TrialObjective
from search.trials import DIRECTIONS, measurements, to_loss
from tests.search.test_run import args, load
from tests.search.test_task_objectives import ROWS, write_lm_eval_task

NEEDS = ("teacher", "labels")


def task_settings(root) -> dict:
    path = root / "conformance-task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 3))
    return dict(task=str(path), task_template="{question}", task_search_examples=4)


def lm_eval_settings(root) -> dict:
    pytest.importorskip("lm_eval")
    return dict(objective="lm-eval:tiny_mc", eval_include=write_lm_eval_task(root, ROWS * 2), eval_limit=3)


# what an objective needs beyond its name to be measured on the tiny model; the others need nothing
SETTINGS = {"task": task_settings, "lm-eval": lm_eval_settings}
SLOW = ("lm-eval",)  # lm-eval indexes its own tasks first (seconds)
NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in REGISTRY]


def config_of(name: str, root, out) -> RunConfig:
    settings = {"objective": name, **SETTINGS.get(name, lambda _: {})(root)}
    return RunConfig(model=str(root / "model"), calibration=str(root / "calibration.txt"),
                     evaluation=str(root / "evaluation.txt"), seq_len=32, calibration_windows=8, search_windows=4,
                     ffn_step=1, export=False, out=str(out), **settings)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """name -> (config, setup), prepared once per objective."""
    cache = {}

    def get(name):
        if name not in cache:
            config = config_of(name, tiny_model_dir, tmp_path_factory.mktemp(name))
            cache[name] = config, prepare(config)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(REGISTRY))
def test_declares_its_direction_cost_needs_and_companions(name):
    cls = REGISTRY[name]
    assert cls.direction in DIRECTIONS and set(cls.needs) <= set(NEEDS)
    assert cls.relative_cost >= 1.0
    assert all(direction in DIRECTIONS for direction in cls.companions.values())
    assert all(cls.target_direction(c) == d for c, d in cls.companions.items())


@pytest.mark.parametrize("name", list(REGISTRY))
def test_its_own_settings_are_valid_and_its_study_settings_stable(name, tiny_model_dir, tmp_path):
    config = config_of(name, tiny_model_dir, tmp_path)  # RunConfig runs the objective's config checks
    assert objectives.kind(config.objective) == name
    assert REGISTRY[name].config_problems(config) == []
    settings = objectives.study_settings(config)
    assert settings is None or json.loads(json.dumps(settings)) == settings  # JSON, as the study stores it
    assert objectives.study_settings(RunConfig(**json.loads(config.to_json()))) == settings


@pytest.mark.parametrize("name", NAMES)
def test_built_for_each_split_it_scores_the_model_reproducibly(name, runs):
    config, setup = runs(name)
    for split in objectives.SPLITS:
        objective = setup.objective(split)
        assert isinstance(objective, REGISTRY[name]) and objective.name == config.objective
        first, again = objective(setup.model), objective(setup.model)
        assert first == again and math.isfinite(first.value)
        assert set(REGISTRY[name].companions) <= set(first.metrics)


@pytest.mark.parametrize("name", NAMES)
def test_trials_record_its_value_and_the_loss_in_its_direction(name, runs):
    config, setup = runs(name)
    importance = load_or_compute(setup.model, setup.calibration, config.importance, setup.layout.root)
    direction = objectives.objective_class(config.objective).direction
    study = optuna.create_study(direction=direction, sampler=optuna.samplers.RandomSampler(seed=0))
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study.optimize(TrialObjective(setup.model, importance, setup.space, setup.objective("search")), n_trials=3)
    done = measurements(study)
    assert len(done) == 3
    assert all(m.objective == config.objective and m.loss == to_loss(m.value, direction) for m in done)


def test_an_objective_that_declares_too_little_is_refused():
    class Silent(Objective):
        name = "silent"

        def __call__(self, model):
            raise AssertionError

    with pytest.raises(TypeError, match="Silent does not declare from_config, study_settings"):
        register_objective(name="silent", objective_cls=Silent)
    with pytest.raises(ValueError, match="'perplexity' is already registered"):
        register_objective(name="perplexity", objective_cls=REGISTRY["perplexity"])
    assert "silent" not in REGISTRY


def test_a_run_asks_for_the_toy_objective_and_sampler_by_name_alone(tiny_model_dir, tmp_path):
    import tests.search.toy_sampler  # noqa: F401 (registers the toy sampler)

    out = tmp_path / "toys"
    command = args(tiny_model_dir, out, "--budget", "75%", "--trials", "3", "--objective", "top1", "--sampler",
                   "per-trial-random")
    assert run.main(command) == 0
    summary = RunSummary.from_json((out / "summary.json").read_text())
    assert (summary.objective, summary.objective_direction, summary.trials_complete) == ("top1", "maximize", 3)
    assert set(summary.objective_values["searched"]) == {"perplexity", "top1"}
    identity = StudyRecord.from_study(load(out)).identity
    assert identity["sampler"] == "per-trial-random" and "objective_settings" not in identity
