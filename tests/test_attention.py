"""The visibility rule, and the backends derived from it agreeing on random packed batches."""

import random

import pytest
import torch

from unix.models.attention import (
    Mode,
    SDPAPlan,
    FlexPlan,
    TokenMeta,
    VarlenPlan,
    dense_mask,
    varlen_reference_kernel,
)


def meta_from_segments(samples):
    """samples: list of lists of (mode, length) -> TokenMeta with B=1 (packed)."""
    sample, segment, mode = [], [], []
    for s, segs in enumerate(samples):
        for g, (m, n) in enumerate(segs):
            sample += [s] * n
            segment += [g] * n
            mode += [int(m)] * n
    L = len(sample)
    as_row = lambda x: torch.tensor([x])  # noqa: E731
    return TokenMeta(as_row(sample), as_row(segment), as_row(mode), torch.arange(L)[None])


def test_rule_on_a_hand_built_sample():
    # one sample: text(3, causal) | vit(2, full) | noisy latents(2) ; second sample: text(2)
    meta = meta_from_segments([[(Mode.CAUSAL, 3), (Mode.FULL, 2), (Mode.NOISE, 2)], [(Mode.CAUSAL, 2)]])
    m = dense_mask(meta, meta)[0, 0].int().tolist()
    expected = [
        # t0 t1 t2 v0 v1 n0 n1 | u0 u1
        [1, 0, 0, 0, 0, 0, 0, 0, 0],  # text: causal
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0],  # image: earlier text + whole own segment
        [1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 0, 0],  # noisy latents: everything earlier, bidirectional inside
        [1, 1, 1, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 1, 0],  # second sample sees nothing of the first
        [0, 0, 0, 0, 0, 0, 0, 1, 1],
    ]
    assert m == expected


def test_noise_segment_is_invisible_even_to_later_segments():
    meta = meta_from_segments([[(Mode.NOISE, 2), (Mode.CAUSAL, 2)]])
    m = dense_mask(meta, meta)[0, 0]
    assert not m[2:, :2].any()  # later text cannot read the noisy latents
    assert m[:2, :2].all()


def random_packed(seed: int):
    rng = random.Random(seed)
    samples = []
    for _ in range(rng.randint(2, 4)):
        segs = [(rng.choice([Mode.CAUSAL, Mode.FULL]), rng.randint(1, 9)) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.6:
            segs.append((Mode.NOISE, rng.randint(1, 9)))
        samples.append(segs)
    return meta_from_segments(samples)


@pytest.mark.parametrize("seed", range(4))
def test_backends_agree(seed):
    meta = random_packed(seed)
    torch.manual_seed(seed)
    L = meta.sample.shape[1]
    q, k, v = (torch.randn(1, 3, L, 8) for _ in range(3))
    ref = SDPAPlan(meta, meta)(q, k, v)
    flex = FlexPlan(meta, meta, compiled=False)(q, k, v)
    varlen = VarlenPlan(meta, meta, kernel=varlen_reference_kernel)(q, k, v)
    torch.testing.assert_close(flex, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(varlen, ref, atol=1e-5, rtol=1e-5)


def test_backends_agree_with_a_cache_prefix():
    """Queries that are the tail of the sequence (KV cache): keys = cached prefix + new tokens."""
    meta = meta_from_segments([[(Mode.CAUSAL, 5), (Mode.FULL, 4), (Mode.NOISE, 6)]])
    q_meta = TokenMeta(*(t[:, 9:] for t in meta.fields()))
    torch.manual_seed(0)
    q = torch.randn(1, 2, 6, 8)
    k, v = torch.randn(1, 2, 15, 8), torch.randn(1, 2, 15, 8)
    ref = SDPAPlan(q_meta, meta)(q, k, v)
    full = SDPAPlan(meta, meta)(torch.cat([torch.randn(1, 2, 9, 8), q], 2), k, v)[:, :, 9:]
    torch.testing.assert_close(ref, full)
    torch.testing.assert_close(VarlenPlan(q_meta, meta, kernel=varlen_reference_kernel)(q, k, v), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(FlexPlan(q_meta, meta, compiled=False)(q, k, v), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_sdpa_attends_sample_by_sample_as_the_dense_mask_does(seed):
    """A packed row of several samples goes block by block; values and gradients match one dense call."""
    metas = [random_packed(seed), random_packed(seed + 10)]
    L = max(m.sample.shape[1] for m in metas)
    pad = lambda t, fill: torch.cat([t, torch.full((1, L - t.shape[1]), fill)], dim=1)  # noqa: E731
    meta = TokenMeta(*(torch.cat([pad(a, f), pad(b, f)]) for a, b, f in zip(metas[0].fields(), metas[1].fields(), (-1, 0, 1, 0))))
    plan = SDPAPlan(meta, meta)
    assert plan.blocks is not None and [len(r) for r in plan.blocks] == [len(set(m.sample[0].tolist())) + (m.sample.shape[1] < L)
                                                                        for m in metas]
    torch.manual_seed(seed)
    q, k, v = (torch.randn(2, 3, L, 8, requires_grad=True) for _ in range(3))
    out = plan(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(meta, meta))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_sdpa_attends_densely_when_a_sample_is_split():
    meta = meta_from_segments([[(Mode.CAUSAL, 3)], [(Mode.CAUSAL, 2)]])
    split = TokenMeta(torch.tensor([[0, 0, 1, 1, 0]]), meta.segment, meta.mode, meta.order)
    assert SDPAPlan(split, split).blocks is None
    assert SDPAPlan(meta, meta).blocks is not None


def test_varlen_plan_never_builds_a_dense_mask(monkeypatch):
    """The varlen plan evaluates the rule per segment (segments x Lk), not per query pair."""
    import unix.models.attention as attention

    meta = random_packed(7)
    L = meta.sample.shape[1]
    ref_plan = SDPAPlan(meta, meta)
    monkeypatch.setattr(attention, "dense_mask", lambda *a: (_ for _ in ()).throw(AssertionError("dense mask built")))
    plan = VarlenPlan(meta, meta, kernel=varlen_reference_kernel)
    torch.manual_seed(7)
    q, k, v = (torch.randn(1, 3, L, 8) for _ in range(3))
    torch.testing.assert_close(plan(q, k, v), ref_plan(q, k, v), atol=1e-5, rtol=1e-5)


def test_step_plan_picks_the_mask_row_of_the_step():
    """Decoding into a fixed-shape cache: the mask of planned query j is row j of the rule's mask."""
    from unix.models.attention import StepPlan

    meta = meta_from_segments([[(Mode.FULL, 3), (Mode.CAUSAL, 6)]])
    queries = TokenMeta(*(t[:, 3:] for t in meta.fields()))  # six text tokens to decode after an image
    plan = StepPlan(queries, meta)
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    for j in range(6):
        q = torch.randn(1, 2, 1, 8)
        got = plan.at(torch.tensor([j]))(q, k, v)
        want = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, : 4 + j], v[:, :, : 4 + j])  # image + text so far
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
