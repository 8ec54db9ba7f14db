"""Random TinyGPT-V checkpoints in exactly the on-disk formats users download (SPEC §2).

At any size: tiny for tests, full size for benchmarks. LoRA weights are non-zero and norm weights
are away from 1, so a loader that drops or misroutes a tensor changes the outputs.

    paths = write_checkpoints("ckpt", preset="tiny", seed=0)
    model = TinyGPTV.from_checkpoints(**paths.as_kwargs(), preset="tiny")
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from tinyv.engine import prompts
from tinyv.engine.config import TinyGPTVConfig, preset as make_preset

BERT_VOCAB = 30522
BERT_POSITIONS = 512

# Planted outliers (``outliers=N``): real Phi-2 and ViTs carry a few residual channels whose
# activations are 10-100x the rest ("massive activations"; high-norm tokens in ViTs). Random
# weights have none, which flatters int8 activations; these make them show.
OUTLIER_GAIN = 60.0


def outlier_channels(width: int, count: int) -> list[int]:
    """The ``count`` residual channels that planting makes large: spread over the width, fixed."""
    return [int((i + 0.37) * width / count) for i in range(count)]

# Text the demo tokenizer is trained on: the prompt templates (image placeholder left out) and
# plain English words.
_CORPUS = [
    prompts.build_prompt(4).replace(prompts.IMAGE_PLACEHOLDER, ""),
    prompts.build_prompt(3).replace(prompts.IMAGE_PLACEHOLDER, ""),
    prompts.PromptFormat.for_stage(4).vqa_question.format(question="").rstrip(),
    "a red circle left of a blue square on a white background",
    "two green triangles and one yellow star near the top of the picture",
    "the cat sits on the mat while the dog sleeps under the table",
    "what colour is the large shape in the centre? how many shapes are there?",
    "a photo of a person riding a bicycle down a street next to some buildings",
]


@dataclass
class CheckpointPaths:
    phi2: str
    vit: str
    qformer: str
    stage: str

    def as_kwargs(self) -> dict:
        return {"phi2": self.phi2, "vit": self.vit, "qformer": self.qformer, "stage": self.stage}


class _Rand:
    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def normal(self, *shape, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g) * std + mean

    def linear(self, out: int, inp: int, gain: float = 1.0) -> torch.Tensor:
        return self.normal(out, inp, std=gain / inp**0.5)

    def bias(self, n: int) -> torch.Tensor:
        return self.normal(n, std=0.02)

    def norm_weight(self, n: int) -> torch.Tensor:
        # away from 1 so that dropping a norm weight (or using Phi-2's instead of the stage's) shows
        return 0.5 + torch.rand(n, generator=self.g)


def write_tokenizer(folder: str, vocab_size: int = 400) -> None:
    """A small byte-level BPE tokenizer saved like Phi-2's (tokenizer.json, vocab.json, merges.txt)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.save(os.path.join(folder, "tokenizer.json"))
    tok.model.save(folder)  # vocab.json + merges.txt
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CodeGenTokenizer", "add_bos_token": False, "model_max_length": 2048}, f)


def _phi2_tensors(cfg: TinyGPTVConfig, r: _Rand, split: bool, act_scale: float, outliers: int = 0):
    """Yield (key, tensor) of a Phi-2 folder, layer by layer (keeps full-size writing lean)."""
    p = cfg.phi
    h, H, D = p.hidden, p.heads, p.head_dim
    big = outlier_channels(h, outliers)
    embed = r.normal(p.vocab_size, h, std=act_scale)
    embed[:, big] = embed[:, big].abs() * OUTLIER_GAIN  # every token carries them into the residual stream
    yield "model.embed_tokens.weight", embed
    for i in range(p.layers):
        pre = f"model.layers.{i}."
        qkv_w, qkv_b = r.linear(3 * h, h), r.bias(3 * h)
        if split:  # the [H, 3, D] rows taken apart into q, k, v
            w, b = qkv_w.view(H, 3, D, h), qkv_b.view(H, 3, D)
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                yield pre + f"self_attn.{name}.weight", w[:, j].reshape(h, h).clone()
                yield pre + f"self_attn.{name}.bias", b[:, j].reshape(h).clone()
        else:
            yield pre + "self_attn.query_key_value.weight", qkv_w
            yield pre + "self_attn.query_key_value.bias", qkv_b
        yield pre + "self_attn.dense.weight", r.linear(h, h)
        yield pre + "self_attn.dense.bias", r.bias(h)
        yield pre + "mlp.fc1.weight", r.linear(p.intermediate, h)
        yield pre + "mlp.fc1.bias", r.bias(p.intermediate)
        yield pre + "mlp.fc2.weight", r.linear(h, p.intermediate)
        fc2_bias = r.bias(h)
        fc2_bias[big] += OUTLIER_GAIN * act_scale / p.layers  # and each layer adds to them, as in Phi-2
        yield pre + "mlp.fc2.bias", fc2_bias
        yield pre + "input_layernorm.weight", r.norm_weight(h)  # replaced by the stage file's
        yield pre + "input_layernorm.bias", r.bias(h)
    yield "model.final_layernorm.weight", r.norm_weight(h)
    yield "model.final_layernorm.bias", r.bias(h)
    yield "lm_head.weight", r.linear(p.vocab_size, h, gain=4.0)
    yield "lm_head.bias", r.bias(p.vocab_size)


def write_phi2(folder: str, cfg: TinyGPTVConfig, seed: int = 0, *, fmt: str = "fused", file: str = "safetensors",
               dtype=torch.float16, shard_bytes: int = 2 << 30, act_scale: float = 1.0, outliers: int = 0) -> None:
    """A Phi-2 folder: transformers-4.36 ``fmt="fused"`` or newer ``fmt="split"`` q/k/v.

    ``file`` is ``safetensors`` (sharded with an index past ``shard_bytes``) or ``bin``.
    """
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg.phi.to_hf_config(), f, indent=2)
    write_tokenizer(folder)
    r = _Rand(seed)
    tensors = ((k, v.to(dtype).contiguous()) for k, v in _phi2_tensors(cfg, r, fmt == "split", act_scale, outliers))
    if file == "bin":
        torch.save(dict(tensors), os.path.join(folder, "pytorch_model.bin"))
        return
    # shards are written as they fill (full size never sits in RAM whole), renamed at the end
    written: list[tuple[str, list[str]]] = []
    current: dict = {}
    size = 0

    def flush():
        tmp = os.path.join(folder, f".shard-{len(written)}.tmp")
        save_file(current, tmp, metadata={"format": "pt"})
        written.append((tmp, list(current)))

    for k, v in tensors:
        if current and size + v.nbytes > shard_bytes:
            flush()
            current, size = {}, 0
        current[k], size = v, size + v.nbytes
    flush()
    if len(written) == 1:
        os.replace(written[0][0], os.path.join(folder, "model.safetensors"))
        return
    weight_map = {}
    for n, (tmp, keys) in enumerate(written, 1):
        name = f"model-{n:05d}-of-{len(written):05d}.safetensors"
        os.replace(tmp, os.path.join(folder, name))
        weight_map.update({k: name for k in keys})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)


def write_vit(path: str, cfg: TinyGPTVConfig, seed: int = 1, *, dtype=torch.float16, extra_block: bool = True,
              act_scale: float = 1.0, outliers: int = 0) -> None:
    """``eva_vit_g.pth``: a plain state dict, pos_embed at the pretraining grid, one unused extra block."""
    v, r = cfg.vision, _Rand(seed)
    W, grid = v.width, v.pretrain_image_size // v.patch_size
    sd = {
        "cls_token": r.normal(1, 1, W, std=act_scale),
        "pos_embed": r.normal(1, 1 + grid * grid, W, std=act_scale),
        "patch_embed.proj.weight": r.normal(W, 3, v.patch_size, v.patch_size, std=act_scale / (3 * v.patch_size**2) ** 0.5),
        "patch_embed.proj.bias": r.bias(W) * act_scale,
    }
    for i in range(v.depth + (1 if extra_block else 0)):
        pre = f"blocks.{i}."
        sd.update({
            pre + "norm1.weight": r.norm_weight(W), pre + "norm1.bias": r.bias(W),
            pre + "attn.qkv.weight": r.linear(3 * W, W),
            pre + "attn.q_bias": r.normal(W, std=0.1), pre + "attn.v_bias": r.normal(W, std=0.1),
            pre + "attn.proj.weight": r.linear(W, W, gain=0.5), pre + "attn.proj.bias": r.bias(W),
            pre + "norm2.weight": r.norm_weight(W), pre + "norm2.bias": r.bias(W),
            pre + "mlp.fc1.weight": r.linear(v.mlp_hidden, W), pre + "mlp.fc1.bias": r.bias(v.mlp_hidden),
            pre + "mlp.fc2.weight": r.linear(W, v.mlp_hidden, gain=0.5), pre + "mlp.fc2.bias": r.bias(W),
        })
    if outliers:
        _plant_vit_outliers(sd, v.depth, W, outliers, act_scale)
    torch.save({k: t.to(dtype) for k, t in sd.items()}, path)


def _plant_vit_outliers(sd: dict, depth: int, width: int, count: int, act_scale: float) -> None:
    """Large residual channels for every token, grown by the middle blocks' MLPs, and a few
    high-norm tokens (the kind ViTs use as registers), after the weights are drawn so that the
    other tensors stay those of the same seed without planting."""
    big = outlier_channels(width, count)
    sd["patch_embed.proj.bias"][big] += OUTLIER_GAIN * act_scale / 2
    for i in range(depth // 3, depth):
        sd[f"blocks.{i}.mlp.fc2.bias"][big] += OUTLIER_GAIN * act_scale / depth
    tokens = sd["pos_embed"].shape[1]
    sd["pos_embed"][0, [tokens // 3, 2 * tokens // 3]] *= OUTLIER_GAIN / 6


def write_qformer(path: str, cfg: TinyGPTVConfig, seed: int = 2, *, dtype=torch.float32) -> None:
    """``blip2_pretrained_flant5xxl.pth``: ``{'model': ...}`` with BLIP-2's text side included."""
    q, r = cfg.qformer, _Rand(seed)
    h, vw = q.hidden, cfg.vision.width
    sd = {
        "ln_vision.weight": r.norm_weight(vw), "ln_vision.bias": r.bias(vw),
        "query_tokens": r.normal(1, q.num_queries, h),
        "Qformer.bert.embeddings.word_embeddings.weight": r.normal(min(BERT_VOCAB, 64 * h), h, std=0.02),
        "Qformer.bert.embeddings.position_embeddings.weight": r.normal(BERT_POSITIONS, h, std=0.02),
        "Qformer.bert.embeddings.LayerNorm.weight": r.norm_weight(h),
        "Qformer.bert.embeddings.LayerNorm.bias": r.bias(h),
        "t5_proj.weight": r.linear(64, h), "t5_proj.bias": r.bias(64),
        "Qformer.cls.predictions.bias": r.bias(128),
    }
    for i in range(q.layers):
        pre = f"Qformer.bert.encoder.layer.{i}."
        blocks = ["attention"] + (["crossattention"] if i % q.cross_attention_freq == 0 else [])
        for blk in blocks:
            kv = vw if blk == "crossattention" else h
            sd.update({
                pre + f"{blk}.self.query.weight": r.linear(h, h), pre + f"{blk}.self.query.bias": r.bias(h),
                pre + f"{blk}.self.key.weight": r.linear(h, kv), pre + f"{blk}.self.key.bias": r.bias(h),
                pre + f"{blk}.self.value.weight": r.linear(h, kv), pre + f"{blk}.self.value.bias": r.bias(h),
                pre + f"{blk}.output.dense.weight": r.linear(h, h), pre + f"{blk}.output.dense.bias": r.bias(h),
                pre + f"{blk}.output.LayerNorm.weight": r.norm_weight(h), pre + f"{blk}.output.LayerNorm.bias": r.bias(h),
            })
        for ffn in ("", "_query"):  # text FFN (ignored) and query FFN (used)
            sd.update({
                pre + f"intermediate{ffn}.dense.weight": r.linear(q.intermediate, h),
                pre + f"intermediate{ffn}.dense.bias": r.bias(q.intermediate),
                pre + f"output{ffn}.dense.weight": r.linear(h, q.intermediate),
                pre + f"output{ffn}.dense.bias": r.bias(h),
                pre + f"output{ffn}.LayerNorm.weight": r.norm_weight(h),
                pre + f"output{ffn}.LayerNorm.bias": r.bias(h),
            })
    sd = {k: t.to(dtype) for k, t in sd.items()}
    sd["Qformer.bert.embeddings.position_ids"] = torch.arange(BERT_POSITIONS).unsqueeze(0)
    torch.save({"model": sd}, path)


def write_stage(path: str, cfg: TinyGPTVConfig, seed: int = 3, *, lora: str = "plain", peft_prefix: bool = True,
                arch: str | None = None) -> None:
    """A TinyGPT-V stage checkpoint: ``{'model','optimizer','config','scaler','epoch'}``, fp32.

    ``lora`` is ``plain`` (``lora_A.weight``), ``default`` (``lora_A.default.weight``) or ``none``
    (stage 1); ``peft_prefix=False`` drops ``base_model.model.`` as stage-1 files may.
    """
    p, r = cfg.phi, _Rand(seed)
    h, rank = p.hidden, cfg.lora_r
    prefix = "llama_model.base_model.model.model." if peft_prefix else "llama_model.model."
    sd = {
        "llama_proj.weight": r.linear(cfg.proj_hidden, cfg.qformer.hidden),
        "llama_proj.bias": r.bias(cfg.proj_hidden),
        "llama_proj2.weight": r.linear(h, cfg.proj_hidden),
        "llama_proj2.bias": r.bias(h),
        prefix + "final_layernorm.weight": r.norm_weight(h),
    }
    spell = {"plain": "{}.weight", "default": "{}.default.weight"}.get(lora)
    for i in range(p.layers):
        pre = f"{prefix}layers.{i}."
        if spell:
            for module, out in (("query_key_value", 3 * h), ("dense", h)):
                sd[pre + f"self_attn.{module}." + spell.format("lora_A")] = r.linear(rank, h)
                sd[pre + f"self_attn.{module}." + spell.format("lora_B")] = r.normal(out, rank, std=0.5 / rank**0.5)
        sd[pre + "self_attn.q_layernorm.weight"] = r.norm_weight(p.head_dim)
        sd[pre + "self_attn.k_layernorm.weight"] = r.norm_weight(p.head_dim)
        sd[pre + "input_layernorm.weight"] = r.norm_weight(h)
        sd[pre + "post_layernorm.weight"] = r.norm_weight(h)
    sd["Qformer.bert.embeddings.position_ids"] = torch.arange(BERT_POSITIONS).unsqueeze(0)
    arch = arch or ("minigpt_v2" if cfg.stage >= 4 else "minigpt4")
    obj = {
        "model": sd,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "weight_decay": 0.05, "params": list(range(4))}]},
        "config": {"model": {"arch": arch, "image_size": cfg.image_size, "lora_r": rank, "lora_alpha": cfg.lora_alpha}},
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000},
        "epoch": 4,
    }
    torch.save(obj, path)


def write_checkpoints(out_dir: str, preset: str | TinyGPTVConfig = "tiny", seed: int = 0, *,
                      phi_format: str = "fused", phi_file: str = "safetensors", lora: str = "plain",
                      peft_prefix: bool = True, act_scale: float = 1.0, shard_bytes: int = 2 << 30,
                      outliers: int = 0) -> CheckpointPaths:
    """Write all four checkpoint sources for ``preset`` into ``out_dir``; return their paths.

    ``outliers=N`` plants N massive-activation channels in Phi-2's and the ViT's residual streams
    (and high-norm ViT tokens), as real checkpoints have, to measure quantization honestly.
    """
    cfg = make_preset(preset) if isinstance(preset, str) else preset
    os.makedirs(out_dir, exist_ok=True)
    paths = CheckpointPaths(
        phi2=os.path.join(out_dir, "phi-2"),
        vit=os.path.join(out_dir, "eva_vit_g.pth"),
        qformer=os.path.join(out_dir, "blip2_pretrained_flant5xxl.pth"),
        stage=os.path.join(out_dir, f"TinyGPT-V_for_Stage{cfg.stage}.pth"),
    )
    write_phi2(paths.phi2, cfg, seed, fmt=phi_format, file=phi_file, act_scale=act_scale, shard_bytes=shard_bytes,
               outliers=outliers)
    write_vit(paths.vit, cfg, seed + 1, act_scale=act_scale, outliers=outliers)
    write_qformer(paths.qformer, cfg, seed + 2)
    write_stage(paths.stage, cfg, seed + 3, lora=lora, peft_prefix=peft_prefix)
    return paths
