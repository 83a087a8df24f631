"""The inputs of `test_image_protocol.py` and the
oracle that produced its fixtures.

`build_case(folder)` writes a small data set in the UniX authors' file layout: a real-image CSV like
CheXGenBench's LLAVARAD_ANNOTATIONS_TEST.csv (`id`, `path` relative to an image root,
`annotated_prompt`, `chexpert_labels`) with repeated prompts and a repeated path, and two
generation-prompt CSVs like `generations_with_metadata.csv` (`synthetic_filename` relative to the
folder of generated images), of 28 and 30 rows. Images are random greyscale and RGB PNG/JPG files of
varied sizes, some larger than 299 px. Only numpy and Pillow are needed, so the oracle and the test
build the same files.

`python tests/image_protocol_oracle.py` runs the authors' pipeline on them, outside `unix`, and
prints the fixtures. It needs pandas, torchmetrics and prdc (not in the project venv):

    python3 -m venv /tmp/oracle-h2 && /tmp/oracle-h2/bin/pip install torch==2.13.0
    /tmp/oracle-h2/bin/pip install torch==2.13.0 pandas torchmetrics prdc==0.2 pillow
    /tmp/oracle-h2/bin/python tests/image_protocol_oracle.py

The pipeline follows eval/gen_metrics/metrics/fid.py and tools/combine_shards.py of the UniX release:
pandas `drop_duplicates(subset=["annotated_prompt"])` on the real rows, `np.array_split` of both path
lists into 4 shards; per shard PIL `convert("RGB")`, torchvision `Resize((299, 299))` (written out
here as PIL's bilinear resize, which is what torchvision calls for a PIL image; torchvision cannot be
installed beside torch 2.13 on CPU) and `ToTensor` (float32 / 255), then `(batch * 255).to(uint8)`;
torchmetrics FrechetInceptionDistance and KernelInceptionDistance(subset_size=min(N_fake, N_real))
with a custom `feature=` module, prdc.compute_prdc(k=5); each value rounded to 3 decimals, shard rows
written to CSV and read back, the mean rounded to 3 decimals.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

N_REAL_IMAGES = 30
N_FAKE_IMAGES = 30
FEATURE_DIM = 6  # below the 7 images of a shard: full-rank covariances
PROJECTION_SEED = 0
SIDE = 299

FINDINGS = ("Atelectasis", "Cardiomegaly", "Edema", "Pleural Effusion")


def _image(rng: np.random.Generator, shift: float) -> Image.Image:
    """A smooth random blob plus noise, greyscale or RGB, of a random size (some above 299 px)."""
    h, w = (int(rng.integers(20, 90)), int(rng.integers(20, 90))) if rng.random() < 0.8 else (int(rng.integers(300, 360)), int(rng.integers(300, 360)))
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.4)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    grey = 60 + shift + 120 * blob + rng.normal(0, 25, (h, w))
    if rng.random() < 0.3:
        rgb = np.stack([grey + rng.normal(0, 8, (h, w)) for _ in range(3)], axis=-1)
        return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")
    return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), mode="L")


def _labels(rng: np.random.Generator) -> str:
    values = {f: (float(v) if v in (1, 0, -1) else "nan") for f, v in zip(FINDINGS, rng.choice([1, 0, -1, 9], len(FINDINGS)))}
    return "{" + ", ".join(f"'{k}': {v}" for k, v in values.items()) + "}"


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def build_case(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Write the data set under `folder`; returns the CSVs and the two image roots."""
    rng = np.random.default_rng(seed)
    real_root, fake_root = folder / "mimic-cxr-jpg", folder / "generated"
    real_paths = []
    for i in range(N_REAL_IMAGES):
        rel = f"files/p1{i % 3}/s{i:03d}/real_{i:02d}." + ("jpg" if i % 7 == 3 else "png")
        (real_root / rel).parent.mkdir(parents=True, exist_ok=True)
        image = _image(rng, shift=0.0)
        image.save(real_root / rel, **({"quality": 90} if rel.endswith("jpg") else {}))
        real_paths.append(rel)
    prompts = [f"Finding {i}: the lungs, heart and mediastinum, case {i}." for i in range(N_REAL_IMAGES + 2)]
    rows = [[str(100 + i), real_paths[i], prompts[i], _labels(rng)] for i in range(N_REAL_IMAGES)]
    for row, earlier in zip((5, 11, 17, 23), (1, 2, 3, 4)):  # repeated prompts: dropped, first kept
        rows[row][2] = prompts[earlier]
    rows.append(["130", real_paths[7], prompts[30], _labels(rng)])  # a repeated path with a new prompt: kept
    rows.append(["131", real_paths[8], prompts[31], _labels(rng)])
    real_csv = folder / "LLAVARAD_ANNOTATIONS_TEST.csv"
    _write_csv(real_csv, ["id", "path", "annotated_prompt", "chexpert_labels"], rows)

    unique = list(dict.fromkeys(r[2] for r in rows))  # 28 prompts, as the authors' generation CSV keeps
    fake_root.mkdir(parents=True, exist_ok=True)
    fake_rows = []
    for i in range(N_FAKE_IMAGES):
        name = f"SyntheticImg_{200 + i}.png"
        _image(rng, shift=90.0 if i % 3 == 0 else 20.0).save(fake_root / name)  # a third far off: precision < 1
        prompt = unique[i] if i < len(unique) else f"An extra prompt {i}."
        fake_rows.append([str(200 + i), prompt, name, real_paths[i % N_REAL_IMAGES], _labels(rng)])
    header = ["id", "annotated_prompt", "synthetic_filename", "path", "chexpert_labels"]
    fake_equal, fake_more = folder / "generations_28.csv", folder / "generations_30.csv"
    _write_csv(fake_equal, header, fake_rows[: len(unique)])
    _write_csv(fake_more, header, fake_rows)
    return {"real_csv": real_csv, "real_root": real_root, "fake_28": fake_equal, "fake_30": fake_more, "fake_root": fake_root}


def projection(dtype=None):
    """The fixed feature model of the fixtures: a seeded random projection of the 299 x 299 uint8
    image, one image at a time (so no result depends on how images are batched), in float64."""
    import torch

    n = 3 * SIDE * SIDE
    g = torch.Generator().manual_seed(PROJECTION_SEED)
    noise = torch.randn(n, FEATURE_DIM, generator=g, dtype=torch.float64) / n**0.5
    brightness = (torch.rand(FEATURE_DIM, generator=g, dtype=torch.float64) * 6 - 3) / n  # each feature sees the mean level too
    return noise + brightness


def project(weights, images):
    """(B, 3, 299, 299) uint8 -> (B, FEATURE_DIM) float32."""
    import torch

    rows = [weights.T @ (image.reshape(-1).to(torch.float64) / 255) for image in images]
    return torch.stack(rows).to(torch.float32)


def exact_features(seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Float64 features for full-precision checks: (20, 6) real and fake, and (10, 16) pairs (N < D)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(20, 6)), rng.normal(0.3, 1.2, size=(20, 6)), rng.normal(size=(10, 16)), rng.normal(0.2, 1.0, size=(10, 16))


# --- the oracle (run outside the project) -------------------------------------------------------------


def _authors_pixels(path: str):
    import torch

    with Image.open(path) as img:
        img = img.convert("RGB").resize((SIDE, SIDE), Image.BILINEAR)  # torchvision Resize((299, 299)) on a PIL image
    tensor = torch.from_numpy(np.array(img, np.uint8, copy=True)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)  # ToTensor
    return (tensor * 255).to(torch.uint8)


def _shard(real_paths, fake_paths, weights, seed_before_kid: bool) -> dict:
    import torch
    from prdc import compute_prdc
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    class Projection(torch.nn.Module):
        def forward(self, images):
            return project(weights, images)

    module = Projection()
    fid = FrechetInceptionDistance(feature=module)
    kid = KernelInceptionDistance(subset_size=min(len(real_paths), len(fake_paths)), feature=module)
    feats = {}
    for real, paths in ((True, real_paths), (False, fake_paths)):
        batch = torch.stack([_authors_pixels(p) for p in paths])  # one DataLoader batch (batch size 32 > shard)
        fid.update(batch, real=real)
        kid.update(batch, real=real)
        feats[real] = module(batch)
    fd = fid.compute()
    if seed_before_kid:
        torch.manual_seed(42)  # unix draws KID subsets from a generator seeded 42 per shard
    kid_mean, _ = kid.compute()
    prdc = compute_prdc(real_features=feats[True], fake_features=feats[False], nearest_k=5)
    return {"fd": round(fd.item(), 3), "kid": round(kid_mean.item(), 3),
            **{k: round(prdc[k].item(), 3) for k in ("precision", "recall", "density", "coverage")}}


def _release(case: dict, fake_csv: Path, folder: Path) -> dict:
    import os

    import pandas as pd

    weights = projection()
    real_df = pd.read_csv(case["real_csv"])
    real_df["path"] = real_df["path"].apply(lambda x: os.path.join(case["real_root"], x))
    real_df = real_df.drop_duplicates(subset=["annotated_prompt"]).reset_index(drop=True)
    fake_df = pd.read_csv(fake_csv)
    fake_df["synthetic_filename"] = fake_df["synthetic_filename"].apply(lambda x: os.path.join(case["fake_root"], x))
    real_split = np.array_split(real_df["path"].tolist(), 4)
    fake_split = np.array_split(fake_df["synthetic_filename"].tolist(), 4)
    shards = []
    for k, (r, f) in enumerate(zip(real_split, fake_split)):
        row = _shard(list(r), list(f), weights, seed_before_kid=len(r) != len(f))
        pd.DataFrame([row]).to_csv(folder / f"shard_{k}.csv", index=False)  # as metrics/fid.py writes them
        shards.append(row)
    read = [pd.read_csv(folder / f"shard_{k}.csv") for k in range(4)]  # combine_shards.py reads them back
    combined = {key: round(sum(df[key].values[0] for df in read) / len(read), 3) for key in shards[0]}
    return {"n_real": len(real_df), "shards": shards, "metrics": combined}


def _exact() -> dict:
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    out = {}
    x, y, xs, ys = exact_features()
    for name, (a, b) in {"full_rank": (x, y), "singular": (xs, ys)}.items():
        class Lookup(torch.nn.Module):  # the "images" are row indices into the float64 feature table
            num_features = a.shape[1]

            def forward(self, idx, table=None):
                return self.table[idx[:, 0, 0, 0].long()]

        module = Lookup()
        fid, kid = FrechetInceptionDistance(feature=module), KernelInceptionDistance(subset_size=len(a), subsets=10, feature=module)
        for real, table in ((True, a), (False, b)):
            module.table = torch.from_numpy(table)
            idx = torch.arange(len(table), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)
            fid.update(idx, real=real)
            kid.update(idx, real=real)
        kid_mean, kid_std = kid.compute()
        out[name] = {"fd": fid.compute().item(), "kid": kid_mean.item(), "kid_std": kid_std.item()}
    return out


def main() -> None:
    import tempfile

    import torch
    import torchmetrics

    with tempfile.TemporaryDirectory() as tmp:
        case = build_case(Path(tmp))
        pixels = b"".join(_authors_pixels(str(p)).numpy().tobytes() for root in (case["real_root"], case["fake_root"])
                          for p in sorted(root.rglob("*")) if p.is_file())
        import hashlib

        print("torch", torch.__version__, "torchmetrics", torchmetrics.__version__)
        print("pixels sha256", hashlib.sha256(pixels).hexdigest())
        print("release 28/28", _release(case, case["fake_28"], Path(tmp)))
        print("release 28/30", _release(case, case["fake_30"], Path(tmp)))
    print("exact", _exact())


if __name__ == "__main__":
    main()
