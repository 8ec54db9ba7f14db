"""The fp32 vision graph: the module that is exported, its trace, and its weights written out.

``VisionEncoder`` is EVA ViT -> ln_vision -> Q-Former -> one affine map (``llama_proj2 ∘
llama_proj`` folded, SPEC §1.8). ``write_fp32_graph`` traces it without weights, then writes the
weights tensor by tensor from the model's own storage (each transposed copy lives only while it
is written): ViT-g's 4.4 GB of fp32 weights are never in memory twice.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from torch import nn

from tinyv.export.attention_fusion import MS_DOMAIN, fuse_vit_attention
from tinyv.export.onnx_writer import TensorWriter, save_model

INPUT = "pixel_values"  # [B, 3, S, S]
OUTPUT = "image_embeds"  # [B, num_queries, phi.hidden]
_RENAME = {"Transpose": ".T", "Cast": "", "Identity": ""}  # folded weight -> initializer name suffix


def fold_projections(proj1: nn.Linear, proj2: nn.Linear) -> nn.Linear:
    """One Linear equal to ``proj2(proj1(x))`` (no activation between them, SPEC §1.8).

    W = W2 @ W1 and b = W2 @ b1 + b2, computed in float64 and stored as float32.
    """
    if proj1.out_features != proj2.in_features:
        raise ValueError(f"cannot chain Linear({proj1.in_features}->{proj1.out_features}) into "
                         f"Linear({proj2.in_features}->{proj2.out_features})")
    with torch.no_grad():
        w1, w2 = proj1.weight.double(), proj2.weight.double()
        b1 = proj1.bias.double() if proj1.bias is not None else torch.zeros(proj1.out_features, dtype=torch.float64)
        b2 = proj2.bias.double() if proj2.bias is not None else torch.zeros(proj2.out_features, dtype=torch.float64)
        folded = nn.Linear(proj1.in_features, proj2.out_features, dtype=torch.float32)
        folded.weight.copy_((w2 @ w1).float())  # [out2, in1]
        folded.bias.copy_((w2 @ b1 + b2).float())
    folded.requires_grad_(False)
    return folded


class VisionEncoder(nn.Module):
    """Pixels [B, 3, S, S] -> image embeddings [B, num_queries, phi.hidden], fp32.

    Shares the ViT, ``ln_vision`` and Q-Former modules (and so their parameters) with ``model``;
    only the folded projection is new (phi.hidden x qformer.hidden floats).
    """

    def __init__(self, model):
        super().__init__()
        self.visual = model.visual
        self.ln_vision = model.ln_vision
        self.qformer = model.qformer
        self.proj = fold_projections(model.llama_proj, model.llama_proj2)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.ln_vision(self.visual(pixel_values))  # [B, 1 + N, vision.width]
        return self.proj(self.qformer(tokens))  # [B, Q, hidden]


def write_fp32_graph(encoder: VisionEncoder, path: str, image_size: int, opset: int) -> None:
    """Trace ``encoder`` and write it to ``path`` with its weights in ``path + '.data'``.

    Nodes that depend on weights only (weight transposes, the q/0/v bias concatenation) are
    evaluated here and become initializers, one tensor in memory at a time; the ViT's attention
    becomes ONNX Runtime's fused node (``attention_fusion``).
    """
    import onnx

    proto = _trace(encoder, image_size, opset)
    graph = proto.graph
    weights = {k: v.detach() for k, v in encoder.state_dict().items()}
    const: dict[str, np.ndarray] = {}  # value name -> array (views of the model's weights)
    pretty: dict[str, str] = {}  # value name -> readable initializer name
    for inp in list(graph.input)[1:]:
        if inp.name not in weights:
            raise RuntimeError(f"traced graph input {inp.name!r} is no parameter of the encoder")
        const[inp.name] = weights[inp.name].numpy()
        pretty[inp.name] = inp.name
    del weights

    kept = []
    for node in graph.node:
        if node.op_type == "Constant":
            const[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
            kept.append(node)  # dropped below if only folded nodes use it
        elif node.input and all(i in const for i in node.input if i):
            const.update(zip(node.output, _eval_node(node, [const[i] for i in node.input], opset)))
            src = [pretty[i] for i in node.input if i in pretty]
            if len(src) == 1 and node.op_type in _RENAME:  # e.g. "visual.blocks.0.mlp.fc1.weight.T"
                pretty[node.output[0]] = src[0] + _RENAME[node.op_type]
        else:
            kept.append(node)

    outputs = {o.name for o in graph.output}
    kept, fused = fuse_vit_attention(kept, encoder.visual.cfg.heads, const.get, outputs, opset)
    if fused:
        proto.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    used = {i for n in kept for i in n.input} | outputs
    kept = [n for n in kept if n.op_type != "Constant" or n.output[0] in used]
    made = {o for n in kept for o in n.output}
    live = [v for v in dict.fromkeys(i for n in kept for i in n.input) if v in const and v not in made]
    rename, taken = {}, made | {INPUT}
    for v in live:
        name, k = pretty.get(v, v), 0
        while name in taken:
            k += 1
            name = f"{pretty.get(v, v)}_{k}"
        rename[v] = name
        taken.add(name)
    for n in kept:
        for j, i in enumerate(n.input):
            if i in rename:
                n.input[j] = rename[i]

    writer = TensorWriter(path)
    try:
        initializers = [writer.add(rename[v], const.pop(v)) for v in live]
    finally:
        writer.close()
    const.clear()
    del graph.input[1:]  # weights are initializers now, not inputs
    proto.producer_name = "tinyv.export.vision"
    save_model(proto, kept, initializers, path)


def _trace(encoder: VisionEncoder, image_size: int, opset: int):
    """The graph with every parameter as a graph input and nothing constant-folded."""
    import onnx

    # batch 1 gives the same graph as larger batches (all shapes are read at run time) and
    # costs the tracer half the activation memory of batch 2
    dummy = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation notice, tracer warnings
        torch.onnx.export(
            encoder,
            (dummy,),
            buf,
            dynamo=False,
            export_params=False,  # the weights are written by write_fp32_graph, tensor by tensor
            do_constant_folding=False,  # folding here would copy every weight at once
            opset_version=opset,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
        )
    return onnx.load_from_string(buf.getvalue())


def _eval_node(node, inputs: list, opset: int) -> list:
    """Run one node on constant numpy inputs (Transpose stays a view: no copy until written)."""
    if node.op_type == "Transpose":
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        return [np.transpose(inputs[0], perm)]
    from onnx.reference import ReferenceEvaluator

    return list(ReferenceEvaluator(node, opsets={"": opset}).run(None, dict(zip(node.input, inputs))))
