"""The canonical form of a model, so that a site compares what is asked with what it approved.

Two spellings of one model compare equal: whitespace, the order of terms and the order of the
variables inside an interaction do not matter. A glm model is written as its formula
(``chol ~ age + sex``); a cox model as ``Surv(time, event) ~ x1 + x2``.
"""

from __future__ import annotations

import re

from analyses.glm.formula import glm_key
from analyses.survival.cox.sums import cox_key
from protocol.errors import ValidationError

_SURV = re.compile(r"^\s*Surv\(\s*(\w+)\s*,\s*(\w+)\s*\)\s*~(.*)$", re.DOTALL)


def canonical_model(text: str) -> str:
    """The canonical form of an approved model's text.

    Raises:
        ValidationError: the text is neither a glm formula nor ``Surv(time, event) ~ x1 + x2``.
    """
    survival = _SURV.match(text)
    if survival is None:
        return glm_key(text)
    time, event, rhs = survival.groups()
    covariates = [part.strip() for part in rhs.split("+")]
    if not all(re.fullmatch(r"[A-Za-z_]\w*", c) for c in covariates):
        raise ValidationError(
            f"model {text!r}: a cox model lists plain covariates, as 'Surv(time, event) ~ x1 + x2'"
        )
    return cox_key(time, event, covariates)
