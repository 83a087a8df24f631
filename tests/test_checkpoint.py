"""Sharded checkpoints (torch.distributed.checkpoint): layout, bf16 on one process, resume on
another number of processes, and the faults of saving, resuming and exporting. Hostile states are
made here: interrupted saves and exports, damaged checkpoint files, replayed metric lines."""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train_faults import metric_lines, train_cfg, write_shards

from unix.errors import UserError
from unix.train import checkpoint as ckpt_mod
from unix.train import parallel
from unix.train.checkpoint import checkpoints
from unix.train.trainer import Trainer, run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("ckpt") / "data")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted 4-step run, saving at 2 and 4: losses and metric lines to compare with."""
    out = tmp_path_factory.mktemp("ref") / "run"
    return out, run(train_cfg(data, out))


def losses(history):
    return [h["loss"] for h in history]


def without_timing(lines):
    return [{k: v for k, v in line.items() if k != "tokens_per_s"} for line in lines]


def test_checkpoint_holds_shards_not_a_weights_folder(reference):
    out, _ = reference
    assert [p.name for p in checkpoints(out)] == ["step-0000002", "step-0000004"]
    names = {p.name for p in (out / "checkpoints" / "step-0000004").iterdir()}
    assert {".metadata", "__0_0.distcp", "trainer.pt", "config.json", "train.json", "tokenizer.json"} <= names
    assert "model.safetensors" not in names and not any(n.startswith("vae") for n in names)
    assert (out / "final" / "model.safetensors").is_file()  # the weights folder: written once, at the end
    from unix.infer.domain import read_input_stats

    stats = read_input_stats(out / "final")  # what its training images look like, for the out-of-domain notice
    assert stats is not None and stats["n_images"] >= 2 and "train split" in stats["source"]
    assert (out / "final").stat().st_mode & 0o077 != 0  # not mkdtemp's private 0700
    state = torch.load(out / "checkpoints" / "step-0000004" / "trainer.pt", weights_only=True)
    assert state["step"] == 4 and len(state["ranks"]) == 1 and set(state["ranks"][0]) == {"data", "rng"}


def test_bf16_on_one_process_computes_in_bf16_with_fp32_masters(data, reference, tmp_path, monkeypatch):
    """precision=bf16 without torchrun: FSDP2's mixed precision on a process group of one. q/k/v
    reach attention in bf16, the weights the optimizer steps and their gradients stay fp32, the
    export is fp32, and a resumed bf16 run is bitwise the uninterrupted one."""
    seen = set()
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, *a, **kw: seen.add((q.dtype, k.dtype, v.dtype)) or sdpa(q, k, v, *a, **kw))
    grads = set()
    trainer = Trainer(train_cfg(data, tmp_path / "a", "precision=bf16"))
    try:
        trainer.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: grads.update(p.grad.dtype for g in opt.param_groups for p in g["params"] if p.grad is not None))
        history = trainer.fit()
        assert parallel.is_sharded(trainer.model) and {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    finally:
        parallel.teardown()
    assert seen == {(torch.bfloat16,) * 3} and grads == {torch.float32}
    fp32 = losses(reference[1])
    assert losses(history) != fp32 and losses(history) == pytest.approx(fp32, rel=2e-2)
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(tmp_path / "a" / "final" / "model.safetensors")).values()} == {torch.float32}
    first = run(train_cfg(data, tmp_path / "b", "precision=bf16", "steps=2"))
    rest = run(train_cfg(data, tmp_path / "b", "precision=bf16"))
    assert losses(first + rest) == losses(history)
    # on CPU `auto` keeps fp32 and no wrapper
    seen.clear()
    plain = Trainer(train_cfg(data, tmp_path / "c", "steps=1"))
    plain.fit()
    assert not parallel.is_sharded(plain.model) and seen == {(torch.float32,) * 3}


def test_interrupted_save_is_never_resumed_and_leaves_nothing(data, reference, tmp_path, monkeypatch, caplog):
    """Killed after step 4's shards were written but before the rename: step 2 is the latest, the
    partial folder (a full copy of the model and optimizer) is removed on the next start, steps 3-4
    are trained again with the same losses and logged once."""
    publish = ckpt_mod.publish

    def killed(part, folder):
        if folder.name == "step-0000004":
            raise KeyboardInterrupt
        publish(part, folder)

    monkeypatch.setattr(ckpt_mod, "publish", killed)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run(train_cfg(data, out))
    monkeypatch.undo()
    partial = out / "checkpoints" / ".step-0000004.partial"
    assert (partial / "__0_0.distcp").stat().st_size > 100_000
    assert [p.name for p in checkpoints(out)] == ["step-0000002"]
    assert [m["step"] for m in metric_lines(out)] == [1, 2, 3, 4]
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # and a line cut short by the kill
    with caplog.at_level(logging.INFO, logger="unix.train"):
        rest = run(train_cfg(data, out))
    assert "resumed from" in caplog.text and "step-0000002" in caplog.text
    assert [h["step"] for h in rest] == [3, 4] and losses(rest) == losses(reference[1])[2:]
    assert without_timing(metric_lines(out)) == without_timing(metric_lines(reference[0]))
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("damage", ["truncated shard", "garbage trainer.pt", "garbage index"])
def test_damaged_latest_checkpoint_falls_back_to_the_one_before(damage, data, reference, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    latest = out / "checkpoints" / "step-0000004"
    if damage == "truncated shard":
        shard = latest / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        (latest / ("trainer.pt" if damage == "garbage trainer.pt" else ".metadata")).write_bytes(os.urandom(512))
    with caplog.at_level(logging.WARNING, logger="unix.train"):
        again = run(train_cfg(data, out))
    assert "step-0000004 does not load" in caplog.text
    assert [h["step"] for h in again] == [3, 4] and losses(again) == losses(reference[1])[2:]
    assert (out / "checkpoints" / "step-0000004.corrupt").is_dir()  # kept aside for a look, never resumed
    assert [p.name for p in checkpoints(out)] == ["step-0000002", "step-0000004"]
    assert without_timing(metric_lines(out)) == without_timing(metric_lines(reference[0]))
    assert run(train_cfg(data, out)) == []  # the new step 4 loads: nothing left to train


def test_no_loadable_checkpoint_is_refused_and_nothing_renamed(data, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    for c in checkpoints(out):
        (c / "trainer.pt").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match=r"no checkpoint in .* loads \(step-0000004: "):
        Trainer(train_cfg(data, out))
    assert [p.name for p in checkpoints(out)] == ["step-0000002", "step-0000004"]
    # checkpoints of the earlier layout (a weights folder with train_state.pt) are refused by name
    old = tmp_path / "old"
    (old / "checkpoints" / "step-0000002").mkdir(parents=True)
    (old / "checkpoints" / "step-0000002" / "train_state.pt").write_bytes(b"")
    with pytest.raises(UserError, match="step-0000002 is a checkpoint of an earlier unix"):
        Trainer(train_cfg(data, old))


def test_export_killed_between_its_renames_is_put_right(data, reference, tmp_path, monkeypatch):
    """The old export left `.final.old` behind when killed between its two renames, and every later
    export then failed; here the next export restores or removes it, and removes staging folders."""
    from unix.infer import load_pipeline

    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    replace, calls = os.replace, []

    def killed(src, dst):
        calls.append(dst)
        if Path(dst).name == "final":  # the second rename: the new folder into place
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        run(train_cfg(data, out))  # already trained: only the export runs
    monkeypatch.undo()
    assert not (out / "final").exists() and (out / ".final.old").is_dir() and (out / ".final.partial").is_dir()
    assert run(train_cfg(data, out)) == []
    assert load_pipeline(out / "final", device="cpu")
    # killed after both renames (the old copy still there), and staging of an older writer left behind
    shutil.copytree(out / "final", out / ".final.old")
    (out / "..final.partial.x1y2z3").mkdir()
    (out / "..final.partial.x1y2z3" / "model.safetensors").write_bytes(b"half")
    for _ in range(2):  # and every later export works
        assert run(train_cfg(data, out)) == []
    assert sorted(p.name for p in out.iterdir() if "final" in p.name) == ["final"]
    assert load_pipeline(out / "final", device="cpu")


def test_export_writes_the_vae_and_tokenizer_it_holds(data, tmp_path):
    """A generation stage's export writes the VAE from the codec in memory and the tokenizer from
    the one in memory: with the VAE file gone after start-up it is still exported, equal."""
    from unix.config import load_model_config
    from unix.models.vae import LatentCodec, build_vae
    from unix.train.config import load_train_config
    from unix.weights.ldm_vae import load_ldm_vae, save_vae_safetensors

    cfg = load_model_config("tiny").vae
    torch.manual_seed(0)
    vae = tmp_path / "vae.safetensors"
    save_vae_safetensors(LatentCodec(build_vae(cfg), cfg), vae)
    stage2 = Path(__file__).resolve().parents[1] / "configs" / "train" / "phantom_stage2.yaml"
    trainer = Trainer(load_train_config(stage2, [f"data.shards={data}", f"out={tmp_path / 'g'}", "steps=1", "init=''",
                                                 f"vae={vae}", "model=tiny", "data.image_size=64", "data.token_budget=700"]))
    original = {k: v.clone() for k, v in load_ldm_vae(vae, cfg).state_dict().items()}
    vae.unlink()
    trainer.fit()
    exported = load_ldm_vae(tmp_path / "g" / "final" / "vae" / "model.safetensors", cfg).state_dict()
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)
    assert (tmp_path / "g" / "final" / "tokenizer.json").is_file()


def test_data_position_moves_between_rank_counts(data):
    """The stream state of W ranks, continued by another number of ranks: nothing of the epoch is
    missed, at most the rows faster ranks read past the slowest are read again, and 1 -> 2 -> 1
    without reading in between is exact."""
    from unix.data.dataset import RowStream

    def streams(world):
        return [RowStream(str(data), "train", 3, rank, world) for rank in range(world)]

    def read(stream, n):
        out = []
        for _ in range(n):
            stream.next()
            out.append(stream.key)
        return out

    two = streams(2)
    before = read(two[0], 7) + read(two[1], 5)
    one = RowStream(str(data), "train", 3)
    one.load_state_dict([s.state_dict() for s in two])
    after = []
    while one.epoch == 0:
        after += read(one, 1)
    after.pop()  # the first row of the next epoch
    assert set(before) | set(after) == {(s, r) for s in range(2) for r in range(20)}
    # rank 0 read positions 0, 2, ..., 12 and rank 1 1, 3, ..., 9: one stream goes on from 11, so
    # position 12 is the one row read twice
    assert len(set(before) & set(after)) == 1
    # one -> two -> one, nobody reading in between: the same rows as one stream that never stopped
    a, b = RowStream(str(data), "train", 3), RowStream(str(data), "train", 3)
    read(a, 9)
    pair = streams(2)
    for s in pair:
        s.load_state_dict([a.state_dict()])
    b.load_state_dict([s.state_dict() for s in pair])
    assert read(b, 12) == read(a, 12)
    # the same number of ranks continues exactly, rank by rank
    again = streams(2)
    for s in again:
        s.load_state_dict([t.state_dict() for t in two])
    assert [read(s, 4) for s in again] == [read(t, 4) for t in two]


HELPER = """
import sys
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from unix.train import parallel
from unix.train.config import load_train_config
from unix.train.trainer import Trainer

trainer = Trainer(load_train_config(sys.argv[1], sys.argv[3:]))  # resumes: 1 -> 2 processes
model, optim = get_state_dict(trainer.model, trainer.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
ema = trainer.ema.full(trainer.d.main)
if trainer.d.main:
    torch.save({"model": model, "optimizer": optim, "ema": ema}, sys.argv[2])
trainer.save()  # the same step again, now as two ranks' shards
parallel.teardown()
"""


def full_state(trainer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(trainer.model, trainer.optimizer)
    return {"model": model, "optimizer": optim, "ema": trainer.ema.full(True)}


def assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.slow
def test_checkpoint_moves_from_one_process_to_two_and_back(data, tmp_path):
    """Saved by one process, loaded by two (FSDP2 shards: model, optimizer and EMA bitwise what one
    process loads) and saved again as two ranks' shards, then resumed by one process: the losses are
    bitwise those of a run that was never stopped."""
    extra = ("optim.ema_decay=0.9",)
    full = run(train_cfg(data, tmp_path / "u", *extra))
    out = tmp_path / "x"
    run(train_cfg(data, out, *extra, "steps=2"))
    one = Trainer(train_cfg(data, out, *extra, "steps=2"))
    expected = full_state(one)
    (tmp_path / "helper.py").write_text(HELPER)
    cfg = Path(__file__).resolve().parents[1] / "configs" / "train" / "phantom_stage1.yaml"
    args = [f"data.shards={data}", f"out={out}", "steps=2", "save_every=2", "optim.warmup_steps=1", "optim.schedule=constant",
            "data.token_budget=700", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(tmp_path / "helper.py"),
           str(cfg), str(tmp_path / "two.pt"), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same(expected, torch.load(tmp_path / "two.pt", weights_only=True))
    step2 = out / "checkpoints" / "step-0000002"
    assert {p.name for p in step2.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    assert len(torch.load(step2 / "trainer.pt", weights_only=True)["ranks"]) == 2
    rest = run(train_cfg(data, out, *extra))
    assert [h["step"] for h in rest] == [3, 4] and losses(rest) == losses(full)[2:]
