"""Federated model training: Flower's strategies over Alliance's governed round driver.

``train`` fits logistic regression or a small MLP with FedAvg, FedProx or FedAdam (Flower's own
strategies, run unchanged on :mod:`analyses.training.grid`). Each strategy round is one round of
the :class:`~analyses.driver.RoundDriver`: a task to every site, checked there like any other
(approved study, allow-listed analysis, default deny, the training app's hash approved by the
site's admin), charged to the site's ledger and audited.

At a site, a round runs the study's approved Flower ClientApp in process on the site's training
rows, then the framework (not the app) clips the model update to ``clip`` in L2 norm. In dp the
update is released through OpenDP's Gaussian mechanism with L2 sensitivity ``2 * clip`` (any two
clipped updates are at most that far apart, whatever rows changed), so each round is
rho-zCDP for the site's whole dataset, a fortiori per patient; the round's evaluation
histogram (per patient, L2 sensitivity sqrt(3)) shares the round's rho. The ledger charges rho
per round; when a site refuses a round (its budget spent, its approval withdrawn) training
stops with the model of the last complete round.

Every round also evaluates the model it starts from on each site's held-out rows, and a last
round evaluates the final model: pooled AUC, Brier score and calibration from score
histograms summed over sites.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from analyses.base import (
    Analysis,
    AnalysisContext,
    Arrays,
    DistinctNames,
    NextRound,
    Params,
    RoundState,
    rows_used,
)
from analyses.registry import analysis
from analyses.results import AnalysisResult, table_text
from analyses.scripts import HASH_PATTERN
from analyses.training.app import TrainingApp, load_client_app
from analyses.training.credit import (
    EXACT_SHAPLEY_SITES,
    MAX_COALITIONS,
    coalitions_for,
    leave_one_out,
    shapley,
)
from analyses.training.grid import FIRST_NODE_ID, Finished, FlowerBridge, Round, set_flower_identity
from analyses.training.models import (
    EVAL_BINS,
    array_shapes,
    design,
    design_columns,
    evaluation_counts,
    flatten,
    initial_weights,
    model_size,
    pooled_metrics,
    predict_proba,
    unflatten,
)
from protocol.config import BinaryVariable, DataDictionary
from protocol.errors import InternalError, ValidationError
from protocol.records import AggregateRecord, ArraySpec, RecordSpec

#: The most rounds a training request may run, and the largest model it may send.
MAX_TRAINING_ROUNDS = 100
MAX_WEIGHTS = 10_000
#: No weight of a round's public state may exceed this in absolute value.
MAX_WEIGHT = 1e6
#: The delta at which the result reports (epsilon, delta)-DP from the zCDP it spent.
DEFAULT_DELTA = 1e-5
#: A site's rows for training: the training design and outcome, the held-out ones.
Split = tuple[
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
]
#: How a dp round's rho is shared: the update, its evaluation histogram (and with credit asked
#: for: the coalitions' updates, their evaluation histograms).
SHARES: tuple[float, ...] = (0.9, 0.1)
SHARES_WITH_CREDIT: tuple[float, ...] = (0.5, 0.05, 0.35, 0.1)


class ModelSpec(BaseModel):
    """The model: ``logistic`` regression or an ``mlp`` with one hidden tanh layer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["logistic", "mlp"] = "logistic"
    hidden: int = Field(default=8, ge=1, le=64, description="mlp: hidden units")


class StrategySpec(BaseModel):
    """Flower's strategy and its options (FedProx's ``proximal_mu``; FedAdam's ``eta``,
    ``beta_1``, ``beta_2``, ``tau``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    proximal_mu: float = Field(default=0.1, ge=0.0, le=100.0)
    eta: float = Field(default=0.1, gt=0.0, le=10.0)
    beta_1: float = Field(default=0.9, ge=0.0, lt=1.0)
    beta_2: float = Field(default=0.99, ge=0.0, lt=1.0)
    tau: float = Field(default=1e-3, gt=0.0, le=1.0)


class TrainParams(Params):
    """A training request as a task carries it (the coordinator expands ``app`` from the hash
    the researcher gives to the app's texts)."""

    app: str = Field(description="the training app's hash (`alliance script submit` prints it)")
    module: str = Field(description="the app's module text (filled in by the coordinator)")
    manifest: str = Field(description="the app's manifest text (filled in by the coordinator)")
    features: DistinctNames = Field(min_length=1, max_length=50)
    outcome: str
    model: ModelSpec = Field(default_factory=ModelSpec)
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    rounds: int = Field(default=20, ge=1, le=MAX_TRAINING_ROUNDS)
    local_epochs: int = Field(default=5, ge=1, le=100)
    learning_rate: float = Field(default=1.0, gt=0.0, le=100.0)
    clip: float = Field(
        default=1.0, gt=0.0, le=1000.0, description="L2 bound of a site's update in one round"
    )
    holdout: float = Field(default=0.2, ge=0.0, le=0.5, description="share held out to evaluate")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    delta: float = Field(default=DEFAULT_DELTA, gt=0.0, lt=1.0)
    contributions: Literal["none", "leave_one_out", "shapley"] = Field(
        default="none",
        description="train coalition models alongside for each site's credit (see "
        "analyses.training.credit); in dp they share each round's rho",
    )
    permutations: int = Field(
        default=20, ge=1, le=200, description="shapley beyond 6 sites: the orders sampled"
    )

    @model_validator(mode="after")
    def _matches(self) -> TrainParams:
        if not HASH_PATTERN.match(self.app):
            raise ValueError(f"app must be 64 lowercase hex digits, got {self.app[:80]!r}")
        if TrainingApp(self.module, self.manifest).hash != self.app:
            raise ValueError("the training app's module and manifest do not match its hash")
        if self.outcome in self.features:
            raise ValueError(f"outcome {self.outcome!r} is also listed as a feature")
        return self

    @functools.cached_property
    def bundle(self) -> TrainingApp:
        """The training app itself."""
        return TrainingApp(self.module, self.manifest)


class TrainState(RoundState):
    """A round's public state: what the strategy sent every site."""

    phase: Literal["train", "evaluate"]
    weights: list[float]
    config: dict[str, float | int | bool | str] = Field(default_factory=dict)
    #: the coalition models (credit), each trained by the sites in ``members``
    coalitions: list[list[float]] = Field(default_factory=list)
    members: list[list[str]] = Field(default_factory=list)


@dataclass
class TrainingResult(AnalysisResult):
    """A trained model, how it got there and what it cost.

    Attributes:
        model: ``logistic`` or ``mlp``; ``strategy``: Flower's strategy that aggregated.
        columns: the design matrix's columns (numeric variables scaled to [0, 1] by the
            dictionary's bounds, categorical levels one-hot against the first).
        weights: the model's arrays by name (``coef``/``intercept``, or ``w1``/``b1``/``w2``/
            ``b2``).
        rounds: training rounds completed; ``history``: the held-out ``auc`` and ``brier`` of
            the model after each number of completed rounds (``round`` 0: the initial model).
        evaluation: the final model on the sites' held-out rows: ``auc``, ``brier``, ``n``,
            ``calibration``.
        delta: dp only: the delta at which :attr:`epsilon` is reported.
        stopped: why training stopped before its last round (else empty).
        contributions: with ``contributions`` asked for: each site's ``shapley`` value and/or
            ``leave_one_out`` difference of held-out AUC, the ``method``, the AUC of the model
            of all sites (``all``) and of none (``none``: the initial model), and how many
            ``coalitions`` were trained (see :mod:`analyses.training.credit`).

    ``n`` is the number of held-out rows the final evaluation covered (noisy in dp).
    """

    optional_values: ClassVar[frozenset[str]] = frozenset({"delta", "stopped", "contributions"})

    model: str = ""
    strategy: str = ""
    features: list[str] = field(default_factory=list)
    outcome: str = ""
    columns: list[str] = field(default_factory=list)
    weights: dict[str, Any] = field(default_factory=dict)
    rounds: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] = field(default_factory=dict)
    delta: float = 0.0
    stopped: str = ""
    contributions: dict[str, Any] = field(default_factory=dict)

    @property
    def credit(self) -> pd.DataFrame:
        """Each site's credit for the model's quality (empty without ``contributions``)."""
        found = {
            k: self.contributions[k]
            for k in ("shapley", "leave_one_out")
            if k in self.contributions
        }
        return pd.DataFrame(found)

    @property
    def epsilon(self) -> float:
        """dp: the (epsilon, delta)-DP per patient at each site that the zCDP rho spent by the
        site that spent most implies (epsilon = rho + 2 sqrt(rho ln(1/delta)), Bun and Steinke
        2016, Proposition 1.3); 0 when nothing was spent."""
        rho = self.privacy.rho_per_site
        if rho <= 0 or self.delta <= 0:
            return 0.0
        return float(rho + 2.0 * math.sqrt(rho * math.log(1.0 / self.delta)))

    def values(self) -> dict[str, Any]:
        out = super().values()
        if self.delta:
            out["epsilon"] = self.epsilon
        return out

    @property
    def summary(self) -> pd.DataFrame:
        """The training curve: held-out AUC and Brier score after each number of rounds."""
        frame = pd.DataFrame(self.history)
        if frame.empty:
            return pd.DataFrame(columns=["round", "auc", "brier"])
        return frame.set_index("round")

    @property
    def coefficients(self) -> pd.Series:
        """Logistic regression: the coefficients by design column, then the intercept."""
        if self.model != "logistic":
            raise ValueError("coefficients are for logistic regression; see .weights")
        return pd.Series(
            [*self.weights["coef"], self.weights["intercept"][0]],
            index=[*self.columns, "intercept"],
            name="coefficient",
        )

    def arrays(self) -> dict[str, npt.NDArray[np.float64]]:
        """The weights as numpy arrays."""
        return {name: np.asarray(value, dtype=float) for name, value in self.weights.items()}

    def design(self, frame: pd.DataFrame, dictionary: DataDictionary) -> npt.NDArray[np.float64]:
        """The design matrix the model reads, for ``frame``'s rows (complete cases only)."""
        return design(frame, self.features, dictionary)

    def predict_proba(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Probabilities of outcome 1 for rows of the design matrix."""
        return predict_proba(self.arrays(), np.asarray(x, dtype=float))

    def to_sklearn(self) -> Any:
        """The model as a fitted scikit-learn estimator on the design matrix
        (:meth:`design`): ``LogisticRegression`` or ``MLPClassifier`` (tanh, logistic output).

        Raises:
            ImportError: scikit-learn is not installed (``pip install alliance[sklearn]``).
        """
        try:
            from sklearn.linear_model import LogisticRegression
            from sklearn.neural_network import MLPClassifier
            from sklearn.preprocessing import LabelBinarizer
        except ImportError as exc:
            raise ImportError(
                "to_sklearn needs scikit-learn: pip install 'alliance[sklearn]'"
            ) from exc
        arrays = self.arrays()
        classes = np.array([0, 1])
        if self.model == "logistic":
            estimator = LogisticRegression()
            estimator.coef_ = arrays["coef"].reshape(1, -1)
            estimator.intercept_ = arrays["intercept"].reshape(1)
            estimator.classes_ = classes
            estimator.n_features_in_ = arrays["coef"].size
            estimator.n_iter_ = np.array([self.rounds])
            return estimator
        hidden = arrays["b1"].size
        mlp = MLPClassifier(hidden_layer_sizes=(hidden,), activation="tanh")
        mlp.coefs_ = [arrays["w1"], arrays["w2"].reshape(-1, 1)]
        mlp.intercepts_ = [arrays["b1"], arrays["b2"].reshape(1)]
        mlp.classes_ = classes
        mlp.n_features_in_ = arrays["w1"].shape[0]
        mlp.n_layers_ = 3
        mlp.n_outputs_ = 1
        mlp.out_activation_ = "logistic"
        mlp._label_binarizer = LabelBinarizer().fit(classes)
        return mlp

    def to_onnx(self) -> Any:
        """The model as an ONNX graph (by skl2onnx, from :meth:`to_sklearn`): input the design
        matrix as float64 (``X``), outputs the label and the two classes' probabilities.

        Raises:
            ImportError: skl2onnx is not installed (``pip install 'alliance[onnx]'``).
        """
        try:
            from skl2onnx import to_onnx
        except ImportError as exc:
            raise ImportError("to_onnx needs skl2onnx: pip install 'alliance[onnx]'") from exc
        estimator = self.to_sklearn()
        sample = np.zeros((1, len(self.columns)))
        return to_onnx(estimator, sample, options={id(estimator): {"zipmap": False}})

    def _table(self) -> str:
        ev = self.evaluation
        lines = [
            f"{self.model} by {self.strategy}, {self.rounds} round(s); held-out AUC "
            f"{ev.get('auc', math.nan):.3f}, Brier {ev.get('brier', math.nan):.3f}"
        ]
        if self.model == "logistic" and self.weights:
            lines.append(self.coefficients.to_string())
        if self.history:
            lines.append(table_text(self.summary))
        if self.epsilon:
            lines.append(f"privacy: ({self.epsilon:.4g}, {self.delta:g})-DP per patient per site")
        if self.stopped:
            lines.append(f"stopped early: {self.stopped}")
        return "\n".join(lines)

    def plot(self, ax: Any = None) -> Any:
        """The training curve: held-out AUC and Brier score per round."""
        ax = self._axes(ax)
        curve = self.summary
        if not curve.empty:
            curve[["auc", "brier"]].plot(ax=ax, marker="o")
        ax.set_xlabel("rounds completed")
        ax.set_title(self._header())
        return ax


def _clipped(update: npt.NDArray[np.float64], clip: float) -> npt.NDArray[np.float64]:
    """``update`` scaled down to L2 norm ``clip`` when above it."""
    norm = float(np.linalg.norm(update))
    return update * (clip / norm) if norm > clip else update


def pooled_split(
    frames: Mapping[str, pd.DataFrame], raw: Mapping[str, Any], dictionary: DataDictionary
) -> Split:
    """Every site's training and held-out rows under request ``raw``, pooled (each site's own
    seeded split, as the sites make it): the reference that tests and benchmarks fit a pooled
    model on and evaluate both models with."""
    train = Train()
    params = train.parse_params(raw, dictionary)
    parts = [train._split(f, params, AnalysisContext(dictionary)) for f in frames.values()]
    return (
        np.vstack([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        np.vstack([p[2] for p in parts]),
        np.concatenate([p[3] for p in parts]),
    )


def _flower_strategy(params: TrainParams) -> Any:
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,  # Alliance evaluates on every training round, pooled
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
    }
    spec = params.strategy
    if spec.name == "fedprox":
        return FedProx(**common, proximal_mu=spec.proximal_mu)
    if spec.name == "fedadam":
        return FedAdam(**common, eta=spec.eta, beta_1=spec.beta_1, beta_2=spec.beta_2, tau=spec.tau)
    return FedAvg(**common)


def _strategy_run(
    params: TrainParams, initial: Mapping[str, npt.NDArray[np.float64]]
) -> Callable[[Any], Finished]:
    """What the strategy's thread runs: Flower's ``Strategy.start``, then one round that
    evaluates the final model."""

    def run(grid: Any) -> Finished:
        from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

        strategy = _flower_strategy(params)
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in initial.items()})
        config = ConfigRecord(
            {"local-epochs": params.local_epochs, "learning-rate": params.learning_rate}
        )
        outcome = strategy.start(
            grid=grid, initial_arrays=arrays, num_rounds=params.rounds, train_config=config
        )
        final = outcome.arrays if outcome.arrays is not None else arrays
        evaluate = [
            Message(
                RecordDict(
                    {"arrays": final, "config": ConfigRecord({"server-round": params.rounds})}
                ),
                node,
                MessageType.EVALUATE,
            )
            for node in grid.get_node_ids()
        ]
        grid.send_and_receive(evaluate)
        return Finished(outcome)

    return run


@analysis("train")
class Train(Analysis[TrainParams]):
    """Federated training with Flower's strategies (see the module docstring)."""

    params_model = TrainParams
    state_model = TrainState
    result_type = TrainingResult
    may_finish_early = True  # a site that refuses a round ends training with the last model
    finishes_when_sites_leave = True

    # ----------------------------------------------------------------- both sides
    def check_params(self, params: TrainParams, dictionary: DataDictionary) -> None:
        params.bundle.check_source()
        _ = params.bundle.manifest
        if not isinstance(dictionary.variable(params.outcome), BinaryVariable):
            raise ValidationError(
                f"train: outcome {params.outcome!r} must be a binary variable in the dictionary"
            )
        size = model_size(self._shapes(params, dictionary))
        if size > MAX_WEIGHTS:
            raise ValidationError(
                f"train: the model has {size} weights; at most {MAX_WEIGHTS} are allowed"
            )

    def variables(self, params: TrainParams) -> set[str]:
        return {*params.features, params.outcome}

    def reviewed_code(self, params: TrainParams) -> TrainingApp:
        return params.bundle

    def dp_measure(self, params: TrainParams) -> str:
        return "zcdp"

    def dp_rounds(self, params: TrainParams, ctx: AnalysisContext) -> int:
        return params.rounds + 1  # the training rounds and the final evaluation

    def _shapes(
        self, params: TrainParams, dictionary: DataDictionary
    ) -> dict[str, tuple[int, ...]]:
        columns = len(design_columns(params.features, dictionary))
        return array_shapes(params.model.kind, columns, params.model.hidden)

    def check_state(self, state: Any, params: TrainParams, ctx: AnalysisContext) -> None:
        size = model_size(self._shapes(params, ctx.dictionary))
        if len(state.weights) != size:
            raise ValidationError(
                f"train round state: weights has {len(state.weights)} numbers; the model has {size}"
            )
        if any(abs(w) > MAX_WEIGHT for w in state.weights):
            raise ValidationError(f"train round state: weights must lie within +/- {MAX_WEIGHT:g}")
        if len(state.config) > 20 or any(
            isinstance(v, str) and len(v) > 64 for v in state.config.values()
        ):
            raise ValidationError(
                "train round state: config holds at most 20 entries, texts of at most 64 characters"
            )
        if ctx.round > params.rounds:
            raise ValidationError(
                f"train round state: round {ctx.round} is past the request's {params.rounds} "
                "rounds and final evaluation"
            )
        if params.contributions == "none" and state.coalitions:
            raise ValidationError("train round state: coalitions were not asked for")
        if len(state.coalitions) != len(state.members) or len(state.coalitions) > MAX_COALITIONS:
            raise ValidationError(
                f"train round state: coalitions and members must pair up, at most "
                f"{MAX_COALITIONS} of them"
            )
        for weights, members in zip(state.coalitions, state.members, strict=True):
            if len(weights) != size or any(abs(w) > MAX_WEIGHT for w in weights):
                raise ValidationError(
                    f"train round state: each coalition model has {size} weights within "
                    f"+/- {MAX_WEIGHT:g}"
                )
            if not members or len(members) > 1000 or any(len(m) > 64 for m in members):
                raise ValidationError("train round state: a coalition names 1 to 1000 sites")

    def declare(self, params: TrainParams, ctx: AnalysisContext) -> RecordSpec:
        size = model_size(self._shapes(params, ctx.dictionary))
        evaluation = 3 * EVAL_BINS + 1
        coalitions = len(ctx.state.get("coalitions", []))
        if ctx.mode == "sdc":
            raise ValidationError(
                "train: model weights have no disclosure-control rule (cell thresholds do not "
                "protect them); train under dp, or off on dummy data"
            )
        if ctx.mode != "dp":
            arrays = {
                "update": ArraySpec((size,)),
                "evaluation": ArraySpec((evaluation,)),
                "n": ArraySpec((), kind="count"),
            }
            if coalitions:
                arrays["coalition_updates"] = ArraySpec((coalitions, size))
                arrays["coalition_evaluation"] = ArraySpec((coalitions, evaluation))
            return RecordSpec(arrays)
        # One row moves each clipped update anywhere in a ball of radius clip (2 * clip in L2)
        # and each evaluation histogram by at most sqrt(3); a site trains the coalitions that
        # hold it, and the busiest site's count bounds everyone's.
        shares = SHARES_WITH_CREDIT if coalitions else SHARES
        specs = {
            "update": ArraySpec(
                (size,),
                kind="statistic",
                sensitivity=2.0 * params.clip,
                norm="l2",
                budget_share=shares[0],
            ),
            "evaluation": ArraySpec(
                (evaluation,),
                kind="statistic",
                sensitivity=math.sqrt(3.0),
                norm="l2",
                budget_share=shares[1],
            ),
        }
        if coalitions:
            counts: dict[str, int] = {}
            for members in ctx.state["members"]:
                for site in members:
                    counts[site] = counts.get(site, 0) + 1
            busiest = max(counts.values())
            specs["coalition_updates"] = ArraySpec(
                (coalitions, size),
                kind="statistic",
                sensitivity=2.0 * params.clip * math.sqrt(busiest),
                norm="l2",
                budget_share=shares[2],
            )
            specs["coalition_evaluation"] = ArraySpec(
                (coalitions, evaluation),
                kind="statistic",
                sensitivity=math.sqrt(3.0 * coalitions),
                norm="l2",
                budget_share=shares[3],
            )
        return RecordSpec(specs)

    # ----------------------------------------------------------------- site half
    def _split(self, data: pd.DataFrame, params: TrainParams, ctx: AnalysisContext) -> Split:
        def build() -> Split:
            rows = rows_used(data, [*params.features, params.outcome])
            x = design(rows, params.features, ctx.dictionary)
            y = (rows[params.outcome].to_numpy(dtype=float) == 1).astype(float)
            order = np.random.default_rng(params.seed).permutation(len(y))
            held = round(params.holdout * len(y))
            test, train = order[:held], order[held:]
            return x[train], y[train], x[test], y[test]

        if ctx.cache is None:
            return build()
        key = ("train-split", tuple(params.features), params.outcome, params.holdout, params.seed)
        return ctx.cache.get(key, build, lambda parts: sum(a.nbytes for a in parts))

    def local(self, data: pd.DataFrame, params: TrainParams, ctx: AnalysisContext) -> Arrays:
        shapes = self._shapes(params, ctx.dictionary)
        x_train, y_train, x_test, y_test = self._split(data, params, ctx)
        start = unflatten(ctx.state["weights"], shapes)
        evaluation = evaluation_counts(predict_proba(start, x_test), y_test)
        update = np.zeros(model_size(shapes))
        if ctx.state["phase"] == "train":
            trained = self._run_app(params, ctx, start, x_train, y_train, shapes)
            # The framework's clipping: the app cannot skip it.
            update = _clipped(flatten(trained, shapes) - flatten(start, shapes), params.clip)
        arrays: Arrays = {"update": update, "evaluation": evaluation}
        if ctx.mode != "dp":
            arrays["n"] = np.asarray(float(len(y_train)))
        if ctx.state.get("coalitions"):
            arrays.update(
                self._coalitions_local(params, ctx, shapes, (x_train, y_train, x_test, y_test))
            )
        return arrays

    def _coalitions_local(
        self,
        params: TrainParams,
        ctx: AnalysisContext,
        shapes: Mapping[str, tuple[int, ...]],
        split: Split,
    ) -> Arrays:
        """Train each coalition model that holds this site; evaluate every one."""
        x_train, y_train, x_test, y_test = split
        coalitions = ctx.state["coalitions"]
        updates = np.zeros((len(coalitions), model_size(shapes)))
        evaluations = []
        for j, (weights, members) in enumerate(zip(coalitions, ctx.state["members"], strict=True)):
            start = unflatten(weights, shapes)
            evaluations.append(evaluation_counts(predict_proba(start, x_test), y_test))
            if ctx.state["phase"] != "train" or ctx.site not in members:
                continue
            trained = self._run_app(params, ctx, start, x_train, y_train, shapes)
            updates[j] = _clipped(flatten(trained, shapes) - flatten(start, shapes), params.clip)
        return {"coalition_updates": updates, "coalition_evaluation": np.array(evaluations)}

    def _run_app(
        self,
        params: TrainParams,
        ctx: AnalysisContext,
        start: Mapping[str, npt.NDArray[np.float64]],
        x: npt.NDArray[np.float64],
        y: npt.NDArray[np.float64],
        shapes: Mapping[str, tuple[int, ...]],
    ) -> dict[str, npt.NDArray[np.float64]]:
        """Run the approved ClientApp on the training rows; its model, checked."""
        app = load_client_app(params.bundle)
        set_flower_identity()
        from flwr.app import (
            Array,
            ArrayRecord,
            ConfigRecord,
            Context,
            Message,
            MessageType,
            RecordDict,
        )

        content = RecordDict(
            {
                "arrays": ArrayRecord(
                    {k: Array(np.ascontiguousarray(v)) for k, v in start.items()}
                ),
                "config": ConfigRecord(dict(ctx.state.get("config", {}))),
            }
        )
        message = Message(content, FIRST_NODE_ID, MessageType.TRAIN)
        data = RecordDict(
            {
                "alliance": ArrayRecord(
                    {"x": Array(np.ascontiguousarray(x)), "y": Array(np.ascontiguousarray(y))}
                )
            }
        )
        context = Context(
            run_id=1, node_id=FIRST_NODE_ID, node_config={}, state=data, run_config={}
        )
        label = params.bundle.label
        try:
            reply = app(message, context)
        except Exception as exc:  # the app's own code: its failure is reported, not raised raw
            raise ValidationError(f"{label} failed: {type(exc).__name__}: {exc}") from None
        if reply.has_error():
            raise ValidationError(f"{label} replied with an error: {reply.error.reason}")
        try:
            returned = reply.content["arrays"]
            trained = {name: np.asarray(returned[name].numpy(), dtype=float) for name in shapes}
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValidationError(
                f"{label} returned no arrays {', '.join(shapes)} in 'arrays' ({exc})"
            ) from None
        for name, shape in shapes.items():
            if trained[name].shape != shape:
                raise ValidationError(
                    f"{label} returned array {name!r} of shape {trained[name].shape}; the model's "
                    f"is {shape}"
                )
            if not np.all(np.isfinite(trained[name])):
                raise ValidationError(f"{label} returned non-finite weights in {name!r}")
        return trained

    # ----------------------------------------------------------------- coordinator half
    def site_records(self, record: AggregateRecord) -> float | None:
        if "n" in record.arrays:
            return float(record["n"])
        counts = record["evaluation"]
        return float(counts[: 2 * EVAL_BINS].sum())  # held-out rows (noisy, unbiased in dp)

    def initial_state(self, params: TrainParams, ctx: AnalysisContext) -> NextRound:
        shapes = self._shapes(params, ctx.dictionary)
        columns = len(design_columns(params.features, ctx.dictionary))
        initial = initial_weights(params.model.kind, columns, params.model.hidden, params.seed)
        bridge = FlowerBridge(list(ctx.sites), _strategy_run(params, initial))
        step = bridge.next()
        if not isinstance(step, Round):
            raise InternalError("the Flower strategy finished before its first round")
        try:
            coalitions = coalitions_for(
                params.contributions, ctx.sites, params.permutations, params.seed
            )
        except ValueError as exc:
            bridge.close()
            raise ValidationError(f"train: {exc}") from None
        flat = flatten(initial, shapes)
        credit = {
            "sites": list(ctx.sites),
            "members": coalitions,
            "models": [flat.copy() for _ in coalitions],
            "initial": flat,
        }
        memo = {"bridge": bridge, "step": step, "history": [], "rounds": 0, "credit": credit}
        return NextRound(
            state=self._with_coalitions(self._state_of(step, shapes), credit), memo=memo
        )

    @staticmethod
    def _with_coalitions(state: dict[str, Any], credit: Mapping[str, Any]) -> dict[str, Any]:
        if not credit["members"]:
            return state
        return {
            **state,
            "coalitions": [[float(w) for w in model] for model in credit["models"]],
            "members": [list(members) for members in credit["members"]],
        }

    def _advance_coalitions(
        self,
        records: Mapping[str, AggregateRecord],
        params: TrainParams,
        credit: dict[str, Any],
    ) -> dict[str, Any]:
        """FedAvg each coalition's model over its members' updates (weighted by their
        training rows, or equally in dp). A site that gave no record (a refusal in round 0;
        later ones end training) leaves coalitions rebuilt from the initial model without it,
        which then train one round fewer, and the result says so."""
        members: list[tuple[str, ...]] = credit["members"]
        if not members:
            return credit
        if any(site not in records for group in members for site in group):
            kept = [site for site in credit["sites"] if site in records]
            rebuilt = coalitions_for(params.contributions, kept, params.permutations, params.seed)
            initial = credit["initial"]
            return {
                **credit,
                "sites": kept,
                "members": rebuilt,
                "models": [initial.copy() for _ in rebuilt],
                "rebuilt": True,
            }
        models = []
        for j, group in enumerate(members):
            weights = np.array(
                [float(records[s]["n"]) if "n" in records[s].arrays else 1.0 for s in group]
            )
            updates = np.array([records[s]["coalition_updates"][j] for s in group])
            models.append(credit["models"][j] + weights @ updates / max(weights.sum(), 1e-9))
        return {**credit, "models": models}

    def _credit(
        self,
        records: Mapping[str, AggregateRecord],
        params: TrainParams,
        credit: Mapping[str, Any],
        everyone: float,
        nobody: float,
    ) -> dict[str, Any]:
        """Each site's credit from the final evaluation of every coalition model."""
        members: list[tuple[str, ...]] = credit["members"]
        if not members:
            return {}
        sites = list(credit["sites"])
        counts = np.sum([r["coalition_evaluation"] for r in records.values()], axis=0)
        values = {frozenset(): nobody, frozenset(sites): everyone}
        for group, row in zip(members, counts, strict=True):
            values[frozenset(group)] = float(pooled_metrics(row)["auc"])
        out: dict[str, Any] = {
            "method": params.contributions,
            "metric": "held-out AUC",
            "all": everyone,
            "none": nobody,
            "coalitions": len(members),
            "leave_one_out": leave_one_out(values, sites),
            "values": {"+".join(sorted(group)): values[frozenset(group)] for group in members},
        }
        if params.contributions == "shapley":
            out["shapley"] = shapley(values, sites, params.permutations, params.seed)
            out["exact"] = len(sites) <= EXACT_SHAPLEY_SITES
        return out

    def _state_of(self, step: Round, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """The round's public state: the strategy's messages must carry one content."""
        states = []
        for message in step.messages.values():
            content = message.content
            arrays = content["arrays"]
            config = dict(content["config"]) if "config" in content else {}
            for key, value in config.items():
                if not isinstance(value, (bool, int, float, str)):
                    raise InternalError(f"the strategy sent config {key!r} that is not a scalar")
            weights = flatten({k: arrays[k].numpy() for k in shapes}, shapes)
            states.append(
                {
                    "phase": message.metadata.message_type.split(".")[0],
                    "weights": [float(w) for w in weights],
                    "config": config,
                }
            )
        first = json.dumps(states[0], sort_keys=True)
        if any(json.dumps(s, sort_keys=True) != first for s in states[1:]):
            raise InternalError(
                "the strategy sent different content to different sites; an Alliance round "
                "sends every site the same state"
            )
        return states[0]

    def combine(
        self, records: Mapping[str, AggregateRecord], params: TrainParams, ctx: AnalysisContext
    ) -> TrainingResult | NextRound:
        from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict

        shapes = self._shapes(params, ctx.dictionary)
        bridge: FlowerBridge = ctx.memo["bridge"]
        step: Round = ctx.memo["step"]
        history: list[dict[str, Any]] = list(ctx.memo["history"])
        phase = ctx.state["phase"]
        start = np.asarray(ctx.state["weights"], dtype=float)
        pooled = pooled_metrics(np.sum([r["evaluation"] for r in records.values()], axis=0))
        replies = []
        for site, message in step.messages.items():
            record = records.get(site)
            if record is None:
                replies.append(
                    Message(Error(code=1, reason=f"site {site} gave no record"), reply_to=message)
                )
                continue
            if phase == "train":
                weight = float(record["n"]) if "n" in record.arrays else 1.0
                arrays = unflatten(start + record["update"], shapes)
                content = RecordDict(
                    {
                        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                        "metrics": MetricRecord({"num-examples": max(weight, 1e-9)}),
                    }
                )
            else:
                content = RecordDict({"metrics": MetricRecord({"num-examples": 1.0})})
            replies.append(Message(content, reply_to=message))
        bridge.active = [s for s in bridge.active if s in records]
        bridge.reply(replies)
        nxt = bridge.next()
        credit = ctx.memo["credit"]
        if isinstance(nxt, Round):
            if phase == "train":
                history.append({"round": ctx.round, "auc": pooled["auc"], "brier": pooled["brier"]})
                credit = self._advance_coalitions(records, params, credit)
            memo = {
                "bridge": bridge,
                "step": nxt,
                "history": history,
                "rounds": ctx.round + 1,
                "credit": credit,
            }
            return NextRound(
                state=self._with_coalitions(self._state_of(nxt, shapes), credit), memo=memo
            )
        history.append({"round": params.rounds, "auc": pooled["auc"], "brier": pooled["brier"]})
        result = self._result(params, ctx, start, history, pooled, rounds=params.rounds, stopped="")
        result.contributions = self._credit(
            records, params, credit, pooled["auc"], history[0]["auc"]
        )
        if credit.get("rebuilt"):
            result.notes.append(
                "a site refused the first round: the coalition models for credit were rebuilt "
                "without it and trained one round fewer than the model"
            )
        return result

    def partial_result(
        self, params: TrainParams, ctx: AnalysisContext, reason: str
    ) -> TrainingResult:
        """Training stopped at round ``ctx.round`` (a site refused it): the model the round
        started from, which is the last complete round's."""
        bridge: FlowerBridge = ctx.memo["bridge"]
        bridge.close()
        start = np.asarray(ctx.state["weights"], dtype=float)
        completed = int(ctx.memo["rounds"])
        return self._result(
            params, ctx, start, list(ctx.memo["history"]), {}, rounds=completed, stopped=reason
        )

    def _result(
        self,
        params: TrainParams,
        ctx: AnalysisContext,
        weights: npt.NDArray[np.float64],
        history: list[dict[str, Any]],
        evaluation: dict[str, Any],
        rounds: int,
        stopped: str,
    ) -> TrainingResult:
        shapes = self._shapes(params, ctx.dictionary)
        return TrainingResult(
            analysis=self.name,
            n=float(evaluation.get("n", math.nan)),
            model=params.model.kind,
            strategy=params.strategy.name,
            features=list(params.features),
            outcome=params.outcome,
            columns=design_columns(params.features, ctx.dictionary),
            weights={k: v.tolist() for k, v in unflatten(weights, shapes).items()},
            rounds=rounds,
            history=history,
            evaluation=evaluation,
            delta=params.delta if ctx.mode == "dp" else 0.0,
            stopped=stopped,
        )
