"""Replaying a fixed-shape inference step: a denoising step of an image, a decoded token.

Such a step is a function `fn(state, *args)`: `state` holds what was built once per sampling call
(the model, the KV cache, the layout tables, device-side counters), `args` are tensors of fixed
shapes. It does tensor work only: no host syncs, no shapes that change, no new plans. That is what
lets it run as one captured unit instead of hundreds of Python-dispatched operations:

- "graph": recorded once into a CUDA graph, then replayed (CUDA only);
- "compile": `torch.compile(fullgraph=True)` (on CUDA with mode "reduce-overhead", which also
  replays CUDA graphs); compiled once per process and shape, reused by every later call;
- "eager": run as it is;
- "auto" (`ModelConfig.step_capture`'s default): "graph" on CUDA, "eager" elsewhere, where a first
  compile costs more than a sampling call saves.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

# A compiled step is specialised to its shapes, and the KV cache's length follows the prompt's: in
# "compile" mode the cache is made a multiple of this many columns, so prompts of other lengths
# reuse one compile (the extra columns are padding, masked out).
COMPILE_LENGTH_MULTIPLE = 128
WARMUP_RUNS = 1  # eager runs on a side stream before a CUDA graph is recorded (lazy initialisation)


def capture_mode(setting: str, device: torch.device) -> str:
    """The mode a step runs in: "graph", "compile" or "eager"."""
    if setting == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if setting == "graph" and device.type != "cuda":
        raise ValueError(f"step_capture=graph records CUDA graphs; the model is on {device.type} (use compile or eager)")
    return setting


def cache_length(needed: int, mode: str) -> int:
    """Columns of a KV cache that holds `needed` tokens, for a step run in `mode`."""
    if mode != "compile":
        return needed
    return -(-needed // COMPILE_LENGTH_MULTIPLE) * COMPILE_LENGTH_MULTIPLE


def captured(fn: Callable, state, args: tuple[torch.Tensor, ...], mode: str) -> Callable:
    """A callable `run(*args) -> fn(state, *args)` for new values of `args` (same shapes and dtypes).

    With a CUDA graph the result is the graph's own output buffer: read it (or copy it) before the
    next call. The first call of a graph or a compile also runs `fn`, so `fn` must be safe to repeat
    with the same inputs (a step writes only cache columns that its real run rewrites)."""
    if mode == "eager":
        return functools.partial(fn, state)
    if mode == "compile":
        device = args[0].device.type
        if device == "cuda":  # the state's tensors stay where they are between replays: no copy-in per replay
            for t in state_tensors(state):
                torch._dynamo.mark_static_address(t)
        return _steady(_compiled(fn, device), state)
    if mode == "graph":
        return _cuda_graph(fn, state, args)
    raise ValueError(f"unknown capture mode {mode!r} (graph, compile, eager)")


def state_tensors(state) -> list[torch.Tensor]:
    """Every tensor the state holds (cache, tables, plans, counters), found through its attributes,
    lists and tuples; modules are skipped (their parameters are static already)."""
    found, seen, todo = [], set(), [state]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, torch.nn.Module):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, (list, tuple)):
            todo.extend(obj)
        elif hasattr(obj, "__dict__"):
            todo.extend(vars(obj).values())
    return found


@functools.cache
def _compiled(fn: Callable, device: str) -> Callable:
    """One compiled wrapper per step function and device: the compiled code is cached on it and
    guarded by shapes, so a new sampling call with the same shapes does not compile again."""
    mode = "reduce-overhead" if device == "cuda" else None
    return torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)


def _steady(compiled: Callable, state) -> Callable:
    """The compiled step with its guards checked in full at the first call only. Between steps of
    one sampling call the state is the same object with the same tensors, so later calls check
    only the guards that tell the compiled variants apart (torch.compile's skip_guard_eval_unsafe
    stance, made for such steady loops; checking ~700 tensors per step costs ~1 ms on a CPU)."""
    checked = False

    def run(*args):
        nonlocal checked
        if not checked:
            checked = True
            return compiled(state, *args)
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            return compiled(state, *args)

    return run


def _cuda_graph(fn: Callable, state, args: tuple[torch.Tensor, ...]) -> Callable:
    inputs = [a.clone() for a in args]  # the graph's fixed input buffers
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_RUNS):
            fn(state, *inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn(state, *inputs)

    def replay(*new: torch.Tensor):
        for buffer, value in zip(inputs, new):
            buffer.copy_(value)
        graph.replay()
        return output

    return replay
