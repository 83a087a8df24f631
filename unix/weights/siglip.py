"""transformers' SigLIP vision weights -> our `SiglipVisionTower` (timm layout), strictly.

Lets a user start from a local `google/siglip-large-patch16-384` folder, and lets the tests prove
numerical parity with transformers. HF keeps q/k/v separate; the released UniX ViT fuses them as
`attn.qkv` with rows [q; k; v].
"""

from __future__ import annotations

import re

import torch

from unix.errors import UserError

# HF name (after an optional `vision_model.` prefix) -> ours; `{j}` is a block.
NAME_TABLE = {
    "embeddings.patch_embedding.{wb}": "patch_embed.proj.{wb}",
    "encoder.layers.{j}.layer_norm1.{wb}": "blocks.{j}.norm1.{wb}",
    "encoder.layers.{j}.layer_norm2.{wb}": "blocks.{j}.norm2.{wb}",
    "encoder.layers.{j}.self_attn.out_proj.{wb}": "blocks.{j}.attn.proj.{wb}",
    "encoder.layers.{j}.mlp.fc1.{wb}": "blocks.{j}.mlp.fc1.{wb}",
    "encoder.layers.{j}.mlp.fc2.{wb}": "blocks.{j}.mlp.fc2.{wb}",
    "post_layernorm.{wb}": "norm.{wb}",
}
QKV = re.compile(r"encoder\.layers\.(?P<j>\d+)\.self_attn\.(?P<p>[qkv])_proj\.(?P<wb>weight|bias)\Z")
POSITIONS = "embeddings.position_embedding.weight"  # [P, W] -> our pos_embed [1, P, W]
IGNORED = ("head.", "text_model.", "logit_scale", "logit_bias", "embeddings.position_ids")


def _rule(template: str) -> re.Pattern:
    rx = re.escape(template).replace(re.escape("{wb}"), "(?P<wb>weight|bias)").replace(re.escape("{j}"), r"(?P<j>\d+)")
    return re.compile(rx + r"\Z")


_RULES = [(_rule(hf), ours) for hf, ours in NAME_TABLE.items()]


def siglip_hf_to_unix(state_dict: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Map every tensor; raise naming any that map to nothing, and any block missing q, k or v."""
    out, qkv, unused = {}, {}, []
    for name, t in state_dict.items():
        name = name.removeprefix("vision_model.")
        if name.startswith(IGNORED):
            continue
        if name == POSITIONS:
            out["pos_embed"] = t[None]
            continue
        m = QKV.match(name)
        if m:
            qkv[(int(m["j"]), m["wb"], m["p"])] = t
            continue
        for pattern, template in _RULES:
            m = pattern.match(name)
            if m:
                out[template.format(**m.groupdict())] = t
                break
        else:
            unused.append(name)
    missing = []
    for j in range(depth):
        for wb in ("weight", "bias"):
            parts = [qkv.get((j, wb, p)) for p in "qkv"]
            if any(p is None for p in parts):
                missing.append(f"encoder.layers.{j}.self_attn.{{q,k,v}}_proj.{wb}")
                continue
            out[f"blocks.{j}.attn.qkv.{wb}"] = torch.cat(parts, dim=0)
    if unused or missing:
        raise UserError(f"SigLIP weights do not fit: unexpected {unused[:5]}, missing {missing[:5]}")
    return out
