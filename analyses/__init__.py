"""Federated analyses: pure functions with a site half (`local`) and a coordinator half
(`combine`). Importing this package registers every built-in analysis."""

# Registration happens at import, so a duplicate name fails here, not at the first message.
from analyses import (  # noqa: F401
    comparisons,
    descriptive,
    glm,
    mantel_haenszel,
    proportion,
    quality,
    quantiles,
    scripts,
    survival,
    tables,
    training,
)
from analyses.base import Analysis, AnalysisContext, NextRound
from analyses.registry import analysis, get_analysis, registered_analyses
from analyses.results import AnalysisResult, PrivacySummary, SiteContribution

__all__ = [
    "Analysis",
    "AnalysisContext",
    "AnalysisResult",
    "NextRound",
    "PrivacySummary",
    "SiteContribution",
    "analysis",
    "get_analysis",
    "registered_analyses",
]
