"""The error tree every Alliance component raises.

Every error a person can cause says what was wrong, the bad value, and what is allowed.
``InternalError`` is different: it marks a bug in Alliance itself and says so.
"""

from __future__ import annotations


class AllianceError(Exception):
    """Base of every error Alliance raises on purpose."""


class ConfigError(AllianceError):
    """A configuration or request file is invalid (file, field path, value, what is allowed)."""


class ValidationError(AllianceError):
    """A request, parameter or value does not fit what the analysis or dictionary allows."""


class FilterError(ValidationError):
    """A row filter expression is not part of the safe filter language."""


class RegistrationError(AllianceError):
    """An analysis could not be registered (raised at import, not at the first message)."""


class RecordError(AllianceError):
    """An aggregate record would break its declared shape or carry row-level data."""


class BudgetError(AllianceError):
    """A privacy budget is malformed or would be overspent."""


class RefusedError(AllianceError):
    """A site refused a task; ``reason`` is the site's own words and ``code`` a stable tag."""

    def __init__(self, reason: str, code: str = "refused") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class DisclosureError(RefusedError):
    """A release would break a statistical disclosure control threshold."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, code="disclosure")


class ModelError(AllianceError):
    """A model cannot be fitted (singular design, separation, no convergence)."""


class LinkError(AllianceError):
    """The site link failed: the coordinator is down, a certificate is wrong, a site dropped."""


class InternalError(AllianceError):
    """A bug in Alliance itself; the message says so and what to report."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{message}; this is probably a bug, please report it with the audit log")
