"""Train the built-in demo model on generated scenes and write its checkpoints in the real formats.

    python -m tinyv.demo.train --out /tmp/tinyv-demo --seed 0 --minutes 20   # the shipped model (1500 steps)
    tinyv export --preset demo --bits 8 -o bundle --phi2 OUT/phi-2 --vit OUT/eva_vit_g.pth \\
        --qformer OUT/blip2_pretrained_flant5xxl.pth --stage OUT/TinyGPT-V_for_Stage4.pth

Every example is exactly what the runtime feeds the model: ``prompts.build_prompt(stage, ...)``
for a caption or a VQA question, split at ``<ImageHere>``, each text part tokenized on its own
(no BOS), the image's query embeddings between them. The loss is on the answer tokens and the
stop string ``###`` that follows them, which is where the runtime cuts the answer. Each image in a
batch is encoded once and serves one caption and several questions.

The vision side starts from random weights, and through the LLM's loss alone it gets no useful
gradient (a blind vision side gives the LLM nothing to attend to, so the LLM never learns to attend
to it). The real TinyGPT-V starts from a pre-trained ViT and Q-Former; here an auxiliary loss
pre-trains them on the scenes while the LLM trains: linear heads read every grid cell's colour, kind
and size from the ViT token of that cell, and every slot's colour, kind and size and the shape count
from the Q-Former's query outputs (``VisionProbe``; weight ``--aux-weight``, 0 turns it off). The
heads exist only during training: they are not part of ``TinyGPTV`` and no checkpoint file holds them.

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
from tinyv.demo.scenes import COLOURS, KINDS, SIZES, SLOTS, Scene, make_scene
from tinyv.demo.tokenizer import answer_text, save_tokenizer, train_tokenizer, training_corpus
from tinyv.engine import prompts
from tinyv.engine.config import TinyGPTVConfig, preset
from tinyv.engine.image import preprocess
from tinyv.engine.tokenizer import Tokenizer

QUESTIONS_PER_IMAGE = 2  # plus one caption per image: captions carry the most signal
WARMUP_STEPS = 100
TIMING_STEPS = 20  # steps measured before planning the rest when --minutes is given
GRID = 3  # the scenes' 3x3 grid: one demo ViT patch per cell
# per-cell attribute classes, index 0 meaning "no shape there"
ATTRIBUTES = {"colour": ("",) + tuple(COLOURS), "kind": ("",) + KINDS, "size": ("",) + tuple(SIZES)}
MAX_SHAPES = 3


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


def scene_labels(scene: Scene) -> dict[str, torch.Tensor]:
    """Targets of the auxiliary vision loss: per grid cell (row-major, 9) each attribute's class, and the count."""
    cells = {name: [0] * GRID * GRID for name in ATTRIBUTES}
    for shape in scene.shapes:
        col, row = SLOTS[shape.slot]
        for name, classes in ATTRIBUTES.items():
            cells[name][row * GRID + col] = classes.index(getattr(shape, name))
    labels = {name: torch.tensor(v) for name, v in cells.items()}
    labels["count"] = torch.tensor(len(scene.shapes))
    return labels


def make_batch(rng: random.Random, builder: PromptBuilder, images: int, size: int):
    """``images`` new scenes: pixels [B, 3, S, S], per sequence (image index, after ids, answer ids), and
    the scenes' labels for the auxiliary vision loss (``scene_labels`` stacked over the batch)."""
    pixels, seqs, labels = [], [], []
    for i in range(images):
        scene = make_scene(rng)
        pixels.append(preprocess(scene.render(size), size))
        labels.append(scene_labels(scene))
        seqs.append((i, *builder.example(None, "caption", scene.caption())))
        for qa in rng.sample(scene.questions(), QUESTIONS_PER_IMAGE):
            seqs.append((i, *builder.example(qa.question, "vqa", qa.answer)))
    return torch.cat(pixels), seqs, {k: torch.stack([x[k] for x in labels]) for k in labels[0]}


class VisionProbe(torch.nn.Module):
    """Training-only linear heads that pre-train the vision side on the scenes' attributes.

    ``vit``: one head shared by the ViT's patch tokens, each predicting its own grid cell's colour,
    kind and size (0: empty). ``qformer``: one head on the concatenated query outputs predicting
    every cell's attributes and the shape count, so the queries must carry what the LLM needs.
    Not part of ``TinyGPTV``: ``write_checkpoints`` never sees these weights.
    """

    def __init__(self, cfg: TinyGPTVConfig):
        super().__init__()
        self.sizes = [len(c) for c in ATTRIBUTES.values()]
        per_cell = sum(self.sizes)
        self.vit = torch.nn.Linear(cfg.vision.width, per_cell)
        self.qformer = torch.nn.Linear(cfg.qformer.num_queries * cfg.qformer.hidden,
                                       GRID * GRID * per_cell + MAX_SHAPES + 1)

    def _cells_loss(self, logits: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of per-cell logits [B, 9, per_cell] against every attribute."""
        parts = logits.split(self.sizes, dim=-1)
        return sum(F.cross_entropy(part.flatten(0, 1), labels[name].flatten())
                   for part, name in zip(parts, ATTRIBUTES)) / len(ATTRIBUTES)

    def forward(self, vit_tokens: torch.Tensor, queries: torch.Tensor, labels: dict[str, torch.Tensor]):
        """(ViT-head loss, Q-Former-head loss); ``vit_tokens`` [B, 1 + g*g, W] (CLS first), ``queries`` [B, Q, H].

        The patch tokens are average-pooled to the 3x3 grid of cells: the identity for the demo
        preset (28 px patches, one per cell), a pooling for other presets used in tests.
        """
        patches = vit_tokens[:, 1:]
        g = math.isqrt(patches.shape[1])
        cells = F.adaptive_avg_pool2d(patches.transpose(1, 2).unflatten(2, (g, g)), GRID).flatten(2).transpose(1, 2)
        vit_loss = self._cells_loss(self.vit(cells), labels)
        out = self.qformer(queries.flatten(1))
        cells = out[:, :-(MAX_SHAPES + 1)].unflatten(1, (GRID * GRID, -1))
        q_loss = (self._cells_loss(cells, labels) + F.cross_entropy(out[:, -(MAX_SHAPES + 1):], labels["count"])) / 2
        return vit_loss, q_loss


def encode_images(model, pixels: torch.Tensor, intermediates: bool = False):
    """``TinyGPTV.encode_pixels`` with gradients: [B, Q, phi.hidden]; with ``intermediates``, also the
    ViT tokens and the Q-Former outputs (for the auxiliary loss)."""
    vit_tokens = model.visual(pixels)
    queries = model.qformer(model.ln_vision(vit_tokens))
    embeds = model.llama_proj2(model.llama_proj(queries))
    return (embeds, vit_tokens, queries) if intermediates else embeds


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
          lr: float = 2e-3, minutes: float | None = None, aux_weight: float = 1.0, log=print):
    """Train a fresh model; returns it (LoRA still separate) and a summary dict.

    The loss is the answer tokens' cross-entropy plus ``aux_weight`` times the ``VisionProbe``
    losses (ViT and Q-Former heads); the logged ``loss`` is the answer tokens' alone.
    """
    model = build_training_model(cfg, seed)
    model.train()
    probe = VisionProbe(cfg) if aux_weight > 0 else None
    builder = PromptBuilder(tokenizer, cfg.stage)
    params = [p for p in model.parameters() if p.requires_grad]
    params += list(probe.parameters()) if probe is not None else []
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    rng = random.Random(seed)
    total, t0, smooth, smooth_aux = steps, time.perf_counter(), None, None
    step = 0
    while step < total:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, lr)
        pixels, seqs, labels = make_batch(rng, builder, images_per_step, cfg.image_size)
        embeds, vit_tokens, queries = encode_images(model, pixels, intermediates=True)
        loss = sequence_loss(model, builder.before, embeds, seqs)
        objective = loss
        if probe is not None:
            vit_loss, q_loss = probe(vit_tokens, queries, labels)
            objective = loss + aux_weight * (vit_loss + q_loss)
            aux = (vit_loss.item(), q_loss.item())
            smooth_aux = aux if smooth_aux is None else tuple(0.95 * a + 0.05 * b for a, b in zip(smooth_aux, aux))
        opt.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if minutes is not None and step == TIMING_STEPS:
            per_step = (time.perf_counter() - t0) / step
            total = min(steps, max(step, int(minutes * 60 / per_step)))
            log(f"{per_step:.2f} s/step: planning {total} steps for {minutes:g} min")
        if step % 50 == 0 or step == total:
            aux_text = "" if smooth_aux is None else f" aux vit {smooth_aux[0]:.4f} qformer {smooth_aux[1]:.4f}"
            log(f"step {step}/{total} loss {smooth:.4f}{aux_text} lr {lr_at(step - 1, total, lr):.2e} "
                f"{time.perf_counter() - t0:.0f} s")
    model.eval()
    return model, {"steps": total, "seconds": time.perf_counter() - t0, "final_loss": smooth,
                   "images": total * images_per_step, "aux_weight": aux_weight,
                   "final_aux_loss": None if smooth_aux is None else {"vit": smooth_aux[0], "qformer": smooth_aux[1]}}


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
    p.add_argument("--aux-weight", type=float, default=1.0,
                   help="Weight of the training-only vision loss on the scenes' attributes (0: off; default %(default)s).")
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
                           lr=args.lr, minutes=args.minutes, aux_weight=args.aux_weight)
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
