"""Declared key tables of the checkpoint files TinyGPT-V users hold (SPEC §2).

Each file has a table: every key maps to one model tensor or is ignored for a stated reason. A
key no rule knows is an error that names it (``mapped``) — the original code loaded with
``strict=False`` and silently produced garbage (TinyGPT-V issues #10, #11, #26).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

from tinyv.errors import TinyVError

IGNORE = None  # a rule target meaning "known, deliberately unused"


@dataclass(frozen=True)
class Rule:
    """``pattern`` (full match) -> ``target`` template (``\\1``...), or IGNORE with ``why``."""

    pattern: str
    target: str | None
    why: str = ""

    def match(self, key: str):
        """(target, match) if ``key`` is this rule's, else None."""
        m = re.fullmatch(self.pattern, key)
        if m is None:
            return None
        return (m.expand(self.target) if self.target is not None else IGNORE, m)


def map_key(key: str, rules: list[Rule]):
    """(target, match) of the first rule that knows ``key``; False if none does."""
    for rule in rules:
        hit = rule.match(key)
        if hit is not None:
            return hit
    return False


L = r"model\.layers\.(\d+)\."
PHI2_RULES = [
    Rule(r"model\.embed_tokens\.weight", r"phi.embed_tokens.weight"),
    Rule(L + r"self_attn\.(query_key_value|dense)\.(weight|bias)", r"phi.layers.\1.self_attn.\2.\3"),
    Rule(L + r"mlp\.(fc1|fc2)\.(weight|bias)", r"phi.layers.\1.mlp.\2.\3"),
    Rule(L + r"input_layernorm\.(weight|bias)", r"phi.layers.\1.input_layernorm.\2"),
    Rule(r"model\.final_layernorm\.(weight|bias)", r"phi.final_layernorm.\1"),
    Rule(r"lm_head\.(weight|bias)", r"phi.lm_head.\1"),
    # newer transformers Phi (>= 4.37): separate projections, fused by PhiWeights into [H, 3, D] rows
    Rule(L + r"self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)", r"split:\1.\2.\3"),
    Rule(L + r"self_attn\.rotary_emb\.inv_freq", IGNORE, "recomputed (old .bin files store it)"),
    Rule(L + r"self_attn\.(q|k)_layernorm\.(weight|bias)", IGNORE, "TinyGPT-V's stage file supplies the q/k norms"),
]

VIT_RULES = [
    Rule(r"cls_token", r"visual.cls_token"),
    Rule(r"pos_embed", r"visual.pos_embed"),
    Rule(r"patch_embed\.proj\.(weight|bias)", r"visual.patch_embed.proj.\1"),
    Rule(r"blocks\.(\d+)\.(norm1|norm2|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", r"visual.blocks.\1.\2.\3"),
    Rule(r"blocks\.(\d+)\.attn\.qkv\.weight", r"visual.blocks.\1.attn.qkv.weight"),
    Rule(r"blocks\.(\d+)\.attn\.(q_bias|v_bias)", r"visual.blocks.\1.attn.\2"),
    Rule(r"(norm|fc_norm|head)\.(weight|bias)", IGNORE, "EVA's own head and final norm: BLIP-2 uses neither"),
]

Q = r"Qformer\.bert\.encoder\.layer\.(\d+)\."
QFORMER_RULES = [
    Rule(r"ln_vision\.(weight|bias)", r"ln_vision.\1"),
    Rule(r"query_tokens", r"qformer.query_tokens"),
    Rule(r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)", r"qformer.layernorm.\1"),
    Rule(
        Q + r"(attention|crossattention)\.(self\.query|self\.key|self\.value|output\.dense|output\.LayerNorm)\.(weight|bias)",
        r"qformer.layer.\1.\2.\3.\4",
    ),
    Rule(Q + r"intermediate_query\.dense\.(weight|bias)", r"qformer.layer.\1.intermediate_query.dense.\2"),
    Rule(Q + r"output_query\.(dense|LayerNorm)\.(weight|bias)", r"qformer.layer.\1.output_query.\2.\3"),
    # the text side of BLIP-2, unused by TinyGPT-V (SPEC §1.6/§1.7)
    Rule(r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.weight", IGNORE, "text embeddings"),
    Rule(r"Qformer\.bert\.embeddings\.position_ids", IGNORE, "int64 buffer"),
    Rule(Q + r"intermediate\.dense\.(weight|bias)", IGNORE, "text FFN"),
    Rule(Q + r"output\.(dense|LayerNorm)\.(weight|bias)", IGNORE, "text FFN"),
    Rule(r"Qformer\.cls\..*", IGNORE, "BERT LM head"),
    Rule(r"(t5_proj|opt_proj|vision_proj|text_proj|itm_head)\.(weight|bias)", IGNORE, "BLIP-2's own heads"),
    Rule(r"temp", IGNORE, "BLIP-2's contrastive temperature"),
    Rule(r"visual_encoder\..*", IGNORE, "the ViT comes from eva_vit_g.pth"),
]

S = r"llama_model\.(?:base_model\.model\.)?model\."  # stage 1 may lack the peft prefix
STAGE_RULES = [
    Rule(r"(llama_proj|llama_proj2)\.(weight|bias)", r"\1.\2"),
    Rule(
        S + r"layers\.(\d+)\.self_attn\.(query_key_value|dense)\.lora_(A|B)(?:\.default)?\.weight",
        r"lora:\1.\2.\3",
    ),
    Rule(S + r"layers\.(\d+)\.self_attn\.(q_layernorm|k_layernorm)\.(weight|bias)", r"phi.layers.\1.self_attn.\2.\3"),
    Rule(S + r"layers\.(\d+)\.(input_layernorm|post_layernorm)\.weight", r"phi.layers.\1.\2.weight"),
    Rule(S + r"final_layernorm\.weight", r"phi.final_layernorm.weight"),
    Rule(r"Qformer\.bert\.embeddings\.position_ids", IGNORE, "int64 buffer"),
]

# Stage-file Phi-2 tensors replace the base Phi-2's where both exist (input_layernorm.weight,
# final_layernorm.weight; their biases stay Phi-2's) — SPEC §1.14.
# Tensors no file holds: they are zero (SPEC §1.14).
ZERO_DEFAULTS = re.compile(r"phi\.layers\.\d+\.self_attn\.(q|k)_layernorm\.bias")


def mapped(source, rules: list[Rule]) -> Iterator[tuple[str, str]]:
    """(file key, target) for every key of ``source``, after checking that every key is known."""
    unknown = [k for k in source.keys if map_key(k, rules) is False]
    if unknown:
        raise TinyVError(
            f"{source.label}: {len(unknown)} tensor(s) tinyv does not know: {short_list(unknown)}"
            f"{sniff(source.keys)}"
        )
    for k in source.keys:
        target, _ = map_key(k, rules)
        yield k, target


_KIND_HINTS = [
    (re.compile(r"^blocks\.\d+\."), "an EVA ViT file (pass it as --vit)"),
    (re.compile(r"^Qformer\.bert\."), "a BLIP-2 Q-Former file (pass it as --qformer)"),
    (re.compile(r"^llama_model\.|^llama_proj"), "a TinyGPT-V stage file (pass it as --stage)"),
    (re.compile(r"^model\.layers\.|^lm_head"), "Phi-2 weights (pass the folder as --phi2)"),
    (re.compile(r"^transformer\.h\.\d+\.mixer"), "an old 'phi-msft' Phi-2 (use a transformers-format Phi-2)"),
]


def sniff(keys) -> str:
    """``"; it looks like <which file>"`` when ``keys`` are another file's (a mixed-up flag), else ""."""
    for pattern, what in _KIND_HINTS:
        if sum(bool(pattern.search(k)) for k in keys) >= max(1, len(keys) // 4):
            return f"; it looks like {what}"
    return ""


def short_list(keys, n: int = 6) -> str:
    """The first ``n`` of ``keys`` (sorted) for an error message, and how many more there are."""
    keys = sorted(keys)
    more = f" … and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def missing_hint(missing) -> str:
    """Which flag supplies the missing tensors, when the answer is not obvious."""
    if any(re.search(r"(q_layernorm|k_layernorm|post_layernorm)", k) for k in missing):
        return " (the q/k and post-attention norms come only from a TinyGPT-V stage file: pass --stage)"
    return ""
