"""optuna-dashboard, served for real on loopback, shows a finished run: study, trials, objective name, note, plots."""

import base64
import json
import threading
import urllib.request
from wsgiref.simple_server import WSGIRequestHandler, make_server

import numpy as np
import optuna
import optuna_dashboard
import pytest
from optuna.trial import TrialState

from pruning.architecture import Architecture
from search import run
from search.sampler import ARCH_ATTR
from tests.search.test_run import args

pytestmark = pytest.mark.slow  # end to end: runs, subprocesses or servers

TIMEOUT_S = 30


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    evaluation = root / "evaluation.txt"  # about 60 windows: baselines and summary are quick to measure
    evaluation.write_text((tiny_model_dir / "evaluation.txt").read_text()[:4000])
    command = args(tiny_model_dir, root / "tiny", "--budget", "75%", "--trials", "7", "--evaluation", str(evaluation))
    assert run.main(command) == 0
    return root / "tiny"


@pytest.fixture(scope="module")
def dashboard(finished_run):
    """The dashboard on a free loopback port, opened on the storage URL the run's summary names."""
    storage = json.loads((finished_run / "summary.json").read_text())["storage"]
    server = make_server("127.0.0.1", 0, optuna_dashboard.wsgi(storage), handler_class=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=TIMEOUT_S)
    assert not thread.is_alive()


def get(url):
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        assert response.status == 200
        return json.loads(response.read())


@pytest.fixture(scope="module")
def detail(dashboard):
    studies = get(f"{dashboard}/api/studies")["study_summaries"]
    assert [(s["study_name"], s["directions"]) for s in studies] == [("tiny", ["minimize"])]
    return get(f"{dashboard}/api/studies/{studies[0]['study_id']}")


def load(out):
    return optuna.load_study(study_name=out.name, storage=f"sqlite:///{out}/study.db")


def values(array):
    """A plotly trace array as JSON carries it: a list, or base64 typed data for numpy arrays."""
    if isinstance(array, dict):
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).tolist()
    return list(array)


def test_dashboard_serves_the_trials_with_their_architecture(detail, finished_run):
    study = load(finished_run)
    assert detail["name"] == "tiny"
    served = {t["number"]: t for t in detail["trials"]}
    assert sorted(served) == list(range(7))
    assert {n: t["state"] for n, t in served.items()} == {n: "Complete" for n in range(7)}
    assert {n: {a["key"]: a["value"] for a in t["user_attrs"]}[ARCH_ATTR] for n, t in served.items()} == {
        t.number: t.user_attrs[ARCH_ATTR] for t in study.trials
    }
    assert {n: t["values"] for n, t in served.items()} == {t.number: [t.value] for t in study.trials}
    assert ARCH_ATTR in {a["key"] for a in detail["union_user_attrs"]}
    best = json.loads((finished_run / "summary.json").read_text())["best_trial"]
    assert [t["number"] for t in detail["best_trials"]] == [best]


def test_dashboard_names_the_objective_and_shows_the_summary_note(detail, finished_run):
    assert detail["objective_names"] == ["perplexity"]
    assert detail["note"] == {"version": 1, "body": (finished_run / "summary.md").read_text()}


def test_dashboard_shows_the_three_plots(detail, finished_run):
    study = load(finished_run)
    plots = {p["id"]: json.loads(p["graph_object"])["data"] for p in detail["plotly_graph_objects"]}
    assert sorted(plots) == ["best-architecture", "best-so-far", "predicted-vs-measured"]

    arch = Architecture.from_json((finished_run / "best_architecture.json").read_text())
    spec = arch.spec
    assert [(t["name"], values(t["x"]), values(t["y"])) for t in plots["best-architecture"]] == [
        ("attention heads kept", list(range(4)), [x.query_heads / spec.num_heads for x in arch.layers]),
        ("FFN channels kept", list(range(4)), [x.ffn_channels / spec.intermediate_size for x in arch.layers]),
    ]

    measured = [t.value for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert [(t["name"], values(t["x"]), values(t["y"])) for t in plots["best-so-far"]] == [
        ("measured", list(range(7)), measured),
        ("best so far", list(range(7)), np.minimum.accumulate(measured).tolist()),
    ]

    guided = [t for t in study.trials if "predicted" in t.system_attrs]
    assert [t.number for t in guided] == [5, 6]
    scatter = plots["predicted-vs-measured"][0]
    assert scatter["text"] == ["trial 5", "trial 6"]
    assert values(scatter["x"]) == [t.system_attrs["predicted"] for t in guided]
    assert values(scatter["y"]) == [t.value for t in guided]
    assert plots["predicted-vs-measured"][1]["name"] == "y = x"
