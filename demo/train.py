"""Train the built-in demo model on generated scenes and write its checkpoints in the real formats.

    python -m tinyv.demo.train --out /tmp/tinyv-demo --seed 0   # the shipped model (defaults)
    tinyv export --preset demo --bits 8 -o bundle --phi2 OUT/phi-2 --vit OUT/eva_vit_g.pth \\
        --qformer OUT/blip2_pretrained_flant5xxl.pth --stage OUT/TinyGPT-V_for_Stage4.pth

Every example is exactly what the runtime feeds the model: ``prompts.build_prompt(stage, ...)``
for a caption, a ``[vqa]`` question (``tinyv ask``) or a free question in the chat template
(``tinyv chat``; half the questions each, worded from ``questions.py``'s trained frames), split at
``<ImageHere>``, each text part tokenized on its own (no BOS), the image's query embeddings
between them. The loss is on the answer tokens and the stop string ``###`` that follows them,
which is where the runtime cuts the answer. Each image in a batch is encoded once and serves its
caption and all its questions.

Two phases, as the real TinyGPT-V (whose ViT and Q-Former come pre-trained and stay frozen):

1. *Vision* (``--vision-steps``): the ViT and Q-Former alone learn the scenes through
   training-only linear heads (``VisionProbe``): every grid cell's colour, kind and size from that
   cell's ViT token; from Q-Former query ``k`` the shape in slot ``k`` and ``k`` itself, so each of
   the first five queries becomes an object token carrying what is in its slot and where; the shape
   count from all queries. No LLM runs, so these steps are cheap.
2. *Joint* (``--steps``): the ViT and Q-Former stay fixed (``--no-freeze-vision`` trains them on,
   with the probe loss weighted by ``--aux-weight``); the projections, the LLM and its LoRA learn
   the answers.

Why: from random weights the vision side gets no useful gradient through the LLM's loss (a blind
vision side gives the LLM nothing to attend to, so it never learns to attend), and a Q-Former
trained on along with a still-random LLM is pulled off what it learned (its probe loss went from
0.0005 to 0.8 in 150 steps). The heads are not part of ``TinyGPTV``; no checkpoint file holds them.

Reproducible: the seed fixes the tokenizer, the initial weights and every generated scene; with
a fixed ``--steps`` the same seed gives the same model on the same torch build. ``--minutes`` caps
the time instead: the joint step count is then planned from the measured speed of the first ones.
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
from tinyv.demo.scenes import COLOURS, KINDS, SIZES, SLOT_ORDER, SLOTS, Scene, make_scene
from tinyv.demo.tokenizer import answer_text, save_tokenizer, train_tokenizer, training_corpus
from tinyv.engine import prompts
from tinyv.engine.config import TinyGPTVConfig, preset
from tinyv.engine.image import preprocess
from tinyv.engine.tokenizer import Tokenizer

QUESTIONS_PER_IMAGE = 6  # plus one caption per image; a scene has 6 questions, so all of them
# share of questions put in the [vqa] template (`tinyv ask`); the rest go into the chat template as
# they are, which is what `tinyv chat`, `caption -q` and the API's free questions send
VQA_SHARE = 0.5
# batches of similar length per step: less padding (a step ~6 % faster than one batch, 2 threads)
LENGTH_GROUPS = 2
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


def make_batch(rng: random.Random, builder: PromptBuilder, images: int, size: int, with_text: bool = True,
               questions: int = QUESTIONS_PER_IMAGE):
    """``images`` new scenes: pixels [B, 3, S, S], per sequence (image index, after ids, answer ids), and
    the scenes' labels for the auxiliary vision loss (``scene_labels`` stacked over the batch).
    Each image gives one caption and ``questions`` of its question/answer pairs (all when it has
    fewer), each in the ``[vqa]`` template or the chat template (``VQA_SHARE``). Without
    ``with_text`` the sequence list is empty (the vision-only steps)."""
    pixels, seqs, labels = [], [], []
    for i in range(images):
        scene = make_scene(rng)
        pixels.append(preprocess(scene.render(size), size))
        labels.append(scene_labels(scene))
        if not with_text:
            continue
        seqs.append((i, *builder.example(None, "caption", scene.caption())))
        qas = scene.questions()
        for qa in rng.sample(qas, min(questions, len(qas))):
            task = "vqa" if rng.random() < VQA_SHARE else "caption"  # "caption" with a question: the chat template
            seqs.append((i, *builder.example(qa.question, task, qa.answer)))
    return torch.cat(pixels), seqs, {k: torch.stack([x[k] for x in labels]) for k in labels[0]}


class VisionProbe(torch.nn.Module):
    """Training-only linear heads that pre-train the vision side on the scenes' attributes.

    ``vit``: one head shared by the ViT's patch tokens, each predicting its own grid cell's colour,
    kind and size (0: empty). ``query``: one head shared by the first ``len(SLOTS)`` Q-Former query
    outputs, query ``k`` predicting the colour, kind and size of the shape in slot ``k`` (slot order)
    *and* ``k`` itself: each of these queries becomes an object token that carries what is in its slot
    and where that slot is in its own content, which the LLM can find by attending to "red circle"
    and read "left" from. ``count``: the shape count from all query outputs together.
    Not part of ``TinyGPTV``: ``write_checkpoints`` never sees these weights.
    """

    def __init__(self, cfg: TinyGPTVConfig):
        super().__init__()
        if cfg.qformer.num_queries < len(SLOTS):
            raise ValueError(f"the demo's vision loss needs at least {len(SLOTS)} Q-Former queries "
                             f"(one per slot), the config has {cfg.qformer.num_queries}")
        self.sizes = [len(c) for c in ATTRIBUTES.values()]
        per_cell = sum(self.sizes)
        self.vit = torch.nn.Linear(cfg.vision.width, per_cell)
        self.query = torch.nn.Linear(cfg.qformer.hidden, per_cell + len(SLOTS))
        self.count = torch.nn.Linear(cfg.qformer.num_queries * cfg.qformer.hidden, MAX_SHAPES + 1)
        # grid cell (row-major) of each slot, in slot order
        self.register_buffer("slot_cells", torch.tensor([SLOTS[s][1] * GRID + SLOTS[s][0] for s in SLOT_ORDER]),
                             persistent=False)

    def _cells_loss(self, logits: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of per-cell logits [B, C, per_cell] against every attribute ([B, C] labels)."""
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
        n = len(SLOTS)
        out = self.query(queries[:, :n])  # [B, n, per_cell + n]
        slot_labels = {name: labels[name][:, self.slot_cells] for name in ATTRIBUTES}
        which = torch.arange(n).expand(queries.shape[0], n)
        q_loss = (self._cells_loss(out[..., :-n], slot_labels) + F.cross_entropy(out[..., -n:].flatten(0, 1),
                                                                                   which.flatten())
                  + F.cross_entropy(self.count(queries.flatten(1)), labels["count"])) / 3
        return vit_loss, q_loss


def encode_vision(model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ViT tokens and the Q-Former outputs of ``pixels``, with gradients (the probe reads both)."""
    vit_tokens = model.visual(pixels)
    return vit_tokens, model.qformer(model.ln_vision(vit_tokens))


def encode_images(model, pixels: torch.Tensor, intermediates: bool = False):
    """``TinyGPTV.encode_pixels`` with gradients: [B, Q, phi.hidden]; with ``intermediates``, also the
    ViT tokens and the Q-Former outputs (for the auxiliary loss)."""
    vit_tokens, queries = encode_vision(model, pixels)
    embeds = model.llama_proj2(model.llama_proj(queries))
    return (embeds, vit_tokens, queries) if intermediates else embeds


def sequence_loss(model, before: list[int], image_embeds: torch.Tensor, seqs,
                  groups: int = LENGTH_GROUPS) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens given [before | image | after], right-padded.

    The sequences run in ``groups`` batches of similar length: a short chat question is not padded
    to the longest caption (the mean is over all answer tokens, as in one batch)."""
    ordered = sorted(seqs, key=lambda s: len(s[1]) + len(s[2]))
    size = math.ceil(len(ordered) / max(1, groups))
    total, count = 0.0, 0
    for k in range(0, len(ordered), size):
        loss_sum, n = _padded_loss(model, before, image_embeds, ordered[k:k + size])
        total, count = total + loss_sum, count + n
    return total / count


def _padded_loss(model, before: list[int], image_embeds: torch.Tensor, seqs) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy, answer tokens) of ``seqs`` padded to the longest of them."""
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
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    t = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def train(cfg: TinyGPTVConfig, tokenizer: Tokenizer, *, steps: int, seed: int, images_per_step: int = 4,
          lr: float = 2e-3, minutes: float | None = None, aux_weight: float = 1.0, vision_steps: int = 0,
          vision_images: int = 64, freeze_vision: bool = False, questions_per_image: int = QUESTIONS_PER_IMAGE,
          log=print):
    """Train a fresh model; returns it (LoRA still separate) and a summary dict.

    First ``vision_steps`` steps of the vision side alone on the ``VisionProbe`` losses
    (``vision_images`` scenes a step: no LLM runs, so they are cheap), then ``steps`` steps of the
    whole model on the answer tokens' cross-entropy plus ``aux_weight`` times the probe losses. The
    logged ``loss`` is the answer tokens' alone. ``minutes`` caps the whole run: the joint steps are
    planned from the time left and the measured speed of the first ones.
    """
    model = build_training_model(cfg, seed)
    model.train()
    probe = VisionProbe(cfg) if aux_weight > 0 or vision_steps > 0 else None
    builder = PromptBuilder(tokenizer, cfg.stage)
    params = [p for p in model.parameters() if p.requires_grad]
    params += list(probe.parameters()) if probe is not None else []
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    rng = random.Random(seed)
    t0, smooth_aux = time.perf_counter(), None

    def smoothed(old, new):
        return new if old is None else tuple(0.95 * a + 0.05 * b for a, b in zip(old, new))

    def update(objective: torch.Tensor, step: int, total: int) -> None:
        """One optimizer step on ``objective`` at the schedule's learning rate for ``step`` of ``total``."""
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, lr)
        opt.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    for step in range(vision_steps):
        pixels, _, labels = make_batch(rng, builder, vision_images, cfg.image_size, with_text=False)
        vit_loss, q_loss = probe(*encode_vision(model, pixels), labels)
        update(vit_loss + q_loss, step, vision_steps)
        smooth_aux = smoothed(smooth_aux, (vit_loss.item(), q_loss.item()))
        if (step + 1) % 100 == 0 or step + 1 == vision_steps:
            log(f"vision step {step + 1}/{vision_steps} aux vit {smooth_aux[0]:.4f} qformer {smooth_aux[1]:.4f} "
                f"{time.perf_counter() - t0:.0f} s")
    vision_seconds = time.perf_counter() - t0
    if freeze_vision:  # as the real TinyGPT-V: ViT and Q-Former fixed, the projections and the LLM learn
        for module in (model.visual, model.ln_vision, model.qformer):
            module.requires_grad_(False)
    total, t1, smooth = steps, time.perf_counter(), None
    step = 0
    while step < total:
        pixels, seqs, labels = make_batch(rng, builder, images_per_step, cfg.image_size, questions=questions_per_image)
        embeds, vit_tokens, queries = encode_images(model, pixels, intermediates=True)
        loss = sequence_loss(model, builder.before, embeds, seqs)
        objective = loss
        if aux_weight > 0 and not freeze_vision:
            vit_loss, q_loss = probe(vit_tokens, queries, labels)
            objective = loss + aux_weight * (vit_loss + q_loss)
            smooth_aux = smoothed(smooth_aux, (vit_loss.item(), q_loss.item()))
        update(objective, step, total)
        step += 1
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if minutes is not None and step == TIMING_STEPS:
            per_step = (time.perf_counter() - t1) / step
            left = minutes * 60 - (time.perf_counter() - t0)
            total = min(steps, max(step, step + int(left / per_step)))
            log(f"{per_step:.2f} s/step: planning {total} steps for {minutes:g} min in all")
        if step % 50 == 0 or step == total:
            aux_text = "" if smooth_aux is None else f" aux vit {smooth_aux[0]:.4f} qformer {smooth_aux[1]:.4f}"
            log(f"step {step}/{total} loss {smooth:.4f}{aux_text} lr {lr_at(step - 1, total, lr):.2e} "
                f"{time.perf_counter() - t0:.0f} s")
    model.eval()
    return model, {"steps": total, "vision_steps": vision_steps, "freeze_vision": freeze_vision,
                   "questions_per_image": questions_per_image, "vision_images": vision_images,
                   "vision_seconds": vision_seconds, "seconds": time.perf_counter() - t0, "final_loss": smooth,
                   "images": total * images_per_step, "aux_weight": aux_weight,
                   "final_aux_loss": None if smooth_aux is None else {"vit": smooth_aux[0], "qformer": smooth_aux[1]}}


def check_round_trip(model, paths, cfg: TinyGPTVConfig, tokenizer: Tokenizer) -> float:
    """Max |logit difference| between the trained model and the one loaded from its checkpoint files."""
    from tinyv.export.reference import TinyGPTV

    loaded = TinyGPTV.from_checkpoints(**paths.as_kwargs(), preset=cfg)
    scene = make_scene(random.Random(12345))
    prompt = prompts.build_prompt(cfg.stage)
    with torch.no_grad():
        image = encode_images(model, preprocess(scene.render(cfg.image_size), cfg.image_size))
        from tinyv.engine.generate import build_prompt_embeds

        want = model.phi.logits(model.phi(build_prompt_embeds(model.phi, tokenizer, prompt, image)))[0, -1]
    got = loaded.next_token_logits(scene.render(cfg.image_size), prompt)
    return float((want - got).abs().max())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="Folder for the checkpoint files (created).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=10000, help="Joint optimizer steps (default %(default)s).")
    p.add_argument("--minutes", type=float, help="Stop after about this many minutes (fewer steps if slower).")
    p.add_argument("--images-per-step", type=int, default=4)
    p.add_argument("--questions-per-image", type=int, default=QUESTIONS_PER_IMAGE,
                   help="Questions asked of each image beside its caption (default %(default)s: all).")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--preset", default="demo", help="Model configuration (default %(default)s).")
    p.add_argument("--vision-steps", type=int, default=1000,
                   help="Steps of the vision side alone on the auxiliary loss before the joint steps (default %(default)s).")
    p.add_argument("--vision-images", type=int, default=64, help="Scenes per vision-only step (default %(default)s).")
    p.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=True,
                   help="Keep the ViT and Q-Former fixed after the vision-only steps, as TinyGPT-V's training does "
                        "(default: on).")
    p.add_argument("--aux-weight", type=float, default=1.0,
                   help="Weight of the training-only vision loss on the scenes' attributes (0: off; default %(default)s).")
    # two threads run a step 1.8x faster on an idle 2-core machine; on a busy one use 1 (a second
    # thread waiting on a busy core was measured 7x slower)
    p.add_argument("--threads", type=int, default=2, help="Torch threads (default %(default)s).")
    args = p.parse_args(argv)
    for name in ("steps", "vision_steps", "questions_per_image"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be 0 or more")
    for name in ("images_per_step", "vision_images", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be 1 or more")
    if args.freeze_vision and args.vision_steps == 0:
        p.error("--freeze-vision with --vision-steps 0 would freeze an untrained, blind vision side: "
                "give --vision-steps (default 1000) or pass --no-freeze-vision")
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
                           lr=args.lr, minutes=args.minutes, aux_weight=args.aux_weight,
                           vision_steps=args.vision_steps, vision_images=args.vision_images,
                           freeze_vision=args.freeze_vision, questions_per_image=args.questions_per_image)
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
