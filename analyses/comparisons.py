"""Placeholder: filled in by the comparisons work."""
