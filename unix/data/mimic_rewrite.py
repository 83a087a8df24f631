"""Optional rewrite of a cleaned report by a tool the user brings (after the rule-based cleaning).

The paper's reports were rewritten by an LLM (reference/unix-compat.md 5.5: no prompt or model was
released). Two hooks, both given the cleaned one-line report and expected to answer with one:
  --rewrite-cmd "<shell command>"  reads the report on stdin, prints the rewritten report
  --rewrite-model <folder>         a local transformers causal LM, greedy, with REWRITE_PROMPT
Whatever comes back must still read "FINDINGS: ..." and hold no "___"; otherwise the study is
dropped (reason rewrite_failed) rather than kept half-rewritten.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from unix.data.mimic_clean import BLANK, one_line
from unix.errors import UserError

REWRITE_TIMEOUT_S = 300  # one report; a local LLM on CPU can be slow, a hung command must not be
REWRITE_PROMPT = (
    "Rewrite this chest X-ray report so that it describes only what can be seen on this one image. "
    "Remove comparisons with earlier examinations, dates, times and remarks about who was informed. "
    "Keep every finding with its side, size and severity; do not add findings. Answer with the "
    "report only, on one line, as \"FINDINGS: ... IMPRESSION: ...\" (without IMPRESSION if the "
    "report has none).\n\nReport: {report}\n\nRewritten report:"
)
MAX_NEW_TOKENS = 1024


class RewriteError(Exception):
    """The rewrite failed for this report (the study is dropped and listed)."""


def check_rewritten(text: str) -> str:
    """The rewritten report on one line; refused unless it starts "FINDINGS: " and has no blank."""
    text = one_line(text)
    if not re.match(r"FINDINGS:\s*\S", text):
        raise RewriteError(f"the rewrite does not start with 'FINDINGS: ': {text[:80]!r}")
    if BLANK in text:
        raise RewriteError(f"the rewrite holds '{BLANK}': {text[:80]!r}")
    return text


class CommandRewriter:
    def __init__(self, command: str):
        self.command = command

    def __call__(self, report: str) -> str:
        try:
            done = subprocess.run(self.command, shell=True, input=report, capture_output=True, text=True,
                                  timeout=REWRITE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RewriteError(f"--rewrite-cmd took over {REWRITE_TIMEOUT_S} s") from None
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or [""])[0]
            raise RewriteError(f"--rewrite-cmd exited with {done.returncode}: {first[:120]}")
        return check_rewritten(done.stdout)


class ModelRewriter:
    """A local causal LM (any transformers AutoModelForCausalLM folder with its tokenizer); loaded on
    first use, so each worker process loads its own copy. With a chat template the prompt is the
    user turn; without one it is plain text."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.model = self.tokenizer = None

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.model = AutoModelForCausalLM.from_pretrained(self.folder).eval()

    def prompt_ids(self, report: str) -> list[int]:
        text = REWRITE_PROMPT.format(report=report)
        if getattr(self.tokenizer, "chat_template", None):
            return list(self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                           tokenize=True, return_dict=False))
        return self.tokenizer(text)["input_ids"]

    def __call__(self, report: str) -> str:
        import torch

        if self.model is None:
            self._load()
        ids = self.prompt_ids(report)
        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      do_sample=False, max_new_tokens=min(MAX_NEW_TOKENS, 2 * len(ids) + 64),
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        return check_rewritten(self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))


def make_rewriter(command: str | None, model: str | None):
    """The configured hook, or None."""
    if command and model:
        raise UserError("--rewrite-cmd and --rewrite-model exclude each other")
    if model:
        if not (Path(model) / "config.json").is_file():
            raise UserError(f"--rewrite-model {model}: no config.json (a transformers model folder is expected)")
        return ModelRewriter(model)
    return CommandRewriter(command) if command else None
