"""transformers' SigLIP vision weights -> our `SiglipVisionTower` (timm layout), strictly.

Lets a user start from a local `google/siglip-large-patch16-384` folder, and lets the tests prove
numerical parity with transformers. HF keeps q/k/v separate; the released UniX ViT fuses them as
`attn.qkv` with rows [q; k; v], and stores the positions as a [1, P, W] parameter, not an embedding.
"""

from __future__ import annotations

import re

import torch

from unix.config import VisionConfig
from unix.errors import UserError
from unix.models.vision import SiglipVisionTower

# HF name (after the `vision_model.` prefix) -> ours; `{j}` is a block, `{wb}` weight or bias.
NAME_TABLE = {
    "embeddings.patch_embedding.{wb}": "patch_embed.proj.{wb}",
    "encoder.layers.{j}.layer_norm1.{wb}": "blocks.{j}.norm1.{wb}",
    "encoder.layers.{j}.layer_norm2.{wb}": "blocks.{j}.norm2.{wb}",
    "encoder.layers.{j}.self_attn.out_proj.{wb}": "blocks.{j}.attn.proj.{wb}",
    "encoder.layers.{j}.mlp.fc1.{wb}": "blocks.{j}.mlp.fc1.{wb}",
    "encoder.layers.{j}.mlp.fc2.{wb}": "blocks.{j}.mlp.fc2.{wb}",
    "post_layernorm.{wb}": "norm.{wb}",
}
POSITIONS = "embeddings.position_embedding.weight"  # [P, W] -> our pos_embed [1, P, W]
QKV = re.compile(r"encoder\.layers\.(?P<j>\d+)\.self_attn\.(?P<p>[qkv])_proj\.(?P<wb>weight|bias)\Z")
# Present in a SiglipVisionModel / full SiglipModel file but not part of the tower we run:
# the attention-pool head (UniX never runs it), the text tower and the contrastive scalars.
IGNORED = ("head.", "text_model.", "logit_scale", "logit_bias", "embeddings.position_ids")
_SHOW = 10  # names listed per category in an error; the count is always given


def _rule(template: str) -> re.Pattern:
    rx = re.escape(template).replace(re.escape("{wb}"), "(?P<wb>weight|bias)").replace(re.escape("{j}"), r"(?P<j>\d+)")
    return re.compile(rx + r"\Z")


_RULES = [(_rule(hf), ours) for hf, ours in NAME_TABLE.items()]


def _translate(name: str) -> str | None:
    for pattern, template in _RULES:
        m = pattern.match(name)
        if m:
            return template.format(**m.groupdict())
    return None


def _listing(label: str, names: list[str]) -> str:
    more = f", ... ({len(names) - _SHOW} more)" if len(names) > _SHOW else ""
    return f"{len(names)} {label}: {', '.join(names[:_SHOW])}{more}"


def siglip_hf_to_unix(state_dict: dict[str, torch.Tensor], cfg: VisionConfig) -> dict[str, torch.Tensor]:
    """Map a transformers SigLIP state dict onto `SiglipVisionTower(cfg)` names.

    Raises UserError naming every tensor that maps to nothing (unexpected), every tower parameter
    left without a tensor (missing, in our names) and every shape that does not fit `cfg`
    (the first ten of each kind are named, with the count).
    """
    out, source, qkv, unexpected = {}, {}, {}, []  # source: our name -> HF name, for messages
    for hf_name, t in state_dict.items():
        name = hf_name.removeprefix("vision_model.")
        if name.startswith(IGNORED):
            continue
        if name == POSITIONS:
            out["pos_embed"], source["pos_embed"] = t.unsqueeze(0), hf_name  # (P, W) -> (1, P, W)
        elif m := QKV.match(name):
            qkv.setdefault(f"blocks.{m['j']}.attn.qkv.{m['wb']}", {})[m["p"]] = (t, hf_name)
        elif (ours := _translate(name)) is not None:
            out[ours], source[ours] = t, hf_name
        else:
            unexpected.append(hf_name)
    missing = []
    for ours, parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:
            out[ours] = torch.cat([parts[p][0] for p in "qkv"], dim=0)  # rows [q; k; v]
            source[ours] = parts["q"][1].replace("q_proj", "{q,k,v}_proj")
        else:
            missing.append(f"{ours} (no {'/'.join(p + '_proj' for p in 'qkv' if p not in parts)})")

    # The tower built on the meta device is the single source of expected names and shapes.
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in SiglipVisionTower(cfg).state_dict().items()}
    missing += sorted(k for k in expected if k not in out and k not in qkv)  # partial triples listed above
    unexpected += sorted(source[k] for k in out if k not in expected)  # e.g. blocks beyond cfg.depth
    wrong_shape = [
        f"{source[k]} -> {k}: {tuple(out[k].shape)}, expected {expected[k]}"
        for k in out if k in expected and tuple(out[k].shape) != expected[k]
    ]
    found = {"missing": missing, "unexpected": unexpected, "wrong shape": wrong_shape}
    problems = [_listing(label, names) for label, names in found.items() if names]
    if problems:
        raise UserError("SigLIP weights do not fit the vision config: " + "; ".join(problems))
    return out
