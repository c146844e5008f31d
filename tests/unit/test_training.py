"""Federated training in process, through the same round driver as every analysis.

Numbers are checked against scikit-learn on the pooled rows; the attacks play a hostile
coordinator (the round state it sends), a careless training app (what it returns) and a site
that stops part way (its budget spent)."""

from __future__ import annotations

from dataclasses import replace
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from analyses.base import AnalysisContext
from analyses.driver import RoundDriver, SiteFailure, SiteReply
from analyses.registry import get_analysis
from analyses.testing import federate
from analyses.training import TrainingResult, TrainParams, pooled_split
from analyses.training.app import TrainingApp, builtin_app_paths, reviewed_bundle
from analyses.training.credit import coalitions_for, leave_one_out, shapley
from analyses.training.models import evaluation_counts, pooled_metrics
from protocol.config import DataDictionary, SDCThresholds
from protocol.errors import ValidationError
from protocol.records import AggregateRecord
from simulations.heart import heart_dictionary, heart_sites
from site_node.privacy import privatize

FEATURES = ["age", "sex", "cp", "trestbps", "thalach", "exang", "oldpeak"]
TRAIN = get_analysis("train")


@pytest.fixture(scope="module")
def frames() -> dict[str, pd.DataFrame]:
    return heart_sites()


@pytest.fixture(scope="module")
def dictionary() -> DataDictionary:
    return heart_dictionary()


def builtin() -> TrainingApp:
    module, manifest = builtin_app_paths()
    return TrainingApp(open(module).read(), open(manifest).read())


def request(app: TrainingApp | None = None, **extra: Any) -> dict[str, Any]:
    app = app or builtin()
    return {
        "app": app.hash,
        "module": app.module,
        "manifest": app.manifest_text,
        "features": FEATURES,
        "outcome": "disease",
        **extra,
    }


def test_fedavg_logistic_regression_is_as_good_as_pooled_scikit_learn(frames, dictionary):
    raw = request(rounds=60, learning_rate=2.0, clip=100.0)
    result = federate("train", frames, raw, dictionary)
    x_train, y_train, x_test, y_test = pooled_split(frames, raw, dictionary)
    # Reference: sklearn.linear_model.LogisticRegression(C=inf) fitted on the pooled training
    # rows of the four hospitals; AUC by sklearn.metrics.roc_auc_score on the pooled held-out
    # rows. Goal: federated within 0.01 AUC of pooled (or better).
    pooled = LogisticRegression(C=np.inf, max_iter=5000).fit(x_train, y_train)
    pooled_auc = roc_auc_score(y_test, pooled.predict_proba(x_test)[:, 1])
    federated_p = result.predict_proba(x_test)
    federated_auc = roc_auc_score(y_test, federated_p)
    assert federated_auc >= pooled_auc - 0.01
    assert pooled_auc > 0.85  # the reference itself is a working model
    # The reported evaluation is the pooled held-out set's: exact Brier score (mode off), and
    # the binned AUC within 0.01 of the exact one.
    assert result.evaluation["n"] == len(y_test)
    assert result.evaluation["brier"] == pytest.approx(
        np.mean((federated_p - y_test) ** 2), rel=1e-9
    )
    assert result.evaluation["auc"] == pytest.approx(federated_auc, abs=0.01)
    assert result.rounds == 60 and len(result.history) == 61
    assert result.history[0]["auc"] == 0.5  # the all-zero initial model ranks nothing
    assert isinstance(result, TrainingResult)
    assert list(result.coefficients.index) == [*result.columns, "intercept"]


def test_fedprox_without_its_term_is_fedavg_and_fedadam_differs(frames, dictionary):
    fedavg = federate("train", frames, request(rounds=5), dictionary)
    fedprox0 = federate(
        "train",
        frames,
        request(rounds=5, strategy={"name": "fedprox", "proximal_mu": 0.0}),
        dictionary,
    )
    fedprox = federate(
        "train",
        frames,
        request(rounds=5, strategy={"name": "fedprox", "proximal_mu": 0.5}),
        dictionary,
    )
    fedadam = federate("train", frames, request(rounds=5, strategy={"name": "fedadam"}), dictionary)
    avg = np.asarray(fedavg.weights["coef"])
    assert np.asarray(fedprox0.weights["coef"]) == pytest.approx(avg, abs=1e-12)
    # The proximal term pulls each site's model back to the global one: smaller steps.
    assert np.linalg.norm(fedprox.weights["coef"]) < np.linalg.norm(avg)
    assert not np.allclose(fedadam.weights["coef"], avg)
    assert fedadam.strategy == "fedadam" and fedprox.strategy == "fedprox"


def test_to_sklearn_predicts_what_the_model_does(frames, dictionary):
    raw = request(rounds=3)
    _, _, x_test, _ = pooled_split(frames, raw, dictionary)
    for model in ({"kind": "logistic"}, {"kind": "mlp", "hidden": 4}):
        result = federate("train", frames, {**raw, "model": model}, dictionary)
        estimator = result.to_sklearn()
        assert estimator.predict_proba(x_test)[:, 1] == pytest.approx(
            result.predict_proba(x_test), rel=1e-9
        )
        # The ONNX export, run by onnxruntime, predicts the same probabilities.
        import onnxruntime

        graph = result.to_onnx()
        session = onnxruntime.InferenceSession(
            graph.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        _, probabilities = session.run(None, {session.get_inputs()[0].name: x_test})
        assert probabilities[:, 1] == pytest.approx(result.predict_proba(x_test), rel=1e-9)
        rebuilt = TrainingResult.from_dict(result.to_dict())  # the JSON contract round trip
        assert rebuilt.predict_proba(x_test) == pytest.approx(result.predict_proba(x_test))


def test_the_mlp_learns(frames, dictionary):
    result = federate(
        "train",
        frames,
        request(rounds=30, learning_rate=2.0, model={"kind": "mlp", "hidden": 8}, clip=100.0),
        dictionary,
    )
    assert result.evaluation["auc"] > 0.85
    assert set(result.weights) == {"w1", "b1", "w2", "b2"}
    assert np.asarray(result.weights["w1"]).shape == (len(result.columns), 8)


# ------------------------------------------------------------------ a hostile coordinator
def site_ctx(
    dictionary: DataDictionary, state: dict[str, Any], mode: str = "off"
) -> AnalysisContext:
    return AnalysisContext(dictionary, mode, SDCThresholds(), 0, state)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"phase": "train", "weights": [0.0] * 3}, "weights has 3 numbers; the model has 10"),
        ({"phase": "train", "weights": [1e9] + [0.0] * 9}, "within +/- 1e+06"),
        ({"phase": "train", "weights": [float("nan")] + [0.0] * 9}, "weights"),
        ({"phase": "exfiltrate", "weights": [0.0] * 10}, "phase"),
        ({"phase": "train", "weights": [0.0] * 10, "rows": 1}, "rows"),
        (
            {"phase": "train", "weights": [0.0] * 10, "config": {f"k{i}": 1 for i in range(21)}},
            "20 entries",
        ),
    ],
)
def test_a_site_refuses_a_round_state_it_did_not_declare(dictionary, state, message):
    params = TRAIN.parse_params(request(), dictionary)
    with pytest.raises(ValidationError, match="train round") as caught:
        TRAIN.parse_state(state, params, site_ctx(dictionary, {}))
    assert message in str(caught.value)


def test_sdc_has_no_rule_for_model_weights(dictionary):
    params = TRAIN.parse_params(request(), dictionary)
    with pytest.raises(ValidationError, match="no disclosure-control rule"):
        TRAIN.declare(params, site_ctx(dictionary, {}, mode="sdc"))


# ------------------------------------------------------------------ a careless training app
def app_returning(body: str) -> TrainingApp:
    module = (
        "import numpy as np\n"
        "from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict\n"
        "from flwr.clientapp import ClientApp\n\n"
        "app = ClientApp()\n\n\n"
        "@app.train()\n"
        "def train(msg, context):\n"
        "    w = {k: v.numpy() for k, v in msg.content['arrays'].items()}\n"
        f"    {body}\n"
        "    reply = RecordDict({'arrays': ArrayRecord({k: Array(np.asarray(v, dtype=float)) "
        "for k, v in w.items()}), 'metrics': MetricRecord({'num-examples': 1})})\n"
        "    return Message(reply, reply_to=msg)\n"
    )
    manifest = "kind: flower_client_app\nname: careless\nversion: '1'\n"
    return TrainingApp(module, manifest)


def run_site(
    app: TrainingApp, frame: pd.DataFrame, dictionary: DataDictionary, clip: float = 1.0
) -> dict[str, np.ndarray]:
    params = TRAIN.parse_params(request(app, clip=clip), dictionary)
    state = {
        "phase": "train",
        "weights": [0.0] * 10,
        "config": {"local-epochs": 1, "learning-rate": 1.0},
    }
    return TRAIN.local(frame, params, site_ctx(dictionary, state))


def test_the_framework_clips_whatever_the_app_returns(frames, dictionary):
    greedy = app_returning("w = {k: v * 0 + 1000.0 for k, v in w.items()}")
    arrays = run_site(greedy, frames["cleveland"], dictionary, clip=0.5)
    assert np.linalg.norm(arrays["update"]) == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("w['coef'] = np.zeros(3)", "returned array 'coef' of shape (3,); the model's is (9,)"),
        ("w['coef'] = w['coef'] + np.nan", "non-finite weights in 'coef'"),
        ("del w['intercept']", "returned no arrays coef, intercept"),
        ("raise RuntimeError('disk full')", "failed: "),
    ],
)
def test_a_broken_app_is_a_clear_error_naming_it(frames, dictionary, body, message):
    with pytest.raises(ValidationError) as caught:
        run_site(app_returning(body), frames["cleveland"], dictionary)
    assert "training app 'careless' 1" in str(caught.value)
    assert message in str(caught.value)


def test_an_app_is_known_by_its_manifest_and_checked_at_submission():
    app = builtin()
    assert isinstance(reviewed_bundle(app.module, app.manifest_text), TrainingApp)
    with pytest.raises(ValidationError, match="assigns no `app`"):
        TrainingApp("x = 1\n", app.manifest_text).check_source()
    changed = TrainingApp(app.module + "\n", app.manifest_text)
    assert changed.hash != app.hash
    with pytest.raises(Exception, match="do not match its hash"):
        TrainParams.model_validate({**request(app), "module": changed.module})


def test_a_binary_outcome_is_required(dictionary):
    with pytest.raises(ValidationError, match="must be a binary variable"):
        TRAIN.parse_params({**request(), "outcome": "age", "features": ["sex"]}, dictionary)


# ------------------------------------------------------------------ a site that stops
def test_training_stops_with_the_last_complete_rounds_model(frames, dictionary):
    """A site refuses round 4 (its budget is spent): the result is the model after three
    complete rounds, exactly what a three-round run gives, and says why it stopped."""
    raw = request(rounds=6)
    params = TRAIN.parse_params(raw, dictionary)
    driver = RoundDriver(TRAIN, params, dictionary, "off", list(frames))
    while (step := driver.next_round()) is not None:
        ctx = AnalysisContext(dictionary, "off", SDCThresholds(), step.round, step.state)
        spec = TRAIN.declare(params, ctx)
        answers = {}
        for site in step.sites:
            if site == "va" and step.round == 3:
                answers[site] = SiteFailure("refused", "study s1 has rho 0 left", "budget")
                continue
            arrays = TRAIN.local(frames[site], params, ctx)
            answers[site] = SiteReply(AggregateRecord(spec, arrays), "off")
        driver.receive(answers)
    stopped = driver.result()
    three = federate("train", frames, request(rounds=3), dictionary)
    assert stopped.rounds == 3
    assert stopped.stopped.startswith("round 4 lost va: study s1 has rho 0 left")
    assert np.asarray(stopped.weights["coef"]) == pytest.approx(
        np.asarray(three.weights["coef"]), abs=1e-12
    )
    assert {s.name: s.status for s in stopped.sites}["va"] == "refused"


# ------------------------------------------------------------------ dp: the declared noise
def test_dp_noise_matches_the_declared_sensitivity(frames, dictionary):
    """The update is released with Gaussian noise of sd 2 * clip / sqrt(2 * rho_update),
    rho_update = 0.9 of the round's rho (OpenDP's Gaussian mechanism, via the site engine)."""
    params = TRAIN.parse_params(request(clip=0.5), dictionary)
    state = {"phase": "evaluate", "weights": [0.0] * 10, "config": {}}
    ctx = site_ctx(dictionary, state, mode="dp")
    spec = TRAIN.declare(params, ctx)
    assert spec.arrays["update"].sensitivity == 1.0 and spec.arrays["update"].norm == "l2"
    arrays = TRAIN.local(frames["hungarian"], params, replace(ctx, mode="off"))
    arrays.pop("n")
    rho = 0.05
    draws = np.array(
        [privatize(spec, arrays, "dp", 0.0, SDCThresholds(), rho)["update"] for _ in range(400)]
    )
    expected_sd = 1.0 / np.sqrt(2 * 0.9 * rho)
    assert draws.std() == pytest.approx(expected_sd, rel=0.05)  # 4,000 draws: sd's error ~1.1%
    assert np.abs(draws.mean()) < 4 * expected_sd / np.sqrt(draws.size)


# ------------------------------------------------------------------ credit
def test_shapley_and_leave_one_out_on_games_with_known_values():
    """An additive game gives each player its own value, however it is sampled; the glove
    game (one left glove, two right ones, a pair is worth 1) gives the left glove 2/3
    (Shapley 1953's textbook example)."""
    sites = [f"s{i}" for i in range(10)]
    own = {s: float(i) for i, s in enumerate(sites)}

    def additive(group: frozenset[str]) -> float:
        return sum(own[s] for s in group)

    needed = coalitions_for("shapley", sites, permutations=7, seed=3)
    assert 0 < len(needed) <= 7 * 8 + 10  # sampled orders' prefixes and the leave-one-outs
    values = {frozenset(c): additive(frozenset(c)) for c in needed}
    values[frozenset()] = 0.0
    values[frozenset(sites)] = additive(frozenset(sites))
    assert shapley(values, sites, permutations=7, seed=3) == pytest.approx(own, abs=1e-12)
    assert leave_one_out(values, sites) == pytest.approx(own, abs=1e-12)

    gloves = ["left", "right1", "right2"]

    def pairs(group: frozenset[str]) -> float:
        return float("left" in group and len(group) > 1)

    exact = {frozenset(c): pairs(frozenset(c)) for n in range(4) for c in combinations(gloves, n)}
    assert set(map(frozenset, coalitions_for("shapley", gloves, 1, 0))) | {
        frozenset(),
        frozenset(gloves),
    } == set(exact)
    assert shapley(exact, gloves, 1, 0) == pytest.approx(
        {"left": 2 / 3, "right1": 1 / 6, "right2": 1 / 6}
    )
    assert leave_one_out(exact, gloves) == {"left": 1.0, "right1": 0.0, "right2": 0.0}


def test_credit_comes_from_models_trained_on_each_coalition_alone(frames, dictionary):
    """A coalition's value is the held-out AUC of a model trained on its sites only: the
    one-site coalition equals a separate run on that hospital alone, evaluated on every
    hospital's held-out rows; the Shapley values add up to the AUC gained."""
    raw = request(rounds=8, learning_rate=2.0, clip=100.0, contributions="shapley")
    result = federate("train", frames, raw, dictionary)
    credit = result.contributions
    assert credit["exact"] and credit["coalitions"] == 14  # 2^4 less the empty and full ones
    assert sum(credit["shapley"].values()) == pytest.approx(
        credit["all"] - credit["none"], abs=1e-12
    )
    assert credit["all"] == result.evaluation["auc"] and credit["none"] == result.history[0]["auc"]
    alone = federate("train", {"va": frames["va"]}, {**raw, "contributions": "none"}, dictionary)
    _, _, x_test, y_test = pooled_split(frames, raw, dictionary)
    expected = pooled_metrics(evaluation_counts(alone.predict_proba(x_test), y_test))["auc"]
    assert credit["values"]["va"] == pytest.approx(expected, abs=1e-12)
    drop = credit["all"] - credit["values"]["cleveland+hungarian+switzerland"]
    assert credit["leave_one_out"]["va"] == pytest.approx(drop, abs=1e-12)
    assert list(result.credit.columns) == ["shapley", "leave_one_out"]


def test_credit_is_declared_with_its_sensitivity_in_dp(dictionary):
    """A site in k coalitions releases k clipped updates: L2 sensitivity 2 * clip * sqrt(k)."""
    params = TRAIN.parse_params(request(clip=0.5, contributions="leave_one_out"), dictionary)
    members = [["b", "c"], ["a", "c"], ["a", "b"]]
    state = {
        "phase": "train",
        "weights": [0.0] * 10,
        "coalitions": [[0.0] * 10] * 3,
        "members": members,
    }
    spec = TRAIN.declare(params, site_ctx(dictionary, state, mode="dp"))
    assert spec.arrays["coalition_updates"].sensitivity == pytest.approx(2 * 0.5 * np.sqrt(2))
    assert spec.arrays["coalition_evaluation"].sensitivity == pytest.approx(np.sqrt(9))
    assert sum(a.budget_share for a in spec.arrays.values()) == pytest.approx(1.0)
    no_credit = TRAIN.parse_params(request(), dictionary)
    with pytest.raises(ValidationError, match="coalitions were not asked for"):
        TRAIN.parse_state(state, no_credit, site_ctx(dictionary, {}))
