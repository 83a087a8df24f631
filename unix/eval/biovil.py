"""The image-text alignment score of the paper's generation table: BioViL-T (hi-ml-multimodal
0.2.2, `ImageTextInferenceEngine.get_similarity_score_from_raw_data`) on plain torch + transformers.

    score(image, prompt) = <normalise(image projection), normalise(text projection)>   (no temperature)

Weights: the files of the Hugging Face repo microsoft/BiomedVLP-BioViL-T in one folder (default
`weights/biovil-t/`): `biovil_t_image_model_proj_size_128.pt` (image side, `unix.eval.biovil_image`),
`config.json`, `vocab.txt`, `tokenizer_config.json` and `model.safetensors` or `pytorch_model.bin`
(CXR-BERT: a BERT encoder whose [CLS] state goes through a projection head).

Text as hi-ml's TextInferenceEngine prepares it: prompts holding a special token other than [MASK]
are refused, trailing "!", "?" and "." are stripped (nothing else, whitespace included), then BERT
tokens with [CLS]/[SEP], no truncation; longer than the position table is an error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from unix.errors import UserError
from unix.eval.biovil_image import IMAGE_WEIGHTS_FILE, load_image_encoder, load_pixels

log = logging.getLogger(__name__)

TEXT_CONFIG_FILE, VOCAB_FILE, TOKENIZER_CONFIG_FILE = "config.json", "vocab.txt", "tokenizer_config.json"
TEXT_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")  # the HF repo has both; either will do
HF_REPO = "microsoft/BiomedVLP-BioViL-T"
PROJECTION_SIZE = 128  # CXRBertConfig default `projection_size`
HEAD_NORM_EPS = 1e-12  # hi-ml BertProjectionHead LayerNorm
STRIPPED_TAIL = "!?."  # hi-ml TextInput: prompt.rstrip("!?.")
SCORE_DECIMALS = 3  # the authors round each score, and then the mean, to 3 decimals
# BertConfig fields read from the repo's config.json (model_type "cxr-bert" is unknown to transformers)
BERT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
               "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id")
TOKENIZER_FIELDS = ("do_lower_case", "strip_accents", "tokenize_chinese_chars")  # BertTokenizer options in tokenizer_config.json

# Checkpoint prefix -> our prefix (hi-ml CXRBertModel = BertForMaskedLM + cls_projection_head).
TEXT_NAME_TABLE: list[tuple[str, str]] = [
    ("bert.", "bert."),
    ("cls_projection_head.dense_to_hidden.", "head.fc_in."),
    ("cls_projection_head.LayerNorm.", "head.norm."),
    ("cls_projection_head.dense_to_output.", "head.fc_out."),
]
# Tensors the file may carry that scoring never uses: accepted, not required (tied copies of the
# MLM head are dropped from some saves, and only older transformers wrote position_ids).
TEXT_UNUSED_PREFIXES = {
    "cls.predictions.": "the masked-language-model head",
    "bert.embeddings.position_ids": "a constant index buffer, rebuilt at init",
}


class ProjectionHead(nn.Module):
    """hi-ml BertProjectionHead: linear, GELU (erf), LayerNorm, linear."""

    def __init__(self, hidden: int, size: int):
        super().__init__()
        self.fc_in = nn.Linear(hidden, size)
        self.norm = nn.LayerNorm(size, eps=HEAD_NORM_EPS)
        self.fc_out = nn.Linear(size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.norm(F.gelu(self.fc_in(x))))


class CXRBertTextEncoder(nn.Module):
    def __init__(self, bert_config, projection_size: int = PROJECTION_SIZE):
        from transformers import BertModel

        super().__init__()
        self.bert = BertModel(bert_config, add_pooling_layer=False)
        self.head = ProjectionHead(bert_config.hidden_size, projection_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens -> (B, projection_size) projected [CLS] embedding, not normalised."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, D)
        return self.head(hidden[:, 0])


def _text_checkpoint_name(ours: str) -> str:
    for theirs, mine in TEXT_NAME_TABLE:
        if ours.startswith(mine):
            return theirs + ours[len(mine):]
    raise KeyError(f"no checkpoint name for {ours!r}")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: cannot be read ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict")
    return state


def load_text_encoder(folder: Path) -> CXRBertTextEncoder:
    """CXR-BERT from config.json and the weights file, loaded strictly through TEXT_NAME_TABLE."""
    from transformers import BertConfig

    from unix.weights.released import LoadReport

    cfg = _read_json(folder / TEXT_CONFIG_FILE)
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"{folder / TEXT_CONFIG_FILE}: position_embedding_type {cfg['position_embedding_type']!r} is not supported")
    model = CXRBertTextEncoder(BertConfig(**{k: cfg[k] for k in BERT_FIELDS if k in cfg}), cfg.get("projection_size", PROJECTION_SIZE))
    found = [folder / name for name in TEXT_WEIGHTS_FILES if (folder / name).is_file()]
    if not found:
        raise UserError(f"{folder}/: no CXR-BERT weights ({' or '.join(TEXT_WEIGHTS_FILES)} of {HF_REPO})")
    weights = found[0]
    state = _read_tensors(weights)
    expected = {_text_checkpoint_name(k): (k, v) for k, v in model.state_dict().items()}
    report, mapped = LoadReport(), {}
    for name, tensor in state.items():
        if name.startswith(tuple(TEXT_UNUSED_PREFIXES)):
            report.ignored.append(name)
        elif name not in expected:
            report.unexpected.append(name)
        elif tuple(tensor.shape) != tuple(expected[name][1].shape):
            report.wrong_shape.append(f"{name}: file {list(tensor.shape)} vs model {list(expected[name][1].shape)}")
        else:
            mapped[expected[name][0]] = tensor
    report.missing = [name for name in expected if name not in state]
    if not report.ok:
        raise UserError(f"{weights}: does not fit CXR-BERT with {folder / TEXT_CONFIG_FILE}: {report.summary()}")
    model.load_state_dict(mapped, strict=True)
    return model.eval()


def load_tokenizer(folder: Path):
    """BERT word pieces from vocab.txt with the options of tokenizer_config.json (hi-ml's
    CXRBertTokenizer is a plain BertTokenizer; its class name in that file means nothing here)."""
    from transformers import BertTokenizer

    options = _read_json(folder / TOKENIZER_CONFIG_FILE) if (folder / TOKENIZER_CONFIG_FILE).is_file() else {}
    return BertTokenizer(vocab=str(folder / VOCAB_FILE), **{k: options[k] for k in TOKENIZER_FIELDS if k in options})


def model_text(prompt: str, special_tokens: list[str]) -> str:
    """hi-ml's prompt preparation; ValueError where hi-ml raises."""
    found = [t for t in special_tokens if t in prompt]
    if found:
        raise ValueError(f"prompt contains the special token {found[0]}")
    return prompt.rstrip(STRIPPED_TAIL)


def round_like_authors(scores: list[float]) -> tuple[list[float], float]:
    """The authors' reporting: each score round(s, 3) (Python), then numpy's mean rounded to 3."""
    rounded = [round(float(s), SCORE_DECIMALS) for s in scores]
    return rounded, float(np.round(np.mean(rounded), SCORE_DECIMALS))


class AlignmentScorer:
    def __init__(self, image_encoder: nn.Module, text_encoder: CXRBertTextEncoder, tokenizer, device: torch.device):
        self.image_encoder, self.text_encoder = image_encoder.to(device), text_encoder.to(device)
        self.tokenizer, self.device = tokenizer, device
        self.special_tokens = [t for t in tokenizer.all_special_tokens if t != tokenizer.mask_token]
        self.max_tokens = text_encoder.bert.config.max_position_embeddings

    @torch.no_grad()
    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed -> (B, D) unit vectors."""
        return F.normalize(self.image_encoder(pixels.to(self.device)).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """Prepared prompts -> (N, D) unit vectors (padding to the longest changes nothing: masked)."""
        enc = self.tokenizer(prompts, add_special_tokens=True, padding="longest", return_tensors="pt").to(self.device)
        return F.normalize(self.text_encoder(enc["input_ids"], enc["attention_mask"]).float(), dim=-1)

    def _text_table(self, prompts: list[str], batch_size: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Embeddings of each distinct prompt, and an error for each prompt hi-ml would refuse."""
        ready, errors = {}, {}
        for prompt in dict.fromkeys(prompts):
            try:
                text = model_text(prompt, self.special_tokens)
                n = len(self.tokenizer(text, add_special_tokens=True)["input_ids"])
                if n > self.max_tokens:
                    raise ValueError(f"prompt has {n} tokens, more than CXR-BERT's {self.max_tokens}")
                ready[prompt] = text
            except ValueError as e:
                errors[prompt] = str(e)
        table, texts = {}, list(ready.items())
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            for (prompt, _), emb in zip(chunk, self.embed_texts([t for _, t in chunk])):
                table[prompt] = emb
        return table, errors

    def score_all(self, images: list[str | Path], prompts: list[str], batch_size: int = 16) -> tuple[list[float | None], dict[int, str]]:
        """Score each (image, prompt) pair; an unreadable image or a refused prompt gives None and
        an entry {index: reason}, and the rest go on."""
        from tqdm import tqdm

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if batch_size < 1:
            raise UserError("batch size must be at least 1")
        texts, text_errors = self._text_table(prompts, batch_size)
        scores: list[float | None] = [None] * len(images)
        errors = {i: text_errors[p] for i, p in enumerate(prompts) if p in text_errors}
        todo = [i for i in range(len(images)) if i not in errors]
        with tqdm(total=len(todo), desc="alignment", unit="img", leave=False) as bar:
            for start in range(0, len(todo), batch_size):
                kept, pixels = [], []
                for i in todo[start : start + batch_size]:
                    try:
                        pixels.append(load_pixels(images[i]))
                        kept.append(i)
                    except (OSError, ValueError, Image.DecompressionBombError) as e:
                        errors[i] = f"{images[i]}: {'no such file' if isinstance(e, FileNotFoundError) else e}"
                if kept:
                    image_emb = self.embed_images(torch.stack(pixels))  # (b, D)
                    text_emb = torch.stack([texts[prompts[i]] for i in kept])  # (b, D)
                    for i, s in zip(kept, (image_emb * text_emb).sum(-1).tolist()):
                        scores[i] = s
                bar.update(len(todo[start : start + batch_size]))
        return scores, dict(sorted(errors.items()))

    def scores(self, images: list[str | Path], prompts: list[str], batch_size: int = 16) -> list[float]:
        """Unrounded scores, one per pair; a UserError naming the first item that cannot be scored."""
        values, errors = self.score_all(images, prompts, batch_size)
        if errors:
            i, reason = next(iter(errors.items()))
            raise UserError(f"item {i} ({images[i]}): {reason}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
        return values  # type: ignore[return-value]


def missing_files(folder: Path) -> list[str]:
    need = [IMAGE_WEIGHTS_FILE, TEXT_CONFIG_FILE, VOCAB_FILE]
    missing = [name for name in need if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in TEXT_WEIGHTS_FILES):
        missing.append(" or ".join(TEXT_WEIGHTS_FILES))
    return missing


def load_alignment_scorer(folder: str | Path, device: str | torch.device = "auto") -> AlignmentScorer:
    """The BioViL-T scorer from a folder holding the files of the HF repo microsoft/BiomedVLP-BioViL-T."""
    from unix.eval.features import resolve_device

    folder = Path(folder)
    missing = missing_files(folder)
    if missing:
        raise UserError(
            f"{folder}/: BioViL-T weights missing ({', '.join(missing)}); put these files of the Hugging Face repo {HF_REPO} "
            f"there: {IMAGE_WEIGHTS_FILE}, {TEXT_CONFIG_FILE}, {VOCAB_FILE}, {TOKENIZER_CONFIG_FILE}, and {' or '.join(TEXT_WEIGHTS_FILES)}"
        )
    image_encoder, unused = load_image_encoder(folder / IMAGE_WEIGHTS_FILE)
    log.debug("BioViL-T image checkpoint: %d tensors checked but unused (temporal pooler, ImageNet head)", len(unused))
    return AlignmentScorer(image_encoder, load_text_encoder(folder), load_tokenizer(folder), resolve_device(device))
