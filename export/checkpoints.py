"""The four sources of a TinyGPT-V model, resolved and read as far as a loader or exporter needs.

``open_checkpoints`` resolves the paths (or hub names), reads the Phi-2 config and tokenizer and
the small stage file (projections, norms, LoRA); the large files are read later, tensor by
tensor, by ``loaders.build_model`` and ``phi_weights.PhiWeights``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from tinyv.engine.config import TinyGPTVConfig, preset as make_preset
from tinyv.errors import TinyVError
from tinyv.export.checkpoint_files import pickle_source, read_phi2_config
from tinyv.export.hub import resolve
from tinyv.export.key_tables import IGNORE, STAGE_RULES, mapped
from tinyv.export.lora import check_lora


@dataclass
class Checkpoints:
    """The four sources, resolved and read as far as needed to build or export a model."""

    cfg: TinyGPTVConfig
    preset_name: str
    tokenizer: object
    phi2_dir: str
    vit_path: str
    qformer_path: str
    stage_path: str
    stage_model: dict  # stage-file tensors outside Phi-2 (llama_proj, llama_proj2): target -> (tensor, origin)
    stage_phi: dict  # stage-file Phi-2 tensors (norms): target -> (tensor, origin)
    lora: dict  # (layer, module) -> {"A": tensor, "B": tensor}

    def source_files(self) -> dict[str, list[str]]:
        """Every file each source consists of (for hashing into a bundle's manifest)."""
        phi = sorted(os.path.join(self.phi2_dir, f) for f in os.listdir(self.phi2_dir)
                     if os.path.isfile(os.path.join(self.phi2_dir, f)))
        return {"phi2": phi, "vit": [self.vit_path], "qformer": [self.qformer_path], "stage": [self.stage_path]}


def open_checkpoints(phi2, vit, qformer, stage, image_size=None, preset=None) -> Checkpoints:
    """Resolve the sources, read the configs, tokenizer and the (small) stage file."""
    from tinyv.engine.tokenizer import Tokenizer

    phi2_dir = resolve(phi2, "--phi2", folder=True)
    vit_path = resolve(vit, "--vit")
    qformer_path = resolve(qformer, "--qformer")
    stage_path = resolve(stage, "--stage")

    if isinstance(preset, TinyGPTVConfig):
        base, preset_name = preset, "custom"
    else:
        preset_name = preset or ("stage3" if image_size == 224 else "stage4")
        base = make_preset(preset_name)
    cfg = base.replace(phi=read_phi2_config(phi2_dir))
    if image_size is not None:
        if image_size % cfg.vision.patch_size:
            raise TinyVError(f"image size must be a multiple of {cfg.vision.patch_size}, got {image_size}")
        cfg = cfg.replace(image_size=image_size)
    tokenizer = Tokenizer.from_dir(phi2_dir)

    src, extra = pickle_source(stage_path, "--stage", wrapped=True)
    cfg = cfg.replace(stage=_infer_stage(extra.get("config"), cfg.image_size, cfg))
    lora: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    stage_model, stage_phi = {}, {}
    for key, target in mapped(src, STAGE_RULES):
        if target is IGNORE:
            continue
        if target.startswith("lora:"):
            layer, module, ab = target[5:].split(".")
            lora.setdefault((layer, module), {})[ab] = src.get(key)
        else:
            (stage_phi if target.startswith("phi.") else stage_model)[target] = (src.get(key), f"{src.label} {key}")
    check_lora(lora, cfg)
    return Checkpoints(cfg, preset_name, tokenizer, phi2_dir, vit_path, qformer_path, stage_path,
                       stage_model, stage_phi, lora)


def _infer_stage(ckpt_config, image_size: int, cfg: TinyGPTVConfig) -> int:
    """Stage 4 (chat template ``[INST]``) or stages 1-3 (``###Human:``) from the checkpoint's config."""
    model_cfg = ckpt_config.get("model", {}) if isinstance(ckpt_config, dict) else {}
    arch = model_cfg.get("arch") if isinstance(model_cfg, dict) else None
    if arch == "minigpt_v2":
        return 4
    if arch == "minigpt4":
        return 3
    return cfg.stage
