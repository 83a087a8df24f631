"""The two-branch model: parity with transformers' Qwen2, branch semantics, packing, backends."""

import copy

import pytest
import torch

import unix.models.attention as attention
from unix.config import load_model_config
from unix.models.sequence import LatentImage, Text, VitImage, pack
from unix.models.unix import UniX
from unix.weights.released import from_released_name


@pytest.fixture(scope="module")
def cfg():
    return load_model_config("tiny")


def make_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = UniX(cfg)
    # Random (not identity) norms and a non-zero output head, so every weight matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "_norm." in name:
                p.uniform_(0.5, 1.5)
        model.llm2vae.weight.normal_(0, 0.2)
    return model.eval()


def sample(cfg, text_ids, latent_seed=0, t=0.7, vit=True, hw=(4, 4)):
    g = torch.Generator().manual_seed(latent_seed)
    segs = []
    if vit:
        s = cfg.vision.image_size
        segs.append(VitImage(torch.randn(3, s, s, generator=g)))
    segs.append(Text([cfg.tokens.bos] + text_ids + [cfg.tokens.eos]))
    h, w = hw
    segs.append(LatentImage(torch.randn(h * w, cfg.vae.latent_channels, generator=g), h, w, t=t))
    return segs


def packed(cfg, samples, **kw):
    return pack(samples, cfg.tokens, cfg.vision.num_patches, cfg.gen.max_latent_size, **kw)


def test_und_matches_transformers_qwen2(cfg):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    lm = cfg.lm
    c = copy.deepcopy(cfg)
    c.lm.qk_norm = False
    ours = make_model(c)
    hf_cfg = Qwen2Config(
        vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size,
        num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_heads,
        rope_theta=lm.rope_theta, rms_norm_eps=lm.rms_norm_eps, tie_word_embeddings=False, use_sliding_window=False,
        attn_implementation="eager",
    )
    torch.manual_seed(1)
    hf = Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # biases and norms away from their init
    mapped = {from_released_name("language_model." + k): v for k, v in hf.state_dict().items()}
    missing, unexpected = ours.load_state_dict(mapped, strict=False)
    assert not unexpected and not [m for m in missing if ".und." in m or m.startswith(("embed", "lm_head"))]

    ids = torch.randint(5, lm.vocab_size, (1, 23))
    batch = packed(c, [[Text(ids[0].tolist())]])
    with torch.no_grad():
        ref = hf(input_ids=ids).logits[0]
        got = ours(batch, logits_at=torch.ones_like(batch.input_ids, dtype=torch.bool)).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_positions_follow_the_design(cfg):
    b = packed(cfg, [sample(cfg, [7, 8, 9], hw=(2, 2))])
    P = cfg.vision.num_patches
    pos = b.position_ids[0].tolist()
    assert pos[: P + 2] == [0] * (P + 2)  # BOI, ViT tokens, EOI share position 0
    assert pos[P + 2 : P + 7] == [1, 2, 3, 4, 5]  # BOS 7 8 9 EOS count up
    assert pos[P + 7 :] == [6] * 6  # noisy latent group: one shared position
    two = packed(cfg, [sample(cfg, [7], hw=(2, 2)), sample(cfg, [5, 6], hw=(2, 2))])
    starts = (two.meta.sample[0] == 1).nonzero()[0].item()
    assert two.position_ids[0, starts].item() == 0  # positions restart per sample


def test_und_outputs_ignore_following_gen_tokens(cfg):
    model = make_model(cfg)
    with_gen = packed(cfg, [sample(cfg, [10, 11, 12])])
    segs = sample(cfg, [10, 11, 12])[:-1]
    without = packed(cfg, [segs])
    n = without.input_ids.shape[1]
    with torch.no_grad():
        a = model(with_gen).hidden[0, :n]
        b = model(without).hidden[0]
    torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)  # equal up to matmul-shape rounding


def test_gen_outputs_depend_on_und_context(cfg):
    model = make_model(cfg)
    with torch.no_grad():
        v1 = model(packed(cfg, [sample(cfg, [10, 11, 12])])).velocity
        v2 = model(packed(cfg, [sample(cfg, [10, 99, 12])])).velocity
    assert v1.shape == (16, cfg.vae.latent_channels)
    assert (v1 - v2).abs().max() > 1e-4


def test_frozen_und_gets_no_gradient(cfg):
    model = make_model(cfg).train()
    model.set_trainable(und=False, gen=True)
    out = model(packed(cfg, [sample(cfg, [10, 11]), sample(cfg, [13], latent_seed=1)]))
    out.velocity.pow(2).mean().backward()
    und = [n for n, p in model.named_parameters() if UniX.branch_of(n) == "und"]
    gen = [n for n, p in model.named_parameters() if UniX.branch_of(n) == "gen"]
    params = dict(model.named_parameters())
    assert und and gen
    assert all(params[n].grad is None or not params[n].grad.any() for n in und)
    assert all(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in gen)


def _edit_sample(cfg, seed=2):
    """Text, a clean latent image (an edit's source), text, then the noisy latents."""
    g = torch.Generator().manual_seed(seed)
    C = cfg.vae.latent_channels
    return [Text([cfg.tokens.bos, 20, 21]), LatentImage(torch.randn(4, C, generator=g), 2, 2, noisy=False),
            Text([22, 23]), LatentImage(torch.randn(4, C, generator=g), 2, 2, t=0.4)]


def test_frozen_und_constants_are_the_tokens_no_gen_token_reaches(cfg):
    model = make_model(cfg).train()
    batch = packed(cfg, [sample(cfg, [10, 11]), _edit_sample(cfg)])
    assert model._und_constants(batch) is None  # und trains: nothing is constant
    model.set_trainable(und=False, gen=True)
    const = model._und_constants(batch)[0].tolist()
    n_vit = cfg.vision.num_patches
    first = 1 + n_vit + 1 + 4  # BOI, ViT, EOI, then bos 10 11 eos
    assert const[:first] == [True] * first
    assert const[first:first + 18] == [False] * 18  # BOI, 16 noisy latents, EOI
    edit = const[first + 18:]
    # text of 3, then BOI / 4 clean latents / EOI, text of 2, BOI / 4 noisy / EOI
    assert edit == [True] * 3 + [False] * (6 + 2 + 6)


def test_frozen_und_tokens_skip_autograd_with_the_same_gen_gradients(cfg, monkeypatch):
    batch = packed(cfg, [sample(cfg, [10, 11]), sample(cfg, [13], latent_seed=1), _edit_sample(cfg)])

    def gen_grads_and_rows():
        model = make_model(cfg).train()
        model.set_trainable(und=False, gen=True)
        rows = []
        model.decoder.layers[-1].und.q_proj.register_forward_hook(
            lambda m, args, out: rows.append((out.shape[0], out.requires_grad)))
        model(batch).velocity.pow(2).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return grads, sum(n for n, live in rows if live), sum(n for n, _ in rows)

    fast, live_fast, total = gen_grads_and_rows()
    monkeypatch.setattr(UniX, "_und_constants", lambda self, batch: None)
    full, live_full, _ = gen_grads_and_rows()
    assert fast.keys() == full.keys() and fast
    for n in fast:
        torch.testing.assert_close(fast[n], full[n], rtol=1e-4, atol=1e-6, msg=n)
    und_tokens = int((~batch.is_gen).sum())
    assert live_full == total == und_tokens  # without: every und token is in the graph
    assert live_fast == 2 + 2 + (2 + 2 + 2)  # with: the BOI/EOI of every latent image, and the text after a clean one


def test_packed_samples_do_not_interact(cfg):
    model = make_model(cfg)
    a, b = sample(cfg, [10, 11]), sample(cfg, [20, 21, 22], latent_seed=3)
    with torch.no_grad():
        both = model(packed(cfg, [a, b]))
        alone = model(packed(cfg, [b]))
    n = alone.hidden.shape[1]
    torch.testing.assert_close(both.hidden[0, -n:], alone.hidden[0], atol=1e-5, rtol=1e-5)


def test_model_backends_agree(cfg, monkeypatch):
    monkeypatch.setattr(attention, "_flash_varlen_kernel", lambda: attention.varlen_reference_kernel)
    model = make_model(cfg)
    batch = packed(cfg, [sample(cfg, [10, 11]), sample(cfg, [5, 6, 7], vit=False, hw=(3, 5)), [Text([1, 9, 9, 2])]])
    where = batch.kind == 0
    with torch.no_grad():
        outs = {b: model(batch, logits_at=where, backend=b) for b in ("sdpa", "flex", "flash")}
    for b in ("flex", "flash"):
        torch.testing.assert_close(outs[b].velocity, outs["sdpa"].velocity, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(outs[b].logits, outs["sdpa"].logits, atol=1e-5, rtol=1e-4)


def test_row_batches_equal_packed(cfg):
    """One row per sample (right-padded) gives the same outputs as one packed sequence."""
    model = make_model(cfg)
    samples = [sample(cfg, [10, 11]), sample(cfg, [20, 21, 22, 23], latent_seed=3)]
    with torch.no_grad():
        flat = model(packed(cfg, samples))
        rows = model(packed(cfg, samples, rows=True))
    torch.testing.assert_close(rows.velocity, flat.velocity, atol=1e-5, rtol=1e-5)


def test_init_gen_from_und_copies_every_weight(cfg):
    model = make_model(cfg)
    model.init_gen_from_und()
    for layer in model.decoder.layers:
        for (n, pu), (_, pg) in zip(layer.und.named_parameters(), layer.gen.named_parameters()):
            assert torch.equal(pu, pg), n
    assert torch.equal(model.decoder.norm_und.weight, model.decoder.norm_gen.weight)


def test_rope_axes_equal_give_the_1d_tables():
    from unix.models.layers import RotaryEmbedding

    rope = RotaryEmbedding(16)
    pos = torch.tensor([[0, 3, 7, 7, 40]])
    cos1, sin1 = rope(pos, torch.float32)
    cos3, sin3 = rope(pos[..., None].repeat(1, 1, 3), torch.float32)
    assert torch.equal(cos1, cos3) and torch.equal(sin1, sin3)
    moved = pos[..., None].repeat(1, 1, 3)
    moved[0, 2, 1] += 1  # token 2 one row down: only the row axis's frequencies (1, 4, 7) turn
    cos, _ = rope(moved, torch.float32)
    changed = (cos[0, 0, 2, :8] != cos1[0, 0, 2, :8]).nonzero().flatten().tolist()
    assert changed == [1, 4, 7]


def test_2d_latent_rope_places_latents_on_the_grid(cfg):
    from unix.config import override_config

    c2 = override_config(cfg, ["gen.latent_rope=2d"])
    b = packed(c2, [sample(c2, [7, 8, 9], hw=(2, 3))])
    pos = make_model(c2).rope_positions(b)[0]
    assert pos.shape[-1] == 3
    lat = b.is_gen[0]
    assert torch.equal(pos[~lat], b.position_ids[0][~lat][:, None].expand(-1, 3))  # text and ViT: (r, r, r)
    r = b.position_ids[0][lat][0].item()
    expect = [[r, r + y, r + x] for y in range(2) for x in range(3)]
    assert pos[lat].tolist() == expect


def test_2d_latent_rope_changes_gen_only(cfg):
    from unix.config import override_config

    shared = make_model(cfg)
    grid = UniX(override_config(cfg, ["gen.latent_rope=2d"])).eval()
    grid.load_state_dict(shared.state_dict())
    b = packed(cfg, [sample(cfg, [10, 11, 12])])
    with torch.no_grad():
        a, g = shared(b), grid(b)
    context = b.meta.mode != int(attention.Mode.NOISE)  # not the noisy image group (its BOI/EOI see latents)
    assert torch.equal(a.hidden[context], g.hidden[context])  # the context never attends to latents
    assert (a.velocity - g.velocity).abs().max() > 1e-4
