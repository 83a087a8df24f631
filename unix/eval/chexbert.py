"""CheXbert: BERT-base + 14 linear heads on the [CLS] vector, from the released `chexbert.pth`.

    weights/chexbert/chexbert.pth            {"model_state_dict": {"module.bert.*", "module.linear_heads.{i}.*"}}
    weights/chexbert/bert-base-uncased/      config.json + tokenizer files (no weights needed)

Heads follow CheXbert's condition order (below), 4 classes each (blank, positive, negative,
uncertain) except the last, "No Finding", with 2 (blank, positive). Reports are truncated at 512
tokens (the reference cuts at 512 characters, which drops text BERT could read).
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
        return [head(cls) for head in self.linear_heads]


class CheXbertLabeler:
    name = "chexbert"

    def __init__(self, folder: str | Path, device: str = "cpu", batch_size: int = 16):
        from transformers import AutoTokenizer, BertConfig

        folder = Path(folder)
        ckpt, bert_dir = folder / "chexbert.pth", folder / "bert-base-uncased"
        if not ckpt.is_file():
            raise UserError(f"CheXbert weights missing: put chexbert.pth in {folder}/ (and a bert-base-uncased/ tokenizer folder)")
        if not (bert_dir / "config.json").is_file():
            raise UserError(f"CheXbert needs {bert_dir}/ with config.json and the tokenizer files of bert-base-uncased")
        self.tokenizer = AutoTokenizer.from_pretrained(str(bert_dir), local_files_only=True)
        self.model = CheXbertModel(BertConfig.from_pretrained(str(bert_dir), local_files_only=True))
        try:
            raw = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{ckpt}: cannot be read with weights_only=True ({str(e).splitlines()[0]})") from None
        state = raw.get("model_state_dict", raw) if isinstance(raw, dict) else {}
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state.pop("bert.embeddings.position_ids", None)  # a buffer older transformers saved
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(f"{ckpt}: does not fit CheXbert: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.model.to(device).eval()
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, reports: list[str]) -> list[list]:
        out = []
        for i in range(0, len(reports), self.batch_size):
            enc = self.tokenizer(reports[i : i + self.batch_size], padding=True, truncation=True, max_length=512, return_tensors="pt").to(self.device)
            classes = torch.stack([h.argmax(-1) for h in self.model(enc["input_ids"], enc["attention_mask"])], dim=1)  # (B, 14)
            for row in classes.tolist():
                by_name = {name: CLASS_TO_LABEL[c] for name, c in zip(HEAD_ORDER, row)}
                out.append([by_name[name] for name in CHEXPERT_FINDINGS])
        return out
