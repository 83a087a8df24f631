"""RadGraph F1 (the paper's report metric next to CheXbert F1), at the "partial" reward level.

RadGraph annotates a report as entities (token span + label such as ANAT-DP or OBS-DP) and relations
between them. The partial reward compares the two reports' entity sets, where an entity is its
(tokens, label) and, when it takes part in a relation, a has-relation flag; per report it gives
precision, recall and F1, and the corpus number is their mean. A report with no entities on either
side scores 0 (as radgraph 0.1.18 does).

The annotator is the `radgraph` package (pip install radgraph==0.1.18, the version the reference
evaluation pins) with its model archive placed by the user, since nothing is downloaded at run time:

    weights/radgraph/radgraph.tar.gz        (StanfordAIMI/RRG_scorers), or its extracted contents in
    weights/radgraph/radgraph/              (config.json, weights.th, vocabulary/)

and the BERT it names available to transformers offline (its Hugging Face cache, or HF_HOME).
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np

from unix.errors import UserError

Annotation = dict  # {"entities": {id: {"tokens": str, "label": str, "relations": [[type, id], ...]}}}
MODEL_FILES = ("config.json", "weights.th")


def entity_set(annotation: Annotation) -> set[tuple]:
    """The partial-level entity set: (tokens, label), plus True when the entity has relations."""
    return {(e["tokens"], e["label"], True) if e.get("relations") else (e["tokens"], e["label"])
            for e in annotation.get("entities", {}).values()}


def partial_reward(hyp: Annotation, ref: Annotation) -> tuple[float, float, float]:
    """(precision, recall, F1) of one generated report's entities against its reference's."""
    h, r = entity_set(hyp), entity_set(ref)
    if not h or not r:
        return 0.0, 0.0, 0.0
    hit = len(h & r)
    p, rc = hit / len(h), hit / len(r)
    return p, rc, (2 * p * rc / (p + rc) if p + rc else 0.0)


def radgraph_f1(hyps: list[Annotation], refs: list[Annotation]) -> dict:
    """Mean per-report precision, recall and F1, under the reference's key names."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} generated annotations but {len(refs)} references")
    scores = np.array([partial_reward(h, r) for h, r in zip(hyps, refs)]).reshape(-1, 3)
    p, r, f = scores.mean(0) if len(scores) else (0.0, 0.0, 0.0)
    return {"precision-radgraph": float(p), "recall-radgraph": float(r), "f1-radgraph": float(f)}


def model_folder(root: str | Path) -> Path:
    """weights/radgraph -> the folder holding the extracted model (extracting the archive once)."""
    root = Path(root)
    folder = root / "radgraph"
    if all((folder / f).is_file() for f in MODEL_FILES):
        return folder
    archive = root / "radgraph.tar.gz"
    if not archive.is_file():
        raise UserError(f"{root}: no RadGraph model (put radgraph.tar.gz or its extracted radgraph/ folder there)")
    tmp = root / ".radgraph.extracting"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted extraction
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(tmp, filter="data")
    inner = next((p.parent for p in tmp.rglob("config.json") if (p.parent / "weights.th").is_file()), None)
    if inner is None:
        raise UserError(f"{archive}: no config.json + weights.th inside")
    inner.rename(folder)  # atomic: a half-extracted folder is never taken for a model
    shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_annotator(root: str | Path, device: str = "cpu") -> Callable[[list[str]], list[Annotation]]:
    """reports -> RadGraph annotations, with the `radgraph` package and the user's model files."""
    # The BERT tokenizer must come from a local cache: huggingface_hub and transformers read these
    # when first imported, so they must be set before radgraph imports them (`unix` sets them at
    # start-up; this covers library use, unless the hub was imported before).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from radgraph import RadGraph
    except ImportError as e:
        raise UserError("RadGraph F1 needs the radgraph package: pip install radgraph==0.1.18") from e
    folder = model_folder(root)
    cuda = int(device.split(":")[1]) if device.startswith("cuda:") else (0 if device == "cuda" else -1)
    try:
        model = RadGraph(model_type="radgraph", model_cache_dir=str(folder.parent), cuda=cuda)
    except Exception as e:  # radgraph wraps whatever failed (often: its BERT is not in the local cache)
        raise UserError(f"{folder}: RadGraph did not load ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        "the BERT its config.json names must be in the local Hugging Face cache (HF_HOME)") from None

    def annotate(reports: list[str]) -> list[Annotation]:
        out = model(list(reports))
        return [out.get(str(i), {"entities": {}}) for i in range(len(reports))]

    return annotate
