"""The demo model in training form, and its checkpoints in the real on-disk formats (SPEC §2).

Training uses the engine's own modules (``TinyGPTV``: EVA ViT, Q-Former, projections, Phi-2 with
q/k LayerNorm and post-attention RMSNorm). Each Phi-2 ``query_key_value`` and ``dense`` gets a
LoRA branch with its A and B trained as separate tensors, as TinyGPT-V's stage checkpoint carries
them; only ``tinyv``'s loaders merge them (W + alpha/r · B·A). ``write_checkpoints`` splits the
trained tensors into the four files users hold, by a declared table that inverts
``export/key_tables.py``'s rules, so loading them runs the real strict load → LoRA merge path.
"""
from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

from tinyv.engine.config import TinyGPTVConfig
from tinyv.export.reference import TinyGPTV

STAGE_PREFIX = "llama_model.base_model.model.model."
BERT_POSITIONS = 512


class LoRALinear(nn.Module):
    """``y = W x + b + scale · B(A(x))`` (peft semantics): a base Linear plus a rank-r branch."""

    def __init__(self, base: nn.Linear, r: int, scale: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)  # peft's start: the branch adds nothing until trained
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))


def build_training_model(cfg: TinyGPTVConfig, seed: int) -> TinyGPTV:
    """A freshly initialised ``TinyGPTV`` with LoRA branches; q/k norm biases frozen at zero.

    No file holds those biases (SPEC §1.14: they are zero), so training must not move them.
    """
    torch.manual_seed(seed)
    model = TinyGPTV(cfg)
    _init_weights(model)
    for layer in model.phi.layers:
        attn = layer.self_attn
        attn.query_key_value = LoRALinear(attn.query_key_value, cfg.lora_r, cfg.lora_scale)
        attn.dense = LoRALinear(attn.dense, cfg.lora_r, cfg.lora_scale)
        for norm in (attn.q_layernorm, attn.k_layernorm):
            norm.bias.requires_grad_(False)
    return model


def _init_weights(model: TinyGPTV) -> None:
    """GPT/BLIP-2 style starts for what the modules leave at zero or at N(0, 1)."""
    std = 0.02
    nn.init.normal_(model.phi.embed_tokens.weight, std=std)
    nn.init.normal_(model.qformer.query_tokens, std=std)  # zeros would make all queries identical
    nn.init.normal_(model.visual.cls_token, std=std)
    nn.init.normal_(model.visual.pos_embed, std=std)


# ---------------------------------------------------------------------------------------------
# Training model tensors -> files. (model key pattern, file, file key template)
# ---------------------------------------------------------------------------------------------
S = STAGE_PREFIX + r"layers.\1."
TO_FILES = [
    (r"visual\.(.+)", "vit", r"\1"),
    (r"ln_vision\.(weight|bias)", "qformer", r"ln_vision.\1"),
    (r"qformer\.query_tokens", "qformer", "query_tokens"),
    (r"qformer\.layernorm\.(weight|bias)", "qformer", r"Qformer.bert.embeddings.LayerNorm.\1"),
    (r"qformer\.layer\.(.+)", "qformer", r"Qformer.bert.encoder.layer.\1"),
    (r"(llama_proj2?)\.(weight|bias)", "stage", r"\1.\2"),
    (r"phi\.embed_tokens\.weight", "phi2", "model.embed_tokens.weight"),
    (r"phi\.layers\.(\d+)\.self_attn\.(query_key_value|dense)\.base\.(weight|bias)", "phi2",
     r"model.layers.\1.self_attn.\2.\3"),
    (r"phi\.layers\.(\d+)\.self_attn\.(query_key_value|dense)\.(lora_[AB])\.weight", "stage",
     S + r"self_attn.\2.\3.weight"),
    (r"phi\.layers\.(\d+)\.self_attn\.(q_layernorm|k_layernorm)\.weight", "stage", S + r"self_attn.\2.weight"),
    (r"phi\.layers\.(\d+)\.self_attn\.(q_layernorm|k_layernorm)\.bias", None, "zero: no file holds it"),
    (r"phi\.layers\.(\d+)\.(input_layernorm|post_layernorm)\.weight", "stage", S + r"\2.weight"),
    (r"phi\.layers\.(\d+)\.input_layernorm\.bias", "phi2", r"model.layers.\1.input_layernorm.bias"),
    (r"phi\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", "phi2", r"model.layers.\1.mlp.\2.\3"),
    (r"phi\.final_layernorm\.weight", "stage", STAGE_PREFIX + "final_layernorm.weight"),
    (r"phi\.final_layernorm\.bias", "phi2", "model.final_layernorm.bias"),
    (r"phi\.lm_head\.(weight|bias)", "phi2", r"lm_head.\1"),
]


def split_state_dict(model: TinyGPTV) -> dict[str, dict[str, torch.Tensor]]:
    """The trained tensors per file (``phi2``, ``vit``, ``qformer``, ``stage``), under the files' keys.

    A model key no rule maps is an error (a tensor would be lost); q/k norm biases must be zero.
    """
    files: dict[str, dict[str, torch.Tensor]] = {"phi2": {}, "vit": {}, "qformer": {}, "stage": {}}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().float().contiguous()
        for pattern, file, template in TO_FILES:
            m = re.fullmatch(pattern, key)
            if m is None:
                continue
            if file is None:
                if tensor.abs().max() != 0:
                    raise ValueError(f"{key} must stay zero ({template})")
            else:
                files[file][m.expand(template)] = tensor
            break
        else:
            raise ValueError(f"no checkpoint file holds {key}")
    return files


def write_checkpoints(model: TinyGPTV, tokenizer_dir: str, out_dir: str):
    """Write the four checkpoint sources of the trained ``model`` into ``out_dir``.

    Formats as ``tinyv.testing.write_checkpoints`` writes them (the real files' layouts), with the
    trained values in fp32. Returns ``tinyv.testing.CheckpointPaths``.
    """
    from safetensors.torch import save_file

    from tinyv.testing import CheckpointPaths

    cfg = model.config
    files = split_state_dict(model)
    paths = CheckpointPaths(
        phi2=os.path.join(out_dir, "phi-2"),
        vit=os.path.join(out_dir, "eva_vit_g.pth"),
        qformer=os.path.join(out_dir, "blip2_pretrained_flant5xxl.pth"),
        stage=os.path.join(out_dir, f"TinyGPT-V_for_Stage{cfg.stage}.pth"),
    )
    os.makedirs(paths.phi2, exist_ok=True)
    with open(os.path.join(paths.phi2, "config.json"), "w") as f:
        json.dump(cfg.phi.to_hf_config(), f, indent=2)
    for name in os.listdir(tokenizer_dir):
        with open(os.path.join(tokenizer_dir, name), "rb") as src, open(os.path.join(paths.phi2, name), "wb") as dst:
            dst.write(src.read())
    save_file(_with_base_norms(files["phi2"], cfg), os.path.join(paths.phi2, "model.safetensors"),
              metadata={"format": "pt"})
    torch.save(_with_extra_block(files["vit"], cfg.vision.depth), paths.vit)
    position_ids = torch.arange(BERT_POSITIONS).unsqueeze(0)  # the int64 buffer both pickles carry
    torch.save({"model": {**files["qformer"], "Qformer.bert.embeddings.position_ids": position_ids}}, paths.qformer)
    torch.save(_stage_object({**files["stage"], "Qformer.bert.embeddings.position_ids": position_ids}, cfg), paths.stage)
    return paths


def _with_base_norms(phi2: dict, cfg: TinyGPTVConfig) -> dict:
    """Phi-2 also stores the norm weights the stage file overrides; here they are the untrained ones."""
    ones = torch.ones(cfg.phi.hidden)
    out = dict(phi2)
    out["model.final_layernorm.weight"] = ones
    for i in range(cfg.phi.layers):
        out[f"model.layers.{i}.input_layernorm.weight"] = ones.clone()
    return out


def _with_extra_block(vit: dict, depth: int) -> dict:
    """eva_vit_g.pth stores one block more than BLIP-2 runs (the loader drops it): a copy of the last."""
    out = dict(vit)
    for key, tensor in vit.items():
        if key.startswith(f"blocks.{depth - 1}."):
            out[key.replace(f"blocks.{depth - 1}.", f"blocks.{depth}.", 1)] = tensor.clone()
    return out


def _stage_object(sd: dict, cfg: TinyGPTVConfig) -> dict:
    """A TinyGPT-V stage checkpoint: ``{'model','optimizer','config','scaler','epoch'}``."""
    return {
        "model": sd,
        "optimizer": {"state": {}, "param_groups": []},  # the optimizer state is not shipped
        "config": {"model": {"arch": "minigpt_v2" if cfg.stage >= 4 else "minigpt4", "image_size": cfg.image_size,
                             "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha}},
        "scaler": {},
        "epoch": 0,
    }
