"""tinyv: quantized on-device inference for TinyGPT-V style vision-language models.

The heavy parts (torch, the model) load on first use, so ``import tinyv`` and
``tinyv --help`` stay fast.
"""
from tinyv._version import __version__
from tinyv.engine.errors import TinyVError

__all__ = ["__version__", "TinyVError", "Engine", "TinyGPTV", "TinyGPTVConfig", "preset"]


def __getattr__(name):  # lazy: the model pulls in torch
    if name == "Engine":
        from tinyv.engine.engine import Engine

        return Engine
    if name == "TinyGPTV":
        from tinyv.engine.model import TinyGPTV

        return TinyGPTV
    if name in ("TinyGPTVConfig", "preset"):
        from tinyv.engine import config

        return getattr(config, name)
    raise AttributeError(f"module 'tinyv' has no attribute {name!r}")
