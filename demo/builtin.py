"""The default model when the user names none: the built-in demo bundle shipped in the package.

It is a small TinyGPT-V (preset ``demo``) trained on generated scenes of coloured shapes
(``tinyv/demo``), exported with the real exporter. It is read in place: nothing is written to the
user's cache. It knows only those scenes, and the user is told so.
"""
from __future__ import annotations

import os

DEMO_BUNDLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundle")
NOTE = (
    "tinyv: no model given, so this runs the built-in demo model, trained on generated scenes of coloured "
    "shapes (it knows nothing else); for TinyGPT-V, export a bundle (tinyv export --help) or fetch one, "
    "and pass --bundle FOLDER or --bundle hf://owner/repo."
)


def resolve_bundle(bundle=None, announce=None) -> str:
    """``bundle`` as given (a folder or a hub name, which ``engine.bundle.load_bundle`` resolves); with
    none, the shipped demo bundle (and ``announce(NOTE)`` is told)."""
    if bundle is not None:
        return os.fspath(bundle)
    if announce:
        announce(NOTE)
    return DEMO_BUNDLE
