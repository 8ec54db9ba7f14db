"""tinyv: quantized on-device inference for TinyGPT-V style vision-language models.

The heavy parts (torch, the model) load on first use, so ``import tinyv`` and
``tinyv --help`` stay fast.
"""
from tinyv._version import __version__
from tinyv.errors import TinyVError

__all__ = ["__version__", "TinyVError", "load", "Engine", "TinyGPTV", "TinyGPTVConfig", "preset"]


def load(bundle=None, *, announce=None, **options):
    """An ``Engine`` for ``bundle`` (a folder from ``tinyv export``, or ``hf://owner/repo[@revision]``
    on the Hugging Face Hub); with none, the built-in demo model, and ``announce(line)`` is told so
    (and where a ``device="cuda"``/``"auto"`` engine runs, and of a cache folder that cannot be
    used). ``options`` go to ``Engine.load`` (``device``, ``max_gpu_memory``, ``threads``, ...)."""
    from tinyv.demo.builtin import resolve_bundle
    from tinyv.engine.engine import Engine

    return Engine.load(resolve_bundle(bundle, announce), announce=announce, **options)


def __getattr__(name):  # lazy: the model pulls in torch
    if name == "Engine":
        from tinyv.engine.engine import Engine

        return Engine
    if name == "TinyGPTV":
        from tinyv.export.reference import TinyGPTV

        return TinyGPTV
    if name in ("TinyGPTVConfig", "preset"):
        from tinyv.engine import config

        return getattr(config, name)
    raise AttributeError(f"module 'tinyv' has no attribute {name!r}")
