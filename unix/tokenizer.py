"""Text <-> token ids, special tokens by name, and the prompt formats UniX uses.

A text segment is `[BOS] tokens [EOS]` with NO chat template (reference section 3.2). The
reference inference feeds a second BOS (the Janus tokenizer adds its own); `double_bos=True`
reproduces that quirk (the release's weights folder asks for it: unix/weights/inference.py), the
default follows training.
Released weights use the Janus tokenizer files in their folder; our own models ship a small
byte-level BPE trained by `train_tokenizer` with the special tokens at the ids of the config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from unix.config import TokenConfig
from unix.errors import UserError

# The paper's report instruction (the reference's default understanding prompt).
REPORT_INSTRUCTION = "As an imaging expert, review this X-ray and share the FINDINGS and IMPRESSION."

# Our own tokenizers: special tokens in this order get ids 0..4 (the tiny preset's TokenConfig).
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<boi>", "<eoi>"]


class Tokenizer:
    def __init__(self, hf, tokens: TokenConfig, double_bos: bool = False):
        self.hf = hf  # a transformers PreTrainedTokenizerFast
        self.tokens = tokens
        self.double_bos = double_bos
        self.special_ids = {tokens.bos, tokens.eos, tokens.boi, tokens.eoi}

    @classmethod
    def from_folder(cls, folder: str | Path, tokens: TokenConfig, double_bos: bool = False) -> "Tokenizer":
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
            raise UserError(f"{folder}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
        try:
            hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception:
            try:
                hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
            except Exception as e:
                raise UserError(f"{folder}: cannot load the tokenizer ({e})") from None
        bos = hf.convert_tokens_to_ids(hf.bos_token) if hf.bos_token else None
        if bos is not None and bos != tokens.bos:
            raise UserError(f"{folder}: tokenizer BOS id {bos} differs from the model's tokens.bos={tokens.bos}")
        return cls(hf, tokens, double_bos)

    def save(self, folder: str | Path) -> None:
        self.hf.save_pretrained(str(folder))

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Plain tokens, no special tokens added."""
        return self.hf.encode(text, add_special_tokens=False)

    def segment(self, text: str) -> list[int]:
        """The ids of one text segment: [BOS] (+[BOS] in compat mode) text [EOS]."""
        bos = [self.tokens.bos] * (2 if self.double_bos else 1)
        return bos + self.encode(text) + [self.tokens.eos]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [i for i in ids if i not in self.special_ids]
        return self.hf.decode(ids, skip_special_tokens=True).strip()


def train_tokenizer(texts: Iterable[str], vocab_size: int, tokens: TokenConfig) -> Tokenizer:
    """A byte-level BPE on `texts`, special tokens at the ids `tokens` expects (0..4)."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    expected = [0, tokens.bos, tokens.eos, tokens.boi, tokens.eoi]
    if expected != list(range(5)):
        raise UserError(f"our tokenizers put special tokens at ids 0..4; the config says {expected[1:]}")
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        additional_special_tokens=["<boi>", "<eoi>"],
    )
    return Tokenizer(hf, tokens)
