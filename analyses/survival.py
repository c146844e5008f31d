"""Placeholder: filled in by the survival work."""
