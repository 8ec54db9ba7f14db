"""Model configuration: one dataclass per part, composed into ``TinyGPTVConfig``.

Presets give the real model (``stage4`` at 448 px, ``stage3`` at 224 px), small sizes for
tests and benchmarks (``tiny``, ``small``) and the built-in demo model (``demo``). Numbers come from SPEC §1.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

from tinyv.errors import TinyVError


class FromDict:
    """``from_dict(d)`` for a config dataclass: keys this version does not know are ignored, so a
    manifest written by a newer tinyv still loads."""

    @classmethod
    def from_dict(cls, d: dict):
        """An instance from ``d``'s known keys; the others are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class VisionConfig(FromDict):
    """EVA ViT-g/14 as BLIP-2 uses it (no final norm, no head)."""

    image_size: int = 448
    patch_size: int = 14
    width: int = 1408
    depth: int = 39  # blocks used; the checkpoint stores one more, which is dropped
    heads: int = 16
    mlp_hidden: int = 6144  # int(1408 * 4.3637)
    eps: float = 1e-6
    pretrain_image_size: int = 224  # the grid the checkpoint's pos_embed was trained for

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return 1 + self.grid**2


@dataclass(frozen=True)
class QFormerConfig(FromDict):
    """BLIP-2's BERT-base Q-Former, query side only."""

    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    eps: float = 1e-12
    num_queries: int = 32
    cross_attention_freq: int = 2
    encoder_width: int = 1408


@dataclass(frozen=True)
class PhiConfig(FromDict):
    """Phi-2 as modified by TinyGPT-V (q/k LayerNorm, post-attention RMSNorm)."""

    hidden: int = 2560
    layers: int = 32
    heads: int = 32
    intermediate: int = 10240
    vocab_size: int = 51200
    rotary_dim: int = 32
    rope_base: float = 10000.0
    eps: float = 1e-5
    rms_eps: float = 1e-6
    max_positions: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "PhiConfig":
        """Read a Phi-2 folder's ``config.json`` (transformers Phi format).

        ``qk_layernorm`` is ignored on purpose: TinyGPT-V always applies the q/k norms (SPEC §1.11).
        """
        if cfg.get("model_type") != "phi":
            raise TinyVError(
                f"config.json has model_type {cfg.get('model_type')!r}, expected 'phi': "
                "pass the folder of a Phi-2 model (transformers format) as --phi2"
            )
        act = cfg.get("hidden_act", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise TinyVError(f"config.json has hidden_act {act!r}; TinyGPT-V's Phi-2 uses gelu_new")
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            head_dim = hidden // heads
            return cls(
                hidden=hidden,
                layers=int(cfg["num_hidden_layers"]),
                heads=heads,
                intermediate=int(cfg["intermediate_size"]),
                vocab_size=int(cfg["vocab_size"]),
                rotary_dim=int(float(cfg.get("partial_rotary_factor", 0.4)) * head_dim),
                rope_base=float(cfg.get("rope_theta", 10000.0)),
                eps=float(cfg.get("layer_norm_eps", 1e-5)),
                max_positions=int(cfg.get("max_position_embeddings", 2048)),
            )
        except KeyError as e:
            raise TinyVError(f"config.json lacks {e.args[0]!r}: is this a Phi-2 folder?") from None

    def to_hf_config(self) -> dict:
        """The ``config.json`` a transformers-4.36 Phi-2 folder carries."""
        return {
            "architectures": ["PhiForCausalLM"],
            "model_type": "phi",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "vocab_size": self.vocab_size,
            "partial_rotary_factor": self.rotary_dim / self.head_dim,
            "rope_theta": self.rope_base,
            "layer_norm_eps": self.eps,
            "hidden_act": "gelu_new",
            "max_position_embeddings": self.max_positions,
            "qk_layernorm": False,  # as in the real file; TinyGPT-V applies them anyway
            "tie_word_embeddings": False,
            "rope_scaling": None,
            "resid_pdrop": 0.1,
            "embd_pdrop": 0.0,
            "attention_dropout": 0.0,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "torch_dtype": "float16",
            "transformers_version": "4.36.2",
        }


@dataclass(frozen=True)
class TinyGPTVConfig(FromDict):
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    phi: PhiConfig = field(default_factory=PhiConfig)
    proj_hidden: int = 4096  # llama_proj: qformer.hidden -> 4096, llama_proj2: 4096 -> phi.hidden
    ln_vision_eps: float = 1e-5
    lora_r: int = 64
    lora_alpha: int = 16
    stage: int = 4

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_r

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    def replace(self, **changes) -> "TinyGPTVConfig":
        """A copy with top-level fields or ``image_size`` / ``phi`` changed."""
        if "image_size" in changes:
            changes["vision"] = dataclasses.replace(self.vision, image_size=changes.pop("image_size"))
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TinyGPTVConfig":
        top = {k: v for k, v in d.items() if k not in ("vision", "qformer", "phi")}
        return dataclasses.replace(
            super().from_dict(top),
            vision=VisionConfig.from_dict(d.get("vision", {})),
            qformer=QFormerConfig.from_dict(d.get("qformer", {})),
            phi=PhiConfig.from_dict(d.get("phi", {})),
        )


def _tiny() -> TinyGPTVConfig:
    return TinyGPTVConfig(
        vision=VisionConfig(
            image_size=112, width=48, depth=3, heads=4, mlp_hidden=96, pretrain_image_size=56
        ),
        qformer=QFormerConfig(
            hidden=32, layers=4, heads=4, intermediate=64, num_queries=8, encoder_width=48
        ),
        # head_dim 20 with rotary 8 keeps the real 0.4 partial-rotary factor; widths are
        # multiples of 32 so every quantization group size applies
        phi=PhiConfig(hidden=160, layers=3, heads=8, intermediate=256, vocab_size=1024, rotary_dim=8),
        proj_hidden=96,
        lora_r=8,
        lora_alpha=2,  # the real scale 16/64 = 0.25
    )


def _small() -> TinyGPTVConfig:
    """A reduced model for benchmarks that must finish in CI-sized time."""
    return TinyGPTVConfig(
        vision=VisionConfig(
            image_size=224, width=384, depth=6, heads=6, mlp_hidden=1536, pretrain_image_size=224
        ),
        qformer=QFormerConfig(hidden=256, layers=4, heads=4, intermediate=1024, encoder_width=384),
        phi=PhiConfig(hidden=512, layers=6, heads=8, intermediate=2048, vocab_size=51200, rotary_dim=32),
        proj_hidden=1024,
    )


def _demo() -> TinyGPTVConfig:
    """The built-in demo model (tinyv/demo): trained on generated scenes of shapes at 84 px.

    Every part of the real architecture at 2.7 M parameters. The scenes place shapes in a 3x3
    grid, so 28 px patches give one ViT token per grid cell; both Q-Former layers cross-attend.
    The vocabulary fits its own small BPE tokenizer; widths are multiples of 32 so 4/8-bit groups
    of 32 apply.
    """
    return TinyGPTVConfig(
        vision=VisionConfig(
            image_size=84, patch_size=28, width=128, depth=4, heads=4, mlp_hidden=256, pretrain_image_size=84
        ),
        qformer=QFormerConfig(
            hidden=128, layers=2, heads=4, intermediate=256, num_queries=8, encoder_width=128,
            cross_attention_freq=1,
        ),
        # head_dim 40 with rotary 16: the real 0.4 partial-rotary factor
        phi=PhiConfig(hidden=160, layers=4, heads=4, intermediate=640, vocab_size=512, rotary_dim=16,
                      max_positions=256),
        proj_hidden=256,
        lora_r=8,
        lora_alpha=2,  # the real scale 16/64 = 0.25
    )


_PRESETS = {
    "stage4": lambda: TinyGPTVConfig(stage=4),
    "stage3": lambda: TinyGPTVConfig(vision=VisionConfig(image_size=224), stage=3),
    "tiny": _tiny,
    "tiny-stage3": lambda: _tiny().replace(image_size=56, stage=3),
    "small": _small,
    "demo": _demo,
}

PRESET_NAMES = tuple(_PRESETS)


def preset(name: str, **changes) -> TinyGPTVConfig:
    """A named configuration, optionally with ``image_size=``/``stage=`` etc. changed."""
    try:
        cfg = _PRESETS[name]()
    except KeyError:
        raise TinyVError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}") from None
    return cfg.replace(**changes) if changes else cfg
