"""The ViT's attention as ONNX Runtime's fused ``MultiHeadAttention``, in the exported graph.

torch's export writes EVA's attention as a reshape of the packed q/k/v, transposes, a scaled
``MatMul``, ``Softmax`` and another ``MatMul``: ONNX Runtime then writes 16 heads × 1025 × 1025
scores per layer to memory and reads them back twice (67 MB each in fp32), and its own attention
fusion does not match this layout (it fused 2 of 39 layers). ``com.microsoft.MultiHeadAttention``
computes the same thing blockwise on the CPU (full size, 2 threads: 35 instead of 41 ms a layer;
the int8 graph's encode 4.8 -> 4.4 s and its peak memory 1.82 -> 1.56 GB). This pass finds the
pattern EVA's blocks trace to and rewrites each to a ``Split`` and one attention node; anything
that does not match exactly is left as it was.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

MS_DOMAIN = "com.microsoft"


def fuse_vit_attention(nodes: list, heads: int, constant: Callable[[str], np.ndarray | None], outputs: set[str],
                       opset: int, prefix: str = "/visual/") -> tuple[list, int]:
    """``nodes`` (in graph order) with every attention under node names starting with ``prefix``
    fused, and what only the replaced nodes used dropped; and how many were fused. ``constant``
    gives the value of a constant input (``None`` for an activation); ``outputs`` are the graph's."""
    from onnx import helper

    made = {o: n for n in nodes for o in n.output}
    users: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            users.setdefault(i, []).append(n)

    def producer(name, op):
        n = made.get(name)
        return n if n is not None and n.op_type == op else None

    def only_user(name, op):
        u = users.get(name, [])
        return u[0] if len(u) == 1 and u[0].op_type == op else None

    def perm(node):
        return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)

    def part(name, index):
        """The Gather of part ``index`` (q 0, k 1, v 2) of the packed [3, B, H, S, Dh] tensor."""
        n = producer(name, "Gather")
        value = constant(n.input[1]) if n is not None else None
        return n if value is not None and np.size(value) == 1 and int(value) == index else None

    replace, drop = {}, set()
    for sm in [n for n in nodes if n.op_type == "Softmax" and n.name.startswith(prefix)]:
        scores, mixed = producer(sm.input[0], "MatMul"), only_user(sm.output[0], "MatMul")
        if scores is None or mixed is None or mixed.input[0] != sm.output[0]:
            continue
        scaled, k_t = producer(scores.input[0], "Mul"), producer(scores.input[1], "Transpose")
        if scaled is None or k_t is None or perm(k_t) != [0, 1, 3, 2]:
            continue
        scale = constant(scaled.input[1])
        q, k, v = part(scaled.input[0], 0), part(k_t.input[0], 1), part(mixed.input[1], 2)
        if scale is None or np.size(scale) != 1 or None in (q, k, v) or not q.input[0] == k.input[0] == v.input[0]:
            continue
        packed = producer(q.input[0], "Transpose")
        split = producer(packed.input[0], "Reshape") if packed is not None else None
        back = only_user(mixed.output[0], "Transpose")
        out = only_user(back.output[0], "Reshape") if back is not None else None
        if split is None or perm(packed) != [2, 0, 3, 1, 4] or out is None or perm(back) != [0, 2, 1, 3]:
            continue
        base = sm.name.rsplit("/", 1)[0] + "/FusedAttention"
        parts = [f"{base}_{p}" for p in "qkv"]
        # [B, S, 3 * width] -> q, k, v side by side; opset 18 wants the count said
        count = {"num_outputs": 3} if opset >= 18 else {}
        replace[id(scaled)] = [
            helper.make_node("Split", [split.input[0]], parts, name=f"{base}_split", axis=-1, **count),
            helper.make_node("MultiHeadAttention", parts, [out.output[0]], name=base, domain=MS_DOMAIN,
                             num_heads=heads, scale=float(np.asarray(scale).reshape(-1)[0])),
        ]
        drop.update(id(n) for n in (scaled, scores, sm, mixed, back, out))
    if not replace:
        return nodes, 0
    fused = []
    for n in nodes:
        fused.extend(replace.get(id(n), []))
        if id(n) not in drop:
            fused.append(n)
    return _live(fused, outputs), len(replace)


def _live(nodes: list, outputs: set[str]) -> list:
    """The nodes some graph output depends on (the shape arithmetic of the removed reshapes goes)."""
    needed, keep = set(outputs), []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    return keep[::-1]
