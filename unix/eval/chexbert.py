"""CheXbert: BERT-base + 14 linear heads on the [CLS] vector, from the released `chexbert.pth`.

    weights/chexbert/chexbert.pth            {"model_state_dict": {"module.bert.*", "module.linear_heads.{i}.*"}}
    weights/chexbert/bert-base-uncased/      config.json + tokenizer files (no weights needed)

Heads follow CheXbert's condition order (below), 4 classes each (blank, positive, negative,
uncertain) except the last, "No Finding", with 2 (blank, positive). Input as the UniX authors give
it (eval/und_metrics/chexbert.py): each report stripped with newlines turned into spaces, batches
of 16 padded to the longest. They also cut reports at 512 characters before this; in `unix` that
cut belongs to the evaluation protocol (`unix.eval.report_metrics`), not to the labeller.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from unix.errors import UserError
from unix.eval.chexpert import CHEXPERT_FINDINGS

HEAD_ORDER = (
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
    "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices", "No Finding",
)
CLASS_TO_LABEL = {0: None, 1: 1, 2: 0, 3: -1}
BATCH_SIZE = 16  # the authors' CheXbert mini-batch
# A safety cap only: 512 characters are almost always far fewer wordpieces, but a run of
# punctuation or rare characters can exceed BERT's 512 positions, where the authors' code
# (no truncation) would crash. Below the cap it changes nothing.
MAX_WORDPIECES = 512
# Tensors of the released checkpoint that this model does not have, on purpose. Anything else
# missing or unexpected is an error.
UNUSED_CHECKPOINT_TENSORS = {
    "bert.pooler.dense.weight": "BERT's pooler: the heads read the [CLS] hidden state, never the pooled output",
    "bert.pooler.dense.bias": "BERT's pooler (as above)",
    "bert.embeddings.position_ids": "a constant index buffer that older transformers saved; rebuilt at init",
}


class CheXbertModel(nn.Module):
    def __init__(self, bert_config):
        from transformers import BertModel

        super().__init__()
        self.bert = BertModel(bert_config, add_pooling_layer=False)
        hidden = bert_config.hidden_size
        self.linear_heads = nn.ModuleList(nn.Linear(hidden, 4) for _ in range(13))
        self.linear_heads.append(nn.Linear(hidden, 2))

    def forward(self, input_ids, attention_mask) -> list[torch.Tensor]:
        cls = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        return [head(cls) for head in self.linear_heads]  # dropout before the heads is a no-op in eval


def model_input(report: str) -> str:
    """The authors' clean-up. Their code also calls str.replace with the regexes "\\s+" and
    "\\s+(?=[\\.,])", which match only those literal characters and so change nothing; the behaviour
    (not the intent) is kept, so spaces before punctuation stay."""
    return report.strip().replace("\n", " ").strip()


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")


def load_state(model: CheXbertModel, ckpt: Path) -> None:
    """Load `chexbert.pth` strictly, apart from UNUSED_CHECKPOINT_TENSORS."""
    try:
        raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{ckpt}: cannot be read with weights_only=True ({str(e).splitlines()[0]})") from None
    state = raw.get("model_state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"{ckpt}: not a CheXbert checkpoint (expected a dict with model_state_dict)")
    state = {k.removeprefix("module."): v for k, v in state.items() if k.removeprefix("module.") not in UNUSED_CHECKPOINT_TENSORS}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise UserError(f"{ckpt}: does not fit CheXbert: missing {_names(missing) or 'none'}; unexpected {_names(unexpected) or 'none'}")
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise UserError(f"{ckpt}: tensor shapes do not fit the BERT config: {_names(wrong)}")
    model.load_state_dict(state, strict=True)


class CheXbertLabeler:
    name = "chexbert"

    def __init__(self, folder: str | Path, device: str = "cpu", batch_size: int = BATCH_SIZE):
        from transformers import AutoTokenizer, BertConfig

        folder = Path(folder)
        ckpt, bert_dir = folder / "chexbert.pth", folder / "bert-base-uncased"
        if not ckpt.is_file():
            raise UserError(f"CheXbert weights missing: put chexbert.pth in {folder}/ (and a bert-base-uncased/ tokenizer folder)")
        if not (bert_dir / "config.json").is_file():
            raise UserError(f"CheXbert needs {bert_dir}/ with config.json and the tokenizer files of bert-base-uncased")
        self.tokenizer = AutoTokenizer.from_pretrained(str(bert_dir), local_files_only=True)
        self.model = CheXbertModel(BertConfig.from_pretrained(str(bert_dir), local_files_only=True))
        load_state(self.model, ckpt)
        self.model.to(device).eval()
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, reports: list[str]) -> list[list]:
        from tqdm import tqdm

        out = []
        for i in tqdm(range(0, len(reports), self.batch_size), desc="CheXbert", unit="batch", disable=None, leave=False):
            batch = [model_input(r) for r in reports[i : i + self.batch_size]]
            enc = self.tokenizer(batch, padding="longest", truncation=True, max_length=MAX_WORDPIECES, return_tensors="pt").to(self.device)
            classes = torch.stack([h.argmax(-1) for h in self.model(enc["input_ids"], enc["attention_mask"])], dim=1)  # (B, 14)
            for row in classes.tolist():
                by_name = {name: CLASS_TO_LABEL[c] for name, c in zip(HEAD_ORDER, row)}
                out.append([by_name[name] for name in CHEXPERT_FINDINGS])
        return out
