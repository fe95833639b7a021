"""Tokenizers for prompts, and the check that a loaded one is real.

Tiny and random-weight models have no tokenizer files: `WordTokenizer` maps words to ids from a
vocabulary list (known words) or by a stable hash (any word), entirely in memory.
"""

import re
import zlib

import torch

from ..errors import RunError

PAD, BOS, EOS, UNK = 0, 1, 2, 3
_SPECIAL = 4


class WordTokenizer:
    """Lower-cased words -> ids, padded to `max_length` as CLIP's tokenizer pads."""

    def __init__(self, vocab_size: int, max_length: int, vocabulary: list[str] | None = None):
        if vocab_size <= _SPECIAL:
            raise ValueError(f"vocab_size must exceed {_SPECIAL} special tokens, got {vocab_size}")
        self.vocab_size, self.max_length = vocab_size, max_length
        words = list(dict.fromkeys(vocabulary or []))
        if len(words) > vocab_size - _SPECIAL:
            raise ValueError(f"{len(words)} words do not fit a vocabulary of {vocab_size}")
        self.ids = {word: _SPECIAL + i for i, word in enumerate(words)}

    def _id(self, word: str) -> int:
        if word in self.ids:
            return self.ids[word]
        if self.ids:  # a closed vocabulary: unknown words are UNK
            return UNK
        return _SPECIAL + zlib.crc32(word.encode()) % (self.vocab_size - _SPECIAL)

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        rows = []
        for prompt in prompts:
            words = re.findall(r"[\w']+", prompt.lower())[: self.max_length - 2]
            ids = [BOS, *(self._id(w) for w in words), EOS]
            rows.append(ids + [PAD] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


def check_tokenizer(tokenizer, text_encoder_vocab: int, where: str) -> None:
    """A tokenizer loaded from a folder without its files can come back with a vocabulary of 2
    instead of failing; refuse anything that cannot address the text encoder's vocabulary."""
    size = len(tokenizer)
    if size < min(1000, text_encoder_vocab // 2):
        raise RunError(
            f"{where}: tokenizer has a vocabulary of {size} for a text encoder of {text_encoder_vocab}; "
            "its vocab/merges files are missing or broken"
        )
