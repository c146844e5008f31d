"""Placeholder: filled in by the quantiles work."""
