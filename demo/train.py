"""Train the built-in demo model on generated scenes and write its checkpoints in the real formats.

    python -m tinyv.demo.train --out /tmp/tinyv-demo --seed 0 --minutes 24   # the shipped model
    tinyv export --preset demo --bits 8 -o bundle --phi2 OUT/phi-2 --vit OUT/eva_vit_g.pth \\
        --qformer OUT/blip2_pretrained_flant5xxl.pth --stage OUT/TinyGPT-V_for_Stage4.pth

Every example is exactly what the runtime feeds the model: ``prompts.build_prompt(stage, ...)``
for a caption or a VQA question, split at ``<ImageHere>``, each text part tokenized on its own
(no BOS), the image's query embeddings between them. The loss is on the answer tokens and the
stop string ``###`` that follows them, which is where the runtime cuts the answer. Each image in a
batch is encoded once and serves one caption and several questions.

Reproducible: the seed fixes the tokenizer, the initial weights and every generated scene; with
a fixed ``--steps`` the same seed gives the same model on the same torch build. ``--minutes`` caps
the time instead: the step count is then planned from the measured speed of the first steps.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

from tinyv.demo.checkpoints import build_training_model, write_checkpoints
from tinyv.demo.scenes import make_scene
from tinyv.demo.tokenizer import answer_text, save_tokenizer, train_tokenizer, training_corpus
from tinyv.engine import prompts
from tinyv.engine.config import TinyGPTVConfig, preset
from tinyv.engine.image import preprocess
from tinyv.engine.tokenizer import Tokenizer

QUESTIONS_PER_IMAGE = 2  # plus one caption per image: captions carry the most signal
WARMUP_STEPS = 100
TIMING_STEPS = 20  # steps measured before planning the rest when --minutes is given


class PromptBuilder:
    """Token ids of the runtime prompts for one tokenizer and stage (cached per question)."""

    def __init__(self, tokenizer: Tokenizer, stage: int):
        self.tok, self.stage = tokenizer, stage
        self.before = tokenizer.encode(prompts.split_prompt(prompts.build_prompt(stage))[0])
        self._after: dict[tuple[str | None, str], list[int]] = {}

    def after(self, question: str | None, task: str) -> list[int]:
        """Ids of the text after the image for a caption (question None) or a VQA question."""
        key = (question, task)
        if key not in self._after:
            # the text before the image is the same for every question (one template)
            after = prompts.split_prompt(prompts.build_prompt(self.stage, question, task=task))[1]
            self._after[key] = self.tok.encode(after)
        return self._after[key]

    def example(self, question: str | None, task: str, answer: str) -> tuple[list[int], list[int]]:
        """(ids after the image, answer ids ending with the stop string)."""
        return self.after(question, task), self.tok.encode(answer_text(answer))


def make_batch(rng: random.Random, builder: PromptBuilder, images: int, size: int):
    """``images`` new scenes: pixels [B, 3, S, S], and per sequence (image index, after ids, answer ids)."""
    pixels, seqs = [], []
    for i in range(images):
        scene = make_scene(rng)
        pixels.append(preprocess(scene.render(size), size))
        seqs.append((i, *builder.example(None, "caption", scene.caption())))
        for qa in rng.sample(scene.questions(), QUESTIONS_PER_IMAGE):
            seqs.append((i, *builder.example(qa.question, "vqa", qa.answer)))
    return torch.cat(pixels), seqs


def encode_images(model, pixels: torch.Tensor) -> torch.Tensor:
    """``TinyGPTV.encode_pixels`` with gradients: [B, Q, phi.hidden]."""
    tokens = model.ln_vision(model.visual(pixels))
    return model.llama_proj2(model.llama_proj(model.qformer(tokens)))


def sequence_loss(model, before: list[int], image_embeds: torch.Tensor, seqs) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens given [before | image | after], right-padded."""
    nb, nq = len(before), image_embeds.shape[1]
    length = nb + nq + max(len(a) + len(ans) for _, a, ans in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    labels = torch.full((len(seqs), length), -100, dtype=torch.long)
    ids[:, :nb] = torch.tensor(before)
    for row, (_, after, answer) in enumerate(seqs):
        text = after + answer
        start = nb + nq
        ids[row, start:start + len(text)] = torch.tensor(text)
        first = start + len(after)  # position of the first answer token
        labels[row, first - 1:first - 1 + len(answer)] = torch.tensor(answer)  # predicted one step earlier
    embeds = model.phi.embed(ids)
    index = torch.tensor([i for i, _, _ in seqs])
    embeds = torch.cat([embeds[:, :nb], image_embeds[index], embeds[:, nb + nq:]], dim=1)
    logits = model.phi.logits(model.phi(embeds))
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    t = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def train(cfg: TinyGPTVConfig, tokenizer: Tokenizer, *, steps: int, seed: int, images_per_step: int = 16,
          lr: float = 2e-3, minutes: float | None = None, log=print):
    """Train a fresh model; returns it (LoRA still separate) and a summary dict."""
    model = build_training_model(cfg, seed)
    model.train()
    builder = PromptBuilder(tokenizer, cfg.stage)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    rng = random.Random(seed)
    total, t0, smooth = steps, time.perf_counter(), None
    step = 0
    while step < total:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, lr)
        pixels, seqs = make_batch(rng, builder, images_per_step, cfg.image_size)
        loss = sequence_loss(model, builder.before, encode_images(model, pixels), seqs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if minutes is not None and step == TIMING_STEPS:
            per_step = (time.perf_counter() - t0) / step
            total = min(steps, max(step, int(minutes * 60 / per_step)))
            log(f"{per_step:.2f} s/step: planning {total} steps for {minutes:g} min")
        if step % 50 == 0 or step == total:
            log(f"step {step}/{total} loss {smooth:.4f} lr {lr_at(step - 1, total, lr):.2e} "
                f"{time.perf_counter() - t0:.0f} s")
    model.eval()
    return model, {"steps": total, "seconds": time.perf_counter() - t0, "final_loss": smooth,
                   "images": total * images_per_step}


def check_round_trip(model, paths, cfg: TinyGPTVConfig, tokenizer: Tokenizer) -> float:
    """Max |logit difference| between the trained model and the one loaded from its checkpoint files."""
    from tinyv.engine.model import TinyGPTV

    loaded = TinyGPTV.from_checkpoints(**paths.as_kwargs(), preset=cfg)
    scene = make_scene(random.Random(12345))
    prompt = prompts.build_prompt(cfg.stage)
    with torch.no_grad():
        image = encode_images(model, preprocess(scene.render(cfg.image_size), cfg.image_size))
        from tinyv.engine.model import build_prompt_embeds

        want = model.phi.logits(model.phi(build_prompt_embeds(model.phi, tokenizer, prompt, image)))[0, -1]
    got = loaded.next_token_logits(scene.render(cfg.image_size), prompt)
    return float((want - got).abs().max())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="Folder for the checkpoint files (created).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500, help="Optimizer steps (default %(default)s).")
    p.add_argument("--minutes", type=float, help="Stop after about this many minutes (fewer steps if slower).")
    p.add_argument("--images-per-step", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--preset", default="demo", help="Model configuration (default %(default)s).")
    # one thread: on a shared 2-core machine a second one waits on a busy core (measured 7x slower)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = preset(args.preset)
    t0 = time.perf_counter()
    tok_dir = os.path.join(args.out, "tokenizer")
    save_tokenizer(train_tokenizer(training_corpus(args.seed, cfg.stage), cfg.phi.vocab_size), tok_dir)
    tokenizer = Tokenizer.from_dir(tok_dir)
    if tokenizer.size > cfg.phi.vocab_size:
        raise SystemExit(f"the tokenizer has {tokenizer.size} entries, more than the model's {cfg.phi.vocab_size}")
    n_params = sum(p.numel() for p in build_training_model(cfg, args.seed).parameters())
    print(f"preset {args.preset}: {n_params / 1e6:.2f} M parameters (LoRA included); tokenizer {tokenizer.size} entries")
    model, summary = train(cfg, tokenizer, steps=args.steps, seed=args.seed, images_per_step=args.images_per_step,
                           lr=args.lr, minutes=args.minutes)
    paths = write_checkpoints(model, tok_dir, os.path.join(args.out, "checkpoints"))
    err = check_round_trip(model, paths, cfg, tokenizer)
    summary.update(seed=args.seed, preset=args.preset, images_per_step=args.images_per_step, lr=args.lr,
                   total_minutes=(time.perf_counter() - t0) / 60, params=n_params)
    with open(os.path.join(args.out, "train.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"trained {summary['steps']} steps ({summary['images']} images) in {summary['seconds'] / 60:.1f} min, "
          f"loss {summary['final_loss']:.4f}; total {summary['total_minutes']:.1f} min "
          f"(--steps {summary['steps']} repeats this run exactly)")
    print(f"checkpoints in {os.path.dirname(paths.vit)}; loaded back, max |logit diff| {err:.2e}")
    if err > 1e-3:
        print("the checkpoint files do not reproduce the trained model", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
