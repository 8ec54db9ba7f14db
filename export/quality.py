"""Quality of a quantized LLM against fp32: KL of next-token distributions and greedy agreement,
and the export's gate on them.

The fp32 reference is streamed: one decoder layer at a time is materialized from the checkpoint
files (LoRA merged), so a full-size export never holds an fp32 copy of Phi-2, and it runs once
over the whole probe sequence, so each layer is read once.
"""
from __future__ import annotations

import torch
from torch import nn

from tinyv.engine.config import PhiConfig
from tinyv.engine.phi import DecoderLayer, KVCache, PhiForCausalLM, Rotary
from tinyv.errors import TinyVError


class StreamedPhi(PhiForCausalLM):
    """fp32 Phi-2 whose decoder layers are read from a ``PhiWeights`` each time they run."""

    def __init__(self, cfg: PhiConfig, weights):
        nn.Module.__init__(self)
        self.cfg, self.weights = cfg, weights
        self.work = DecoderLayer(cfg)
        self.embed_tokens = nn.Embedding.from_pretrained(weights.get("phi.embed_tokens.weight").float(), freeze=True)
        with torch.device("meta"):  # filled by assignment: no second vocab x hidden fp32 matrix
            self.final_layernorm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
            self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size)
        for mod, name in ((self.final_layernorm, "final_layernorm"), (self.lm_head, "lm_head")):
            mod.load_state_dict({k: weights.get(f"phi.{name}.{k}").float() for k in ("weight", "bias")}, assign=True)
        self.rotary = Rotary(cfg)
        self.eval()

    def layer(self, i: int) -> DecoderLayer:
        self.work.load_state_dict(self.weights.layer(i))
        return self.work


@torch.inference_mode()
def compare_greedy(ref: PhiForCausalLM, quant: PhiForCausalLM, ref_prompt: torch.Tensor, quant_prompt: torch.Tensor,
                   steps: int = 32) -> dict:
    """Greedy agreement and KL(fp32 ‖ quantized) over ``steps`` next-token predictions.

    The quantized model decodes ``steps`` greedy tokens (with its KV cache); then both models
    read that same sequence in one pass (teacher forcing) and their next-token distributions are
    compared at every one of those positions. One pass keeps the fp32 reference cheap when it is
    streamed layer by layer from the checkpoint files (a token-by-token fp32 decode would read
    every layer once per token). Agreement is the fraction of positions where the fp32 argmax is
    the token the quantized model chose.
    """
    L = quant_prompt.shape[1]
    cache = KVCache(quant.cfg, L + steps)
    logits = quant.logits(quant(quant_prompt.float(), 0, cache)[0, -1])
    tokens = []
    for s in range(steps):
        tokens.append(int(torch.argmax(logits)))
        if s == steps - 1:
            break
        logits = quant.logits(quant(quant.embed(torch.tensor([[tokens[-1]]])), L + s, cache)[0, -1])
    prefix = torch.tensor([tokens[:-1]])
    q_logits = quant.logits(quant(torch.cat([quant_prompt.float(), quant.embed(prefix)], dim=1))[0, L - 1:])
    r_logits = ref.logits(ref(torch.cat([ref_prompt.float(), ref.embed(prefix)], dim=1))[0, L - 1:])
    r = r_logits.float().log_softmax(-1)
    q = q_logits.float().log_softmax(-1)
    kl = (r.exp() * (r - q)).sum(-1)
    agree = (r.argmax(-1) == torch.tensor(tokens)).float()
    return {
        "steps": steps,
        "method": "teacher-forced on the quantized model's greedy continuation",
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "token_agreement": float(agree.mean()),
        "first_disagreement": int(torch.nonzero(agree == 0)[0]) if bool((agree == 0).any()) else None,
        "greedy_tokens": tokens,
    }


def check_gate(quality: dict, min_sqnr: float | None, min_agreement: float | None, max_kl: float | None) -> None:
    """Raise TinyVError naming every threshold ``quality`` misses (None: not checked)."""
    fails = []
    if min_sqnr is not None and quality["sqnr_db"]["min"] < min_sqnr:
        w = quality["sqnr_db"]["worst"][0]
        fails.append(f"layer SQNR {w['db']:.1f} dB at {w['layer']} < {min_sqnr} dB")
    if min_agreement is not None and quality["token_agreement"] < min_agreement:
        fails.append(f"greedy agreement {quality['token_agreement']:.1%} < {min_agreement:.1%}")
    if max_kl is not None and quality["kl_mean"] > max_kl:
        fails.append(f"mean KL {quality['kl_mean']:.4f} > {max_kl}")
    if fails:
        raise TinyVError("quality gate failed: " + "; ".join(fails) + " (no bundle written; try more bits "
                         "or a smaller --group-size)")
