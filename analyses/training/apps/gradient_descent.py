"""Alliance's built-in training app: a Flower ClientApp that trains on a site's own rows.

A site runs it in process, only when its admin approved this file's hash for training
(``alliance site approve-script``). The framework hands it the site's training rows in
``context.state["alliance"]`` (``x``: the design matrix, built from the dictionary's public
encoding; ``y``: the 0/1 outcome) and the global model in ``message.content["arrays"]``. It
returns the locally trained model; the framework, not this app, clips the update and adds the
privacy noise before anything leaves the site.

The model is named by the arrays it is sent: ``coef`` and ``intercept`` (logistic regression),
or ``w1``, ``b1``, ``w2``, ``b2`` (a one-hidden-layer MLP with tanh units). Full-batch gradient
descent on the mean log loss, ``local-epochs`` steps of size ``learning-rate``, plus FedProx's
proximal term when the strategy sends ``proximal-mu``.
"""

from __future__ import annotations

from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0))))


def _gradients(
    weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray
) -> tuple[dict[str, np.ndarray], float]:
    """The mean log loss's gradient with respect to each array, and the loss."""
    n = max(len(y), 1)
    if "coef" in weights:
        p = _sigmoid(x @ weights["coef"] + weights["intercept"][0])
        residual = (p - y) / n
        grads = {"coef": x.T @ residual, "intercept": np.array([residual.sum()])}
    else:
        hidden = np.tanh(x @ weights["w1"] + weights["b1"])
        p = _sigmoid(hidden @ weights["w2"] + weights["b2"][0])
        residual = (p - y) / n
        back = np.outer(residual, weights["w2"]) * (1.0 - hidden**2)
        grads = {
            "w1": x.T @ back,
            "b1": back.sum(axis=0),
            "w2": hidden.T @ residual,
            "b2": np.array([residual.sum()]),
        }
    eps = 1e-12
    loss = float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))) if len(y) else 0.0
    return grads, loss


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local full-batch gradient descent from the global model."""
    data = context.state.array_records["alliance"]
    x = data["x"].numpy().astype(float)
    y = data["y"].numpy().astype(float)
    config = msg.content.config_records["config"]
    steps = int(cast(int, config["local-epochs"]))
    rate = float(cast(float, config["learning-rate"]))
    mu = float(cast(float, config.get("proximal-mu", 0.0)))
    arrays = msg.content.array_records["arrays"]
    start = {k: v.numpy().astype(float) for k, v in arrays.items()}
    weights = {k: v.copy() for k, v in start.items()}
    loss = 0.0
    for _ in range(steps):
        grads, loss = _gradients(weights, x, y)
        for name in weights:
            weights[name] -= rate * (grads[name] + mu * (weights[name] - start[name]))
    reply = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()}),
            "metrics": MetricRecord({"num-examples": len(y), "train-loss": loss}),
        }
    )
    return Message(reply, reply_to=msg)
