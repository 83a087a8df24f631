"""Janus-Pro-1B -> UniX initialisation (reference section 4.4).

Janus' language model uses the released UniX und names (without the `_moe_gen` twins), its SigLIP
is `vision_model.vision_tower.*` and its projector `aligner.layers.{0,2}`. What Janus lacks is
initialised as the reference does: q/k/v biases zero, QK-norm weights one, the gen branch copied
from und, fresh generation heads with `llm2vae` zero. Everything else must be present.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from unix.errors import UserError
from unix.weights.released import LoadReport, match_state_dict

# Janus tensors that belong to its VQ image-generation path, which UniX replaces.
DISCARDED = ("gen_vision_model.", "gen_aligner.", "gen_head.", "gen_embed.")
RENAMED = {"aligner.layers.0.": "connector.layers.0.", "aligner.layers.2.": "connector.layers.2."}


def read_janus_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """`pytorch_model.bin` (weights-only unpickling) or `model.safetensors` of a Janus-Pro folder."""
    st, pt = folder / "model.safetensors", folder / "pytorch_model.bin"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    if pt.is_file():
        try:
            return torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{pt}: cannot be read with weights_only=True ({e}); convert it to safetensors") from None
    raise UserError(f"{folder}: no model.safetensors or pytorch_model.bin (expected a Janus-Pro-1B folder)")


def janus_to_released(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        if name.startswith(DISCARDED):
            continue
        for old, new in RENAMED.items():
            if name.startswith(old):
                name = new + name[len(old):]
        out[name] = t
    return out


def is_initialised_by_us(released_name: str) -> bool:
    """Tensors Janus does not have and the reference initialises itself."""
    gen_heads = ("time_embedder.", "vae2llm.", "llm2vae.")
    return (
        "_moe_gen" in released_name
        or released_name.startswith(gen_heads)
        or released_name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias", "q_norm.weight", "k_norm.weight"))
    )


def load_janus(model: nn.Module, folder: str | Path) -> LoadReport:
    """Initialise `model` (UniX) from a Janus-Pro-1B folder; strict about everything Janus must provide."""
    folder = Path(folder)
    mapped, report = match_state_dict(model, janus_to_released(read_janus_tensors(folder)))
    really_missing = [n for n in report.missing if not is_initialised_by_us(n)]
    if really_missing or report.unexpected or report.wrong_shape:
        report.missing = really_missing
        raise UserError(f"{folder}: not a Janus-Pro checkpoint of this size: {report.summary()}")
    model.load_state_dict(mapped, strict=False)
    with torch.no_grad():
        for layer in model.decoder.layers:
            for proj in (layer.und.q_proj, layer.und.k_proj, layer.und.v_proj):
                if proj.bias is not None:
                    proj.bias.zero_()
            for norm in (layer.und.q_norm, layer.und.k_norm):
                if hasattr(norm, "weight"):
                    norm.weight.fill_(1.0)
        model.llm2vae.weight.zero_()
        model.llm2vae.bias.zero_()
    model.init_gen_from_und()
    report.missing = []
    return report
