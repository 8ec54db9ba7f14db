"""TinyGPT-V's LoRA on Phi-2's ``query_key_value`` and ``dense`` (peft 0.2 semantics, SPEC §1):
checked when the stage file is read, merged into the base weight before anything else sees it."""
from __future__ import annotations

import torch

from tinyv.engine.config import PRESET_NAMES, TinyGPTVConfig
from tinyv.errors import TinyVError
from tinyv.export.key_tables import short_list

LORA_MODULES = ("query_key_value", "dense")


def check_lora(lora: dict, cfg: TinyGPTVConfig) -> None:
    """LoRA must cover every layer's query_key_value and dense, with A and B, rank lora_r.

    ``lora`` maps (layer, module) -> {"A": [r, in], "B": [out, r]}; empty for stage 1.
    """
    if not lora:
        return  # stage 1 has none
    want = {(str(i), m) for i in range(cfg.phi.layers) for m in LORA_MODULES}
    missing = want - set(lora)
    if missing:
        raise TinyVError(f"--stage: LoRA weights missing for {short_list(f'layer {a} {b}' for a, b in missing)}")
    for (layer, module), ab in lora.items():
        if set(ab) != {"A", "B"}:
            raise TinyVError(f"--stage: layer {layer} {module} has lora_{''.join(ab)} but not both A and B")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != cfg.lora_r or b.shape[1] != cfg.lora_r:
            raise TinyVError(
                f"--stage: layer {layer} {module} LoRA has rank {a.shape[0]}, expected {cfg.lora_r} "
                f"(TinyGPT-V uses r={cfg.lora_r}, alpha={cfg.lora_alpha}); checkpoints of another size "
                f"need the matching --preset ({', '.join(PRESET_NAMES)})"
            )


def merge_lora(weight: torch.Tensor, ab: dict, scale: float, layer: str, module: str) -> torch.Tensor:
    """W' = W + scale · B @ A in fp32 (scale = alpha / r); ``weight`` must be B @ A's shape."""
    if (ab["B"].shape[0], ab["A"].shape[1]) != tuple(weight.shape):
        raise TinyVError(
            f"--stage: LoRA of layer {layer} {module} is for a {ab['B'].shape[0]}x"
            f"{ab['A'].shape[1]} weight, but --phi2's is {list(weight.shape)}"
        )
    return weight.float() + scale * (ab["B"].float() @ ab["A"].float())
