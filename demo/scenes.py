"""Generated scenes of coloured shapes, with a reference caption and question/answer pairs.

The built-in demo model is trained and evaluated on these. The language is small and regular on
purpose, so a model of a few million parameters can learn it exactly:

    scene = make_scene(random.Random(0))
    scene.render()          # PIL image, IMAGE_SIZE x IMAGE_SIZE
    scene.caption()         # "a large red circle left of a small blue square"
    scene.questions()       # [QA(question="what colour is the circle?", answer="red", type="colour"), ...]
    scene.questions("held_out")  # the same six, in wordings training never sees (questions.py)

A scene holds 1-3 shapes in distinct slots of a plus-shaped layout (left, top, centre, bottom,
right); no two shapes share both colour and kind, so every question names one shape. Everything is
a pure function of the ``random.Random`` given, so a seed fixes the scenes, images and texts.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

IMAGE_SIZE = 84  # the demo preset's input size (no resizing); one 28 px ViT patch per grid cell
BACKGROUND = (245, 245, 245)
COLOURS = {
    "red": (220, 40, 40),
    "yellow": (235, 200, 30),
    "green": (40, 165, 60),
    "blue": (40, 80, 225),
    "purple": (145, 60, 185),
}
KINDS = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.22, "large": 0.40}  # half-width of the shape as a fraction of a cell
# slot -> (column, row) in a 3x3 grid; the slot order (left to right, then top to bottom) is the
# order shapes are described in
SLOTS = {"left": (0, 1), "top": (1, 0), "centre": (1, 1), "bottom": (1, 2), "right": (2, 1)}
SLOT_ORDER = tuple(sorted(SLOTS, key=SLOTS.get))  # left, top, centre, bottom, right
WHERE = {"left": "on the left", "top": "at the top", "centre": "in the centre", "bottom": "at the bottom",
         "right": "on the right"}
NUMBERS = ("zero", "one", "two", "three")
QUESTION_TYPES = ("colour", "count", "exist", "position")
JITTER = 2  # pixels a shape's centre may move from its slot's centre


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    slot: str
    dx: int = 0  # jitter of the centre, pixels
    dy: int = 0

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.kind}"

    @property
    def name(self) -> str:
        """Colour and kind: unique within a scene."""
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    type: str  # one of QUESTION_TYPES


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # in slot order
    seed: int  # picks which questions are asked

    def render(self, size: int = IMAGE_SIZE):
        """The scene as an RGB PIL image of ``size`` x ``size`` pixels."""
        from PIL import Image, ImageDraw

        img = Image.new("RGB", (size, size), BACKGROUND)
        draw = ImageDraw.Draw(img)
        cell = size / 3
        for s in self.shapes:
            col, row = SLOTS[s.slot]
            cx, cy = (col + 0.5) * cell + s.dx, (row + 0.5) * cell + s.dy
            _draw(draw, s.kind, cx, cy, SIZES[s.size] * cell, COLOURS[s.colour])
        return img

    def caption(self) -> str:
        """The one reference caption: where a lone shape is, how two relate, where each of three is."""
        s = self.shapes
        if len(s) == 2:
            return f"{s[0].phrase} {relation(s[0], s[1])} {s[1].phrase}"
        parts = [f"{x.phrase} {WHERE[x.slot]}" for x in s]
        return parts[0] if len(parts) == 1 else f"{parts[0]}, {parts[1]} and {parts[2]}"

    def questions(self, split: str = "trained") -> list[QA]:
        """Six question/answer pairs about the scene, worded from ``split``'s frames (``questions.ask``)."""
        from tinyv.demo.questions import ask

        return ask(self, split)


def relation(a: Shape, b: Shape) -> str:
    """How ``a`` (earlier in slot order) relates to ``b``: ``left of`` if their columns differ, else ``above``."""
    return "left of" if SLOTS[a.slot][0] < SLOTS[b.slot][0] else "above"


def make_scene(rng: random.Random) -> Scene:
    """A random scene: 1-3 shapes in distinct slots, no two with the same colour and kind."""
    n = rng.choice((1, 2, 3))
    slots = sorted(rng.sample(list(SLOTS), n), key=_slot_order)
    shapes, names = [], set()
    for slot in slots:
        while True:
            kind, colour = rng.choice(KINDS), rng.choice(list(COLOURS))
            if f"{colour} {kind}" not in names:
                break
        names.add(f"{colour} {kind}")
        size = rng.choice(list(SIZES))
        shapes.append(Shape(kind, colour, size, slot, rng.randint(-JITTER, JITTER), rng.randint(-JITTER, JITTER)))
    return Scene(tuple(shapes), rng.getrandbits(32))


def make_scenes(n: int, seed: int) -> list[Scene]:
    """``n`` scenes from ``seed`` (the same seed always gives the same scenes)."""
    rng = random.Random(seed)
    return [make_scene(rng) for _ in range(n)]


def _slot_order(slot: str) -> tuple[int, int]:
    return SLOTS[slot]


def _draw(draw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    """One filled shape of half-width ``r`` centred at (cx, cy)."""
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


def corpus(scenes) -> list[str]:
    """Every caption, question and answer of ``scenes`` (text for the tokenizer)."""
    out = []
    for s in scenes:
        out.append(s.caption())
        for qa in s.questions():
            out += [qa.question, qa.answer]
    return out


# The pictures in the repository's examples/ folder (file name -> scene); ``write_examples`` makes them.
EXAMPLES = {
    "red_circle_blue_square": Scene((Shape("circle", "red", "large", "left"),
                                     Shape("square", "blue", "small", "right")), seed=0),
    "green_triangle_yellow_circle": Scene((Shape("circle", "yellow", "small", "top"),
                                           Shape("triangle", "green", "large", "bottom")), seed=0),
    "three_shapes": Scene((Shape("diamond", "purple", "large", "left"), Shape("square", "red", "small", "centre"),
                           Shape("circle", "green", "large", "right")), seed=0),
}


def write_examples(folder: str) -> None:
    """Save every example scene as ``folder/<name>.png``."""
    import os

    for name, scene in EXAMPLES.items():
        scene.render().save(os.path.join(folder, f"{name}.png"))
