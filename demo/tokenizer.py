"""The demo model's own byte-level BPE tokenizer, trained on the generated text.

It is saved the way a Phi-2 folder carries its tokenizer (``tokenizer.json``, ``vocab.json`` +
``merges.txt``, ``special_tokens_map.json``, ``tokenizer_config.json``), so the real loaders
(``engine/tokenizer.py``) read it unchanged. Byte-level means any text still encodes.
"""
from __future__ import annotations

import json
import os

from tinyv.demo.scenes import corpus, make_scenes
from tinyv.engine import prompts
from tinyv.engine.tokenizer import EOS_TOKEN

CORPUS_SCENES = 2000  # enough to see every word of the scene language many times


def answer_text(answer: str) -> str:
    """What the model is trained to produce after ``[/INST]``: the answer, then the stop string."""
    return f" {answer}{prompts.STOP_STRINGS[0]}"


def prompt_texts(stage: int = 4) -> list[str]:
    """The text parts of the runtime prompts around the image (the question left open)."""
    parts = []
    for task, question in (("caption", None), ("vqa", "{question}")):
        parts.extend(prompts.split_prompt(prompts.build_prompt(stage, question, task=task)))
    return parts


def training_corpus(seed: int, stage: int = 4) -> list[str]:
    """Prompt templates, questions and answers (with the stop string) of generated scenes."""
    texts = corpus(make_scenes(CORPUS_SCENES, seed))
    return prompt_texts(stage) + texts + [answer_text(t) for t in texts]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` with ``<|endoftext|>`` (Phi-2's eos) as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, folder: str) -> None:
    """Write the tokenizer files of a Phi-2 folder into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    tok.model.save(folder)  # vocab.json + merges.txt
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CodeGenTokenizer", "add_bos_token": False, "model_max_length": 2048}, f)
