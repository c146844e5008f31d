"""Placeholder: filled in by the regression work."""
