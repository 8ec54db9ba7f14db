"""Turns the checkpoint files users download into tinyv models (and, later, bundles)."""
