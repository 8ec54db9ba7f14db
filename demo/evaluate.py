"""Accuracy of a model on held-out generated scenes (``tinyv eval``).

For each scene: the caption against the reference caption (exact match and token F1), and its six
questions asked four ways: in wordings training used and in held-out wordings
(``questions.py``), each through the ``[vqa]`` template (``tinyv ask``) and as a free question in
the chat template (what ``tinyv chat``, ``caption -q`` and the API send). Works on a bundle (the
engine that users run) and on the fp32 torch model built from checkpoint files (the reference),
through one small interface: ``open_bundle(path)`` / ``open_checkpoints(...)`` return a ``Model``
whose ``session(image)`` answers ``caption()``, ``ask(question)`` and ``chat(question)`` greedily,
the image encoded once per scene.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from tinyv.demo.questions import SPLITS
from tinyv.demo.scenes import QUESTION_TYPES, make_scenes

# result key -> (question wordings, how asked); "vqa" is the [vqa] template on trained wordings
ASKED = {"vqa": ("trained", "ask"), "chat": ("trained", "chat"),
         "held_out_vqa": ("held_out", "ask"), "held_out_chat": ("held_out", "chat")}
COLUMNS = {"vqa": "VQA", "chat": "chat", "held_out_vqa": "held-out VQA", "held_out_chat": "held-out chat"}

HELD_OUT_SEED = 1  # training draws its scenes from --seed (0 for the shipped model)
DEFAULT_IMAGES = 500
MAX_NEW_TOKENS = 40  # the longest reference caption is 27 tokens


@dataclass
class Model:
    """A named model: ``session(image)`` -> an object with ``caption()`` and ``ask(question)``."""

    label: str
    session: Callable


def open_bundle(path: str | None = None, threads: int | None = None) -> Model:
    """A bundle through ``tinyv.Engine`` (``None``: the shipped demo bundle); no disk cache."""
    import tinyv

    engine = tinyv.load(path, threads=threads, cache_dir=None)
    q, v = engine.manifest["quantization"], engine.manifest["vision"]["precision"]
    name = "built-in demo bundle" if path is None else path
    return Model(f"{name} ({q['bits']}-bit g{q['group_size']}, vision {v})", lambda image: _EngineSession(engine, image))


def open_checkpoints(phi2, vit, qformer, stage, preset: str = "demo", image_size: int | None = None) -> Model:
    """The fp32 torch reference built from the four checkpoint files."""
    from tinyv.export.reference import TinyGPTV

    model = TinyGPTV.from_checkpoints(phi2=phi2, vit=vit, qformer=qformer, stage=stage, image_size=image_size,
                                      preset=preset)
    return Model("fp32 torch (checkpoints)", lambda image: _TorchSession(model, image))


class _EngineSession:
    def __init__(self, engine, image):
        self.session = engine.session(image)

    def caption(self) -> str:
        return self.session.caption(max_new_tokens=MAX_NEW_TOKENS)

    def ask(self, question: str) -> str:
        return self.session.ask(question, max_new_tokens=MAX_NEW_TOKENS)

    def chat(self, question: str) -> str:
        return "".join(s.text for s in self.session.stream(question, max_new_tokens=MAX_NEW_TOKENS)).strip()


class _TorchSession:
    def __init__(self, model, image):
        self.model = model
        self.embeds = model.encode_image(image)

    def _answer(self, question: str | None, task: str) -> str:
        steps = self.model.stream(self.embeds, question, task=task, max_new_tokens=MAX_NEW_TOKENS)
        return "".join(s.text for s in steps).strip()

    def caption(self) -> str:
        return self._answer(None, "caption")

    def ask(self, question: str) -> str:
        return self._answer(question, "vqa")

    def chat(self, question: str) -> str:
        return self._answer(question, "caption")  # a question with the caption task: the chat template


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 of the two texts' word multisets."""
    p, r = normalize(prediction).split(), normalize(reference).split()
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def evaluate(model: Model, images: int = DEFAULT_IMAGES, seed: int = HELD_OUT_SEED, progress=None) -> dict:
    """Scores of ``model`` on ``images`` scenes drawn from ``seed`` (fractions in [0, 1]).

    ``vqa``, ``chat``, ``held_out_vqa`` and ``held_out_chat`` are the share of questions answered
    exactly, each with its ``..._by_type``; ``progress(done, total)`` is called after each scene.
    """
    t0 = time.perf_counter()
    exact = f1 = 0.0
    right = {key: Counter() for key in ASKED}
    asked = Counter()
    failures, wrong_answers = [], []
    scenes = make_scenes(images, seed)
    for n, scene in enumerate(scenes, 1):
        session = model.session(scene.render())
        text, ref = session.caption(), scene.caption()
        exact += normalize(text) == normalize(ref)
        f1 += token_f1(text, ref)
        if normalize(text) != normalize(ref) and len(failures) < 5:
            failures.append({"reference": ref, "caption": text})
        wordings = {split: scene.questions(split) for split in SPLITS}
        for qa in wordings["trained"]:
            asked[qa.type] += 1
        for key, (split, how) in ASKED.items():
            for qa in wordings[split]:
                answer = getattr(session, how)(qa.question)
                ok = normalize(answer) == normalize(qa.answer)
                right[key][qa.type] += ok
                if not ok and len(wrong_answers) < 10:
                    wrong_answers.append({"asked": key, "question": qa.question, "answer": qa.answer, "got": answer})
        if progress:
            progress(n, len(scenes))
    total = max(1, sum(asked.values()))
    result = {
        "model": model.label,
        "images": len(scenes),
        "seed": seed,
        "caption_exact": exact / len(scenes),
        "caption_token_f1": f1 / len(scenes),
    }
    for key in ASKED:
        result[key] = sum(right[key].values()) / total
        result[f"{key}_by_type"] = {t: right[key][t] / asked[t] for t in QUESTION_TYPES if asked[t]}
    result.update(questions=sum(asked.values()), caption_failures=failures, wrong_answers=wrong_answers,
                  seconds=time.perf_counter() - t0)
    return result


def format_table(results: list[dict]) -> str:
    """A Markdown table, one row per model, percentages (by type: the ``[vqa]`` template, trained wordings)."""
    cols = ["caption EM", "token F1"] + list(COLUMNS.values()) + [f"VQA {t}" for t in QUESTION_TYPES]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in results:
        figures = [r["caption_exact"], r["caption_token_f1"]] + [r.get(key) for key in COLUMNS]
        figures += [r["vqa_by_type"].get(t) for t in QUESTION_TYPES]
        cells = ["—" if x is None else f"{100 * x:.1f}" for x in figures]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_results(path: str) -> tuple[str, str]:
    """(caption line, Markdown table) from the JSON ``tinyv eval --json`` wrote to ``path``."""
    import json

    from tinyv.errors import TinyVError

    bad = f"{path} is not the output of `tinyv eval --json`"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        results = data["results"]
        figures = ("caption_exact", "caption_token_f1", "vqa")
        if not results or not all(isinstance(r["model"], str) and isinstance(r["vqa_by_type"], dict)
                                  and all(isinstance(r[k], (int, float)) for k in figures) for r in results):
            raise ValueError("no results")
        n = int(data["images"])
        caption = f"{n} held-out scene{'s' * (n != 1)} (seed {int(data['seed'])}), greedy; percent."
        return caption, format_table(results)
    except OSError as e:
        raise TinyVError(f"cannot read {path}: {e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise TinyVError(f"{bad} ({e!r}); make it with `tinyv eval -b BUNDLE --json > results.json`") from None
