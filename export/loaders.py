"""Strict loading of a fp32 TinyGPT-V from the checkpoint files its users hold (SPEC §1.14, §2).

    model = load_model(phi2="phi-2/", vit="eva_vit_g.pth", qformer="blip2_pretrained_flant5xxl.pth",
                       stage="TinyGPT-V_for_Stage4.pth")

The parts, one module each: ``checkpoints`` resolves the four sources and reads the stage file;
``key_tables`` declares how every key of every file maps to the model (or why it is ignored);
``checkpoint_files`` reads pickles (``weights_only``) and safetensors tensor by tensor;
``phi_weights`` gives Phi-2's tensors with q/k/v fused and LoRA merged (``lora``). Here the
``Assembler`` fills a meta-device model with them: a key no rule knows, a tensor the model needs
that no file gives, or a shape that does not fit is an error that names the keys — the original
code loaded with ``strict=False`` and silently produced garbage (TinyGPT-V issues #10, #11, #26).

Memory: the model is built on the meta device and each tensor is converted and assigned as it is
read (safetensors and mmap'd pickles), so full-size checkpoints never sit in RAM twice.
"""
from __future__ import annotations

import re

import torch

from tinyv.engine.config import TinyGPTVConfig
from tinyv.errors import TinyVError
from tinyv.export.checkpoint_files import pickle_source
from tinyv.export.checkpoints import Checkpoints, open_checkpoints
from tinyv.export.eva_vit import interpolate_pos_embed
from tinyv.export.key_tables import IGNORE, QFORMER_RULES, VIT_RULES, mapped, missing_hint, short_list
from tinyv.export.phi_weights import PhiWeights


class Assembler:
    """Fills a meta-device model tensor by tensor and checks that nothing is missing or left over."""

    def __init__(self, model: torch.nn.Module, preset_name: str):
        self.model = model
        self.preset_name = preset_name
        self.expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        self.filled: dict[str, str] = {}

    def put(self, key: str, tensor: torch.Tensor, origin: str) -> None:
        """Assign ``tensor`` (as fp32) to model key ``key``; ``origin`` names its file and key."""
        if key not in self.expected:
            raise TinyVError(f"{origin} maps to {key}, which this model does not have")
        if key in self.filled:
            raise TinyVError(f"{key} is given twice: by {self.filled[key]} and by {origin}")
        if tuple(tensor.shape) != self.expected[key]:
            raise TinyVError(
                f"{origin} has shape {list(tensor.shape)} but the model ({self.preset_name}) expects "
                f"{list(self.expected[key])}: the checkpoint is for a different model size"
            )
        if not tensor.is_floating_point():
            raise TinyVError(f"{origin} holds {tensor.dtype} values, expected floating point")
        *path, name = key.split(".")
        module = self.model.get_submodule(".".join(path))
        module._parameters[name] = torch.nn.Parameter(tensor.to(torch.float32).contiguous(), requires_grad=False)
        self.filled[key] = origin

    def finish(self, skip_prefix: str | None = None) -> None:
        """Check that every tensor was given (those under ``skip_prefix`` stay on meta)."""
        missing = [k for k in self.expected if k not in self.filled and not (skip_prefix and k.startswith(skip_prefix))]
        if missing:
            raise TinyVError(
                f"the checkpoints lack {len(missing)} tensor(s) the model needs: {short_list(missing)}"
                f"{missing_hint(missing)}"
            )


def build_model(ck: Checkpoints, with_phi: bool = True):
    """A fp32 ``TinyGPTV``; ``with_phi=False`` fills only the vision side (Phi-2 stays on meta)."""
    from tinyv.export.reference import TinyGPTV
    from tinyv.engine.phi import Rotary

    with torch.device("meta"):
        model = TinyGPTV(ck.cfg, ck.tokenizer)
    asm = Assembler(model, ck.preset_name)
    # One file at a time, each file's mapping dropped once its tensors are assigned, Phi-2 (the
    # largest) last and one shard at a time: peak RSS stays near the fp32 model itself.
    for target, (tensor, origin) in ck.stage_model.items():
        asm.put(target, tensor, origin)
    _load_vit(asm, ck.vit_path, ck.cfg)
    _load_qformer(asm, ck.qformer_path)
    if with_phi:
        weights = PhiWeights(ck, set(k for k in asm.expected if k.startswith("phi.")))
        for target in weights.targets:
            asm.put(target, weights.get(target), weights.origin(target))
        model.phi.rotary = Rotary(ck.cfg.phi)  # non-persistent buffer, was built on meta
    asm.finish(skip_prefix=None if with_phi else "phi.")
    return model.eval()


def load_model(phi2, vit, qformer, stage, image_size=None, preset=None):
    """Build a fp32 ``TinyGPTV`` from the four sources (paths or hub names)."""
    return build_model(open_checkpoints(phi2, vit, qformer, stage, image_size, preset))


def _load_vit(asm: Assembler, path: str, cfg: TinyGPTVConfig) -> None:
    """EVA ViT: the stored 40th block is dropped; pos_embed resized to the input grid."""
    src, _ = pickle_source(path, "--vit", wrapped=False)
    for key, target in mapped(src, VIT_RULES):
        if target is IGNORE:
            continue
        m = re.match(r"visual\.blocks\.(\d+)\.", target)
        if m and int(m.group(1)) == cfg.vision.depth:
            continue  # BLIP-2 uses the first `depth` blocks (39 of the 40 stored)
        tensor = src.get(key)
        if target == "visual.pos_embed":
            tensor = _resize_pos_embed(tensor, cfg)
        asm.put(target, tensor, f"{src.label} {key}")


def _load_qformer(asm: Assembler, path: str) -> None:
    src, _ = pickle_source(path, "--qformer", wrapped=True)
    for key, target in mapped(src, QFORMER_RULES):
        if target is not IGNORE:
            asm.put(target, src.get(key), f"{src.label} {key}")


def _resize_pos_embed(t: torch.Tensor, cfg: TinyGPTVConfig) -> torch.Tensor:
    if t.dim() != 3 or t.shape[0] != 1:
        raise TinyVError(f"--vit: pos_embed has shape {list(t.shape)}, expected [1, 1 + g*g, width]")
    try:
        return interpolate_pos_embed(t, cfg.vision.grid)
    except ValueError as e:
        raise TinyVError(f"--vit: {e}") from None
