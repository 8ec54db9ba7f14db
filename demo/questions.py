"""What a person asks about a scene, in the several wordings people use.

Every scene gets six questions: the colour of one shape, how many of one kind, how many shapes,
whether a present and an absent shape are there, and where one shape is. Each is put into words
with a frame ("what is the colour of {ref}?") and a way of naming the shape ("the diamond", "the
large purple diamond", "the diamond on the left"; any that names exactly one shape), with a
capital first letter or no question mark now and then, as people type. Each type's frames are
split (``FRAMES[type]``): training sees only the ``trained`` ones; the ``held_out`` ones are asked
only by ``tinyv eval``, so it can tell a model that learned the scene language from one that
learned a list of sentences. The held-out
frames recombine words training has seen ("image" is in the caption request), so a miss is the
model's, not the tokenizer's.

What is asked is a pure function of the scene's seed; how it is worded is a pure function of the
seed and the split, so a scene's trained and held-out questions ask the same things.
"""
from __future__ import annotations

import random

from tinyv.demo.scenes import COLOURS, KINDS, NUMBERS, QA, WHERE

SPLITS = ("trained", "held_out")

# question type (QUESTION_TYPES) -> {split: frames}; {ref} names one shape ("the ..."), {things} is a plural, {a_ref} "a ..."
FRAMES = {
    "colour": {
        "trained": ("what colour is {ref}?", "what color is {ref}?", "which colour is {ref}?",
                    "what is the colour of {ref}?", "what colour is {ref} in the picture?"),
        "held_out": ("which color is {ref}?", "what is the color of {ref}?", "what colour is {ref} in the image?"),
    },
    "count": {
        "trained": ("how many {things} are there?", "how many {things} do you see?", "count the {things}",
                    "how many {things} are in the picture?"),
        "held_out": ("how many {things} are in the image?", "how many {things} can you see?",
                     "count the {things} in the picture"),
    },
    "exist": {
        "trained": ("is there {a_ref}?", "do you see {a_ref}?", "can you see {a_ref}?",
                    "is there {a_ref} in the picture?"),
        "held_out": ("is there {a_ref} in the image?", "do you see {a_ref} in the picture?",
                     "can you see {a_ref} in the picture?"),
    },
    "position": {
        "trained": ("where is {ref}?", "where is {ref} in the picture?", "where do you see {ref}?",
                    "in which part of the picture is {ref}?"),
        "held_out": ("where is {ref} in the image?", "where can you see {ref}?", "in which part of the image is {ref}?"),
    },
}
CAPITALIZED = 0.25  # share of questions typed with a capital first letter
NO_QUESTION_MARK = 0.2  # share typed without the final "?"


def ask(scene, split: str = "trained") -> list[QA]:
    """The scene's six questions, worded from ``split``'s frames (see the module's docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    what, how = random.Random(scene.seed), random.Random(f"{scene.seed}:{split}")
    shapes = scene.shapes
    kinds = [x.kind for x in shapes]

    def word(question_type: str, answer: str, **fields) -> QA:
        text = how.choice(FRAMES[question_type][split]).format(**fields)
        if how.random() < CAPITALIZED:
            text = text[0].upper() + text[1:]
        if text.endswith("?") and how.random() < NO_QUESTION_MARK:
            text = text[:-1]
        return QA(text, answer, question_type)

    qas = []
    x = what.choice(shapes)
    qas.append(word("colour", x.colour, ref=how.choice(references(scene, x, leave_out="colour"))))
    kind = what.choice(kinds if what.random() < 0.5 else KINDS)  # not mostly "zero"
    qas.append(word("count", NUMBERS[kinds.count(kind)], things=kind + "s"))
    qas.append(word("count", NUMBERS[len(shapes)], things="shapes"))
    present = what.choice(shapes)
    by_kind = what.random() < 0.4  # "is there a circle?" rather than "is there a red circle?"
    qas.append(word("exist", "yes", a_ref="a " + (present.kind if by_kind else present.name)))
    names = {s.name for s in shapes}
    absent_kinds = [k for k in KINDS if k not in kinds]
    if by_kind and absent_kinds:
        absent = what.choice(absent_kinds)
    else:
        absent = what.choice([f"{c} {k}" for c in COLOURS for k in KINDS if f"{c} {k}" not in names])
    qas.append(word("exist", "no", a_ref="a " + absent))
    x = what.choice(shapes)
    qas.append(word("position", x.slot, ref=how.choice(references(scene, x, leave_out="slot"))))
    return qas


def references(scene, shape, leave_out: str) -> list[str]:
    """Every way ("the ...") to name ``shape`` that fits no other shape in ``scene``, without its
    ``leave_out`` attribute (``colour`` when its colour is asked, ``slot`` when its place is)."""
    others = [s for s in scene.shapes if s is not shape]

    def unique(*attrs: str) -> bool:
        return not any(all(getattr(s, a) == getattr(shape, a) for a in attrs) for s in others)

    refs = []
    if unique("kind"):
        refs.append(shape.kind)
    if unique("size", "kind"):
        refs.append(f"{shape.size} {shape.kind}")
    if leave_out != "colour":
        refs += [shape.name, f"{shape.size} {shape.name}"]
    if leave_out != "slot":
        refs.append(f"{shape.kind} {WHERE[shape.slot]}")
    return ["the " + r for r in refs]
