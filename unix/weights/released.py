"""State-dict adapter between our parameter names and the released UniX checkpoint's names.

One name table (`NAME_TABLE`) holds every correspondence; the functions below only apply it.
Loading is strict: every missing, unexpected or mis-shaped tensor is reported by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from unix.errors import UserError

# (our name, released name). `{i}` is a decoder layer, `{rest}` any suffix of a sub-module.
NAME_TABLE: list[tuple[str, str]] = [
    ("embed_tokens.weight", "language_model.model.embed_tokens.weight"),
    ("lm_head.weight", "language_model.lm_head.weight"),
    ("decoder.norm_und.weight", "language_model.model.norm.weight"),
    ("decoder.norm_gen.weight", "language_model.model.norm_moe_gen.weight"),
    ("decoder.layers.{i}.und.input_norm.weight", "language_model.model.layers.{i}.input_layernorm.weight"),
    ("decoder.layers.{i}.gen.input_norm.weight", "language_model.model.layers.{i}.input_layernorm_moe_gen.weight"),
    ("decoder.layers.{i}.und.post_attn_norm.weight", "language_model.model.layers.{i}.post_attention_layernorm.weight"),
    ("decoder.layers.{i}.gen.post_attn_norm.weight", "language_model.model.layers.{i}.post_attention_layernorm_moe_gen.weight"),
    ("decoder.layers.{i}.und.{proj}.{wb}", "language_model.model.layers.{i}.self_attn.{proj}.{wb}"),
    ("decoder.layers.{i}.gen.{proj}.{wb}", "language_model.model.layers.{i}.self_attn.{proj}_moe_gen.{wb}"),
    ("decoder.layers.{i}.und.{qk}_norm.weight", "language_model.model.layers.{i}.self_attn.{qk}_norm.weight"),
    ("decoder.layers.{i}.gen.{qk}_norm.weight", "language_model.model.layers.{i}.self_attn.{qk}_norm_moe_gen.weight"),
    ("decoder.layers.{i}.und.mlp.{mlp}.weight", "language_model.model.layers.{i}.mlp.{mlp}.weight"),
    ("decoder.layers.{i}.gen.mlp.{mlp}.weight", "language_model.model.layers.{i}.mlp_moe_gen.{mlp}.weight"),
    ("vision.{rest}", "vit_model.vision_tower.{rest}"),
    ("connector.fc1.{wb}", "connector.layers.0.{wb}"),  # Janus MlpProjector names: Linear, GELU, Linear
    ("connector.fc2.{wb}", "connector.layers.2.{wb}"),
    ("time_embedder.{rest}", "time_embedder.{rest}"),
    ("vae2llm.{wb}", "vae2llm.{wb}"),
    ("llm2vae.{wb}", "llm2vae.{wb}"),
]

# Released prefixes that name the same tensors (the reference tolerates both for the ViT).
ALIASES = {"vision_model.vision_tower.": "vit_model.vision_tower."}

# Tensors the released file carries that the model never uses.
IGNORED = (
    "vit_model.vision_tower.attn_pool.",  # SigLIP attention-pool head (ignore_head=True upstream)
    "vit_pos_embed.pos_embed",  # allocated upstream, never added anywhere
    "language_model.model.repa_loss_fn.",  # REPA projector, a training-only module
)
# Fixed tables we recompute; a stored copy is checked against ours.
FIXED = {"latent_pos_embed.pos_embed": "latent_pos_table"}

_FIELDS = {
    "i": r"\d+",
    "proj": r"q_proj|k_proj|v_proj|o_proj",
    "wb": r"weight|bias",
    "qk": r"q|k",
    "mlp": r"gate_proj|up_proj|down_proj",
    "rest": r".+",
}


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for key, rx in _FIELDS.items():
        pattern = pattern.replace(re.escape("{" + key + "}"), f"(?P<{key}>{rx})")
    return re.compile(pattern + r"\Z")


_OURS_TO_RELEASED = [(_compile(ours), released) for ours, released in NAME_TABLE]
_RELEASED_TO_OURS = [(_compile(released), ours) for ours, released in NAME_TABLE]


def _translate(name: str, rules) -> str | None:
    for pattern, template in rules:
        m = pattern.match(name)
        if m:
            return template.format(**m.groupdict())
    return None


def to_released_name(ours: str) -> str:
    out = _translate(ours, _OURS_TO_RELEASED)
    if out is None:
        raise KeyError(f"no released name for parameter {ours!r}")
    return out


def from_released_name(released: str) -> str | None:
    for alias, canonical in ALIASES.items():
        if released.startswith(alias):
            released = canonical + released[len(alias):]
    if released.startswith("vit_model.vision_tower.attn_pool."):
        return None  # `vision.{rest}` would otherwise claim it
    return _translate(released, _RELEASED_TO_OURS)


def to_released(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {to_released_name(k): v for k, v in state_dict.items()}


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)  # our parameters with no tensor in the file (released names)
    unexpected: list[str] = field(default_factory=list)  # file tensors that map to nothing
    wrong_shape: list[str] = field(default_factory=list)  # "name: file [..] vs model [..]"
    ignored: list[str] = field(default_factory=list)  # known-unused tensors, skipped
    fixed_checked: list[str] = field(default_factory=list)  # recomputed tables that matched

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape)

    def summary(self, limit: int = 8) -> str:
        parts = []
        for label, items in (("missing", self.missing), ("unexpected", self.unexpected), ("wrong shape", self.wrong_shape)):
            if items:
                shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
                parts.append(f"{len(items)} {label}: {shown}")
        return "; ".join(parts) or "all tensors present"


def match_state_dict(model: torch.nn.Module, file_tensors: dict[str, torch.Tensor]) -> tuple[dict, LoadReport]:
    """Map released-name tensors onto `model`. Returns (our state dict, report). Shapes only are
    compared for tensors on the meta device, so this also checks files against a meta model."""
    ours = model.state_dict()
    report, mapped = LoadReport(), {}
    for name, tensor in file_tensors.items():
        if name.startswith(IGNORED) or any(name.startswith(a + "attn_pool.") for a in ALIASES):
            report.ignored.append(name)
            continue
        if name in FIXED:
            ref = getattr(model, FIXED[name])
            if tuple(tensor.shape) != tuple(ref.shape):
                report.wrong_shape.append(f"{name}: file {list(tensor.shape)} vs model {list(ref.shape)}")
            elif tensor.device.type != "meta" and ref.device.type != "meta" and not torch.allclose(
                tensor.float().cpu(), ref.float().cpu(), atol=1e-2
            ):
                report.wrong_shape.append(f"{name}: values differ from the recomputed sin-cos table")
            else:
                report.fixed_checked.append(name)
            continue
        target = from_released_name(name)
        if target is None or target not in ours:
            report.unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(ours[target].shape):
            report.wrong_shape.append(f"{name}: file {list(tensor.shape)} vs model {list(ours[target].shape)}")
            continue
        mapped[target] = tensor
    report.missing = sorted(to_released_name(k) for k in ours if k not in mapped and not _is_shape_error(k, report))
    return mapped, report


def _is_shape_error(our_name: str, report: LoadReport) -> bool:
    released = to_released_name(our_name)
    return any(w.startswith(released + ":") for w in report.wrong_shape)


def load_released_state_dict(model: torch.nn.Module, file_tensors: dict[str, torch.Tensor], allow_partial: bool = False, source: str = "checkpoint") -> LoadReport:
    """Load released-name tensors into `model`; fail naming every problem unless allow_partial."""
    mapped, report = match_state_dict(model, file_tensors)
    if not report.ok and not allow_partial:
        raise UserError(f"{source}: cannot load: {report.summary()}")
    model.load_state_dict(mapped, strict=False, assign=False)
    return report


def released_layout(model: torch.nn.Module) -> dict:
    """{"tensors": name -> shape as our model writes it, "extra": tensors the release carries that
    we recompute or never use (the loader accepts them by name)}."""
    tensors = {to_released_name(k): list(v.shape) for k, v in model.state_dict().items()}
    extra = {name: list(getattr(model, attr).shape) for name, attr in FIXED.items()}
    extra.update(unused_released_tensors(model.cfg))
    return {"tensors": tensors, "extra": extra}


def unused_released_tensors(cfg) -> dict[str, list[int]]:
    """Shapes of the released tensors the model never runs: the SigLIP attention-pool head and the
    never-added ViT sin-cos table."""
    W, M = cfg.vision.width, cfg.vision.mlp_dim
    pool = {
        "latent": [1, 1, W], "q.weight": [W, W], "q.bias": [W], "kv.weight": [2 * W, W], "kv.bias": [2 * W],
        "proj.weight": [W, W], "proj.bias": [W], "norm.weight": [W], "norm.bias": [W],
        "mlp.fc1.weight": [M, W], "mlp.fc1.bias": [M], "mlp.fc2.weight": [W, M], "mlp.fc2.bias": [W],
    }
    out = {f"vit_model.vision_tower.attn_pool.{k}": v for k, v in pool.items()}
    out["vit_pos_embed.pos_embed"] = [cfg.vision.num_patches, cfg.lm.hidden_size]
    return out
