"""Placeholder: filled in by the tables work."""
