"""Phi-2's tensors exactly as the model needs them, read one at a time from the checkpoints."""
from __future__ import annotations

import re

import torch

from tinyv.errors import TinyVError
from tinyv.export.checkpoint_files import phi2_source
from tinyv.export.checkpoints import Checkpoints
from tinyv.export.key_tables import IGNORE, PHI2_RULES, ZERO_DEFAULTS, mapped, missing_hint, short_list
from tinyv.export.lora import merge_lora

_LINEAR = re.compile(r"phi\.layers\.(\d+)\.self_attn\.(query_key_value|dense)\.weight")  # the LoRA'd Linears


class PhiWeights:
    """Random access to Phi-2's tensors exactly as the model needs them.

    ``get(target)`` returns the tensor for a model key (``phi.…``): q/k/v fused into the per-head
    [H, 3, D] rows if the folder has them split, LoRA merged (W + alpha/r · B @ A, in fp32), the
    stage file's norms and overrides applied, q/k norm biases zero. Nothing is held beyond the
    stage file's small tensors, so an exporter can stream layer by layer, or read one layer again.
    """

    def __init__(self, ck: Checkpoints, expected: set[str]):
        self.ck = ck
        self.src = phi2_source(ck.phi2_dir)
        self.base: dict[str, list[str]] = {}  # target -> source key(s), in file order
        split: dict[str, dict[str, str]] = {}
        for key, target in mapped(self.src, PHI2_RULES):
            if target is IGNORE:
                continue
            if target.startswith("split:"):
                layer, proj, kind = target[6:].split(".")
                split.setdefault(f"{layer}.{kind}", {})[proj] = key
                continue
            if target not in expected:
                raise TinyVError(f"--phi2 {key} maps to {target}, which this model does not have")
            self.base[target] = [key]
        for lk, parts in split.items():
            missing = [p for p in ("q_proj", "k_proj", "v_proj") if p not in parts]
            layer, kind = lk.split(".")
            if missing:
                gaps = [f"model.layers.{layer}.self_attn.{p}.{kind}" for p in missing]
                raise TinyVError(f"--phi2: incomplete q/k/v projections: {short_list(gaps)} missing")
            target = f"phi.layers.{layer}.self_attn.query_key_value.{kind}"
            if target not in expected:
                raise TinyVError(f"--phi2 model.layers.{layer}.self_attn.q_proj.{kind} maps to {target}, "
                                 "which this model does not have")
            self.base[target] = [parts["q_proj"], parts["k_proj"], parts["v_proj"]]
        for (layer, module) in ck.lora:
            if f"phi.layers.{layer}.self_attn.{module}.weight" not in self.base:
                raise TinyVError(f"--stage: LoRA for layer {layer} {module} has no base weight in --phi2")
        for target in ck.stage_phi:
            if target not in expected:
                raise TinyVError(f"{ck.stage_phi[target][1]} maps to {target}, which this model does not have")
        # model order (layer by layer), which is also the order a streaming reader wants
        self.targets = _model_order(expected)
        missing = [t for t in self.targets if not self._has(t)]
        if missing:
            raise TinyVError(
                f"the checkpoints lack {len(missing)} tensor(s) the model needs: {short_list(missing)}"
                f"{missing_hint(missing)}"
            )

    def _has(self, target: str) -> bool:
        return target in self.ck.stage_phi or target in self.base or bool(ZERO_DEFAULTS.fullmatch(target))

    def origin(self, target: str) -> str:
        """Where ``target`` comes from, for error messages."""
        if target in self.ck.stage_phi:
            return self.ck.stage_phi[target][1]
        if target in self.base:
            keys = self.base[target]
            return f"--phi2 {keys[0]}" if len(keys) == 1 else f"--phi2 {{q,k,v}}_proj of {keys[0]}"
        return "zero (no file holds it)"

    def get(self, target: str) -> torch.Tensor:
        """The tensor of model key ``target``, read from its file(s) now."""
        if target in self.ck.stage_phi:  # the stage file's value wins (SPEC §1.14)
            return self.ck.stage_phi[target][0]
        if target not in self.base:
            if ZERO_DEFAULTS.fullmatch(target):
                d = self.ck.cfg.phi.head_dim
                return torch.zeros(d)
            raise TinyVError(f"no file holds {target}")
        keys = self.base[target]
        if len(keys) == 3:
            tensor = _fuse_qkv(*(self.src.get(k) for k in keys), self.ck.cfg.phi.heads)
        else:
            tensor = self.src.get(keys[0])
        m = _LINEAR.fullmatch(target)
        if m and (m.group(1), m.group(2)) in self.ck.lora:
            tensor = merge_lora(tensor, self.ck.lora[(m.group(1), m.group(2))], self.ck.cfg.lora_scale,
                                m.group(1), m.group(2))
        return tensor

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """fp32 state dict of decoder layer ``i`` (keys relative to the layer)."""
        pre = f"phi.layers.{i}."
        return {t[len(pre):]: self.get(t).float() for t in self.targets if t.startswith(pre)}


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Separate q/k/v rows -> the fused per-head [H, 3, D] layout (SPEC §1.10)."""
    shape = (heads, -1) + tuple(q.shape[1:])
    return torch.stack([t.reshape(shape) for t in (q, k, v)], dim=1).reshape((-1,) + tuple(q.shape[1:]))


def _model_order(expected: set[str]) -> list[str]:
    def key(t: str):
        m = re.match(r"phi\.layers\.(\d+)\.", t)
        if t.startswith("phi.embed_tokens"):
            return (-1, t)
        return (int(m.group(1)), t) if m else (10**9, t)

    return sorted(expected, key=key)
