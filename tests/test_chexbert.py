"""CheXbert in the released checkpoint format, with a tiny random BERT and a hand-made vocabulary."""

import pytest
import torch

from unix.errors import UserError
from unix.eval.chexbert import CheXbertLabeler, CheXbertModel
from unix.eval.chexpert import CHEXPERT_FINDINGS

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "pleural", "effusion", "small", "left", "heart", "is", "enlarged", "."]


def tiny_folder(tmp_path, drop=None):
    from transformers import BertConfig, BertTokenizerFast

    bert = tmp_path / "chexbert" / "bert-base-uncased"
    bert.mkdir(parents=True)
    (bert / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(bert / "vocab.txt")).save_pretrained(str(bert))
    cfg = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    cfg.save_pretrained(str(bert))
    torch.manual_seed(0)
    model = CheXbertModel(cfg)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    if drop:
        del state[drop]
    torch.save({"model_state_dict": state, "epoch": 1}, tmp_path / "chexbert" / "chexbert.pth")
    return tmp_path / "chexbert", model


def test_loads_and_labels(tmp_path):
    folder, model = tiny_folder(tmp_path)
    labeler = CheXbertLabeler(folder)
    out = labeler(["no pleural effusion .", "heart is enlarged .", "small left effusion ."])
    assert len(out) == 3 and all(len(r) == len(CHEXPERT_FINDINGS) for r in out)
    assert all(v in (None, 0, 1, -1) for r in out for v in r)
    assert all(r[0] in (None, 1) for r in out)  # No Finding has only blank/positive
    # the heads really are the checkpoint's: same argmax as the model run by hand
    enc = labeler.tokenizer(["heart is enlarged ."], return_tensors="pt")
    with torch.no_grad():
        heads = model.eval()(enc["input_ids"], enc["attention_mask"])
    cardio = {0: None, 1: 1, 2: 0, 3: -1}[int(heads[1].argmax())]
    assert out[1][CHEXPERT_FINDINGS.index("Cardiomegaly")] == cardio


def test_mismatched_checkpoint_names_the_tensor(tmp_path):
    folder, _ = tiny_folder(tmp_path, drop="module.linear_heads.3.bias")
    with pytest.raises(UserError, match="linear_heads.3.bias"):
        CheXbertLabeler(folder)


def test_missing_weights_say_where_to_put_them(tmp_path):
    with pytest.raises(UserError, match="chexbert.pth"):
        CheXbertLabeler(tmp_path)
