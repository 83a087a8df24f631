"""CheXbert in the released checkpoint format, with a tiny random BERT and a hand-made vocabulary.

The checkpoint is built as the released one is laid out: a BertModel WITH its pooler plus the 14
heads, saved as {"model_state_dict": {"module.bert.*", "module.linear_heads.*"}}, with the
`position_ids` buffer older transformers saved."""

import pytest
import torch
from torch import nn

from unix.errors import UserError
from unix.eval.chexbert import CheXbertLabeler, model_input
from unix.eval.chexpert import CHEXPERT_FINDINGS
from unix.eval.report_metrics import evaluate_reports

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "pleural", "effusion", "small", "left", "heart", "is", "enlarged",
         ".", "large", "right", "impression", ":", "lungs", "are", "clear"]
LONG = "lungs are clear . " * 30 + "\nimpression : large right pleural effusion ."  # the decisive part starts after char 512


class Released(nn.Module):
    """The authors' layout: BertModel with pooler + 13 four-class heads + one two-class head."""

    def __init__(self, cfg):
        from transformers import BertModel

        super().__init__()
        self.bert = BertModel(cfg)  # add_pooling_layer=True, as theirs
        self.linear_heads = nn.ModuleList([nn.Linear(cfg.hidden_size, 4) for _ in range(13)] + [nn.Linear(cfg.hidden_size, 2)])

    def labels(self, enc) -> list[list]:
        cls = self.bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state[:, 0]
        return torch.stack([h(cls).argmax(-1) for h in self.linear_heads], 1).tolist()


def tiny_folder(tmp_path, edit=None):
    from transformers import BertConfig, BertTokenizerFast

    bert = tmp_path / "chexbert" / "bert-base-uncased"
    bert.mkdir(parents=True)
    (bert / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(bert / "vocab.txt")).save_pretrained(str(bert))
    cfg = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    cfg.save_pretrained(str(bert))
    torch.manual_seed(0)
    model = Released(cfg).eval()
    state = {"module." + k: v for k, v in model.state_dict().items()}
    assert "module.bert.pooler.dense.weight" in state
    state["module.bert.embeddings.position_ids"] = torch.arange(cfg.max_position_embeddings)[None]
    if edit:
        edit(state)
    torch.save({"model_state_dict": state, "epoch": 1}, tmp_path / "chexbert" / "chexbert.pth")
    return tmp_path / "chexbert", model


def test_loads_the_released_layout_and_labels(tmp_path):
    folder, model = tiny_folder(tmp_path)
    labeler = CheXbertLabeler(folder)
    texts = ["no pleural effusion .", "heart is enlarged .", "small left effusion ."]
    out = labeler(texts)
    assert len(out) == 3 and all(len(r) == len(CHEXPERT_FINDINGS) for r in out)
    assert all(r[0] in (None, 1) for r in out)  # No Finding has only blank/positive
    # the heads really are the checkpoint's: same classes as the saved model run by hand
    with torch.no_grad():
        by_hand = model.labels(labeler.tokenizer(texts, padding="longest", return_tensors="pt"))
    cardio = [{0: None, 1: 1, 2: 0, 3: -1}[row[1]] for row in by_hand]
    assert [r[CHEXPERT_FINDINGS.index("Cardiomegaly")] for r in out] == cardio


def test_unknown_tensor_is_refused_by_name(tmp_path):
    folder, _ = tiny_folder(tmp_path, edit=lambda s: s.update({"module.bert.encoder.extra.weight": torch.zeros(2)}))
    with pytest.raises(UserError, match="unexpected bert.encoder.extra.weight"):
        CheXbertLabeler(folder)


def test_missing_tensor_is_refused_by_name(tmp_path):
    folder, _ = tiny_folder(tmp_path, edit=lambda s: s.pop("module.linear_heads.3.bias"))
    with pytest.raises(UserError, match="missing linear_heads.3.bias"):
        CheXbertLabeler(folder)


def test_wrong_shape_is_refused(tmp_path):
    folder, _ = tiny_folder(tmp_path, edit=lambda s: s.update({"module.linear_heads.13.bias": torch.zeros(4)}))
    with pytest.raises(UserError, match="linear_heads.13.bias"):
        CheXbertLabeler(folder)


def test_missing_weights_say_where_to_put_them(tmp_path):
    with pytest.raises(UserError, match="chexbert.pth"):
        CheXbertLabeler(tmp_path)


def test_input_clean_up_is_theirs():
    # what the authors' CheXbert.forward handed its tokenizer for "  a\nb  " (run in their code)
    assert model_input("  a\nb  ") == "a b"
    assert model_input("Effusion , small .\n") == "Effusion , small ."  # their regex replaces are no-ops


def test_release_protocol_reads_the_first_512_characters(tmp_path):
    folder, model = tiny_folder(tmp_path)
    labeler = CheXbertLabeler(folder)
    calls = []
    tokenize = labeler.tokenizer

    def recording(texts, **kw):
        calls.append((list(texts), kw))
        return tokenize(texts, **kw)

    labeler.tokenizer = recording
    assert LONG.index("impression") > 512
    release = evaluate_reports({"a": LONG}, {"a": LONG}, labeler)
    assert calls[0][0] == [model_input(LONG[:512])] and "impression" not in calls[0][0][0]
    assert calls[0][1]["padding"] == "longest"
    with torch.no_grad():
        cut = model.labels(tokenize([model_input(LONG[:512])], return_tensors="pt"))[0]
    cardio = CHEXPERT_FINDINGS.index("Cardiomegaly")
    assert labeler([LONG[:512]])[0][cardio] == {0: None, 1: 1, 2: 0, 3: -1}[cut[1]]
    calls.clear()
    full = evaluate_reports({"a": LONG}, {"a": LONG}, labeler, protocol="full-text")
    assert "impression" in calls[0][0][0]
    assert release["protocol"]["label_chars"] == 512 and full["protocol"]["label_chars"] is None


def test_batches_of_16_and_a_wordpiece_cap(tmp_path):
    folder, _ = tiny_folder(tmp_path)
    labeler = CheXbertLabeler(folder)
    sizes = []
    tokenize = labeler.tokenizer
    labeler.tokenizer = lambda texts, **kw: sizes.append(len(texts)) or tokenize(texts, **kw)
    assert len(labeler(["no pleural effusion ."] * 20)) == 20 and sizes == [16, 4]
    # 512 characters of punctuation are 512 wordpieces + [CLS] + [SEP]: more than BERT's positions
    assert len(labeler(["." * 512])) == 1
