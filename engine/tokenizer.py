"""Phi-2's tokenizer (CodeGen / GPT-2 byte-level BPE) through the ``tokenizers`` library.

No transformers at run time: ``tokenizer.json`` is read directly, or built from
``vocab.json`` + ``merges.txt`` when a folder has only those.
"""
from __future__ import annotations

import json
import os

from tinyv.engine.prompts import check_text
from tinyv.errors import TinyVError

EOS_TOKEN = "<|endoftext|>"


class Tokenizer:
    def __init__(self, tok, eos_id: int):
        self._tok = tok
        self.eos_id = eos_id
        self.size = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, folder: str) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = os.path.join(folder, "tokenizer.json")
        try:
            if os.path.exists(path):
                tok = HFTokenizer.from_file(path)
            elif os.path.exists(os.path.join(folder, "vocab.json")):
                tok = _from_vocab_merges(folder)
            else:
                raise TinyVError(
                    f"{folder} has no tokenizer.json (or vocab.json + merges.txt): "
                    "the Phi-2 folder must include its tokenizer files"
                )
        except TinyVError:
            raise
        except Exception as e:  # tokenizers raises plain Exceptions for bad files
            raise TinyVError(f"cannot read the tokenizer in {folder}: {e}") from None
        eos_id = tok.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise TinyVError(f"the tokenizer in {folder} has no {EOS_TOKEN} token: is it Phi-2's?")
        return cls(tok, eos_id)

    @classmethod
    def from_file(cls, path: str, eos_id: int | None = None) -> "Tokenizer":
        """A bundle's ``tokenizer.json``."""
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(path)
        except Exception as e:
            raise TinyVError(f"cannot read the tokenizer {path}: {e}") from None
        if eos_id is None:
            eos_id = tok.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise TinyVError(f"the tokenizer {path} has no {EOS_TOKEN} token")
        return cls(tok, eos_id)

    def encode(self, text: str) -> list[int]:
        """Token ids with no BOS or other special tokens added (SPEC §1.9)."""
        return self._tok.encode(check_text(text, "the text"), add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Text of ``ids``; ids with no entry (Phi-2's 50295..51199) decode to nothing (SPEC §1.15)."""
        known = [i for i in ids if 0 <= i < self.size and self._tok.id_to_token(i) is not None]
        return self._tok.decode(known, skip_special_tokens=True)


def _from_vocab_merges(folder: str):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f if line.strip() and not line.startswith("#version")]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    added = os.path.join(folder, "added_tokens.json")
    if os.path.exists(added):
        from tokenizers import AddedToken

        with open(added, encoding="utf-8") as f:
            extra = sorted(json.load(f).items(), key=lambda kv: kv[1])
        tok.add_tokens([AddedToken(t, normalized=False) for t, _ in extra])
    return tok


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, at a cost per token that does not grow
    with the answer.

    Byte-level BPE can split one UTF-8 character over several tokens, so each new token is decoded
    together with a short window of the tokens before it (the bytes of a character still being
    completed), and a trailing incomplete character is held back until it completes. ``text`` is
    everything emitted so far: equal to decoding all the ids, except a held-back incomplete tail.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix_at = 0  # window start: ids before it are final text
        self._read_at = 0  # ids before it have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        window = self.ids[self._prefix_at:]
        seen = decode(window[: self._read_at - self._prefix_at])
        new = decode(window)
        if new.endswith("\ufffd") or len(new) <= len(seen):
            return ""  # an incomplete character (or nothing yet): wait for the next token
        delta = new[len(seen):]
        self._prefix_at, self._read_at = self._read_at, len(self.ids)
        self.text += delta
        return delta
