"""Per-call instrumentation of a model's blocks and edited matrices.

Editing needs forward passes that differ from the served model in small ways: read the input of
the edited matrices (the keys), run the edited layers on the original weights W0, stop after a
given block, or skip the lower blocks and start from a cached hidden state plus a trainable
delta (the z* optimisation). :func:`instrument` wraps each block's and each edited matrix's
``forward`` once; a :class:`Trace` activated with ``with trace:`` changes only the forward passes
run inside that block of code, in that thread. Passes outside any trace (generation) run the model
unchanged, so the serving model can be shared with an edit in progress.

The same wrappers consult the keyed memory (``editing.keyed_memory``): an untraced pass reads the
memory installed on the model (:func:`set_memory`), a traced pass only the one its trace names
(none by default, so that keys, z* and the covariance are always computed without it).
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from editing.adapters import Adapter
from editing.keyed_memory import Hit, KeyedMemory

_ACTIVE: contextvars.ContextVar[Trace | None] = contextvars.ContextVar("trace", default=None)
_MARK = "_editserve_instrumented"
_SLOT = "_editserve_memory"


class _MemorySlot:
    """The memory that a model's untraced passes consult; swapped by assigning ``memory``."""

    memory: KeyedMemory | None = None


# A pass's matches, from the first edited matrix to the last edited block's output; a forward
# pass runs in one thread, and another thread's pass must not see them.
_pending = threading.local()


class StopForward(Exception):
    """Raised inside a traced forward pass once everything asked for has been recorded."""


@dataclass
class Trace:
    """What one traced forward pass should record or change.

    capture_inputs: layers whose edited-matrix input is recorded in ``inputs`` (B x T x in).
    weights: layer -> ``out x in`` weight used instead of the module's own (e.g. W0).
    capture_block: a block whose output is recorded in ``block_output`` (B x T x hidden).
    stop_after: raise :class:`StopForward` after this block ran (skip the rest of the model).
    start_after: skip blocks ``0..start_after``; block ``start_after`` returns
        ``replace_output()`` instead of running.
    memory: the keyed memory this pass consults (a planned change's, to score it before it is
        installed); None, the default, runs without one.
    """

    capture_inputs: frozenset[int] = frozenset()
    weights: dict[int, torch.Tensor] = field(default_factory=dict)
    capture_block: int | None = None
    stop_after: int | None = None
    start_after: int | None = None
    replace_output: Callable[[], torch.Tensor] | None = None
    memory: KeyedMemory | None = None
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    block_output: torch.Tensor | None = None
    _token: contextvars.Token[Trace | None] | None = None

    def __enter__(self) -> Trace:
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        assert self._token is not None
        _ACTIVE.reset(self._token)
        self._token = None
        # A StopForward ends the pass as planned; swallow it so callers need no try/except.
        return exc_type is StopForward


def instrument(model: nn.Module, adapter: Adapter) -> None:
    """Wrap every block and edited matrix of ``model`` (idempotent)."""
    if getattr(model, _MARK, False):
        return
    slot = _MemorySlot()
    for index, block in enumerate(adapter.blocks(model)):
        _wrap_block(block, index, slot)
        _wrap_matrix(adapter.matrix_module(model, index), index, slot)
    setattr(model, _SLOT, slot)
    setattr(model, _MARK, True)


def set_memory(model: nn.Module, memory: KeyedMemory | None) -> None:
    """Make ``memory`` the one ``model``'s untraced passes consult (one assignment: a pass
    already running finishes with the memory it started with)."""
    slot = getattr(model, _SLOT, None)
    if slot is None:
        raise ValueError("the model is not instrumented (editing.tracing.instrument)")
    slot.memory = memory


def installed_memory(model: nn.Module) -> KeyedMemory | None:
    slot = getattr(model, _SLOT, None)
    return slot.memory if slot is not None else None


def _matched(output: Any, index: int, memory: KeyedMemory | None) -> Any:
    """A block's ``output`` with the memory's values added where the pass matched its keys."""
    if memory is None or memory.value_layer != index:
        return output
    hit: Hit | None = getattr(_pending, "hit", None)
    _pending.hit = None
    if hit is None or hit.memory is not memory:
        return output
    hidden = memory.add(_hidden_of(output), hit)
    return _with_hidden(None if isinstance(output, torch.Tensor) else output, hidden)


def _hidden_of(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _with_hidden(template: Any, hidden: torch.Tensor) -> Any:
    """A block output shaped like ``template`` (None: a bare tensor) holding ``hidden``."""
    if template is None:
        return hidden
    return (hidden, *template[1:])


def _wrap_block(block: nn.Module, index: int, slot: _MemorySlot) -> None:
    original = block.forward
    # The latest real output, as a template for the structure (tensor or tuple) of a skipped
    # block's output; transformers 5 blocks return a tensor, older ones a tuple.
    template: list[Any] = [None]

    def forward(*args: Any, **kwargs: Any) -> Any:
        trace = _ACTIVE.get()
        if trace is None:
            return _matched(original(*args, **kwargs), index, slot.memory)
        if trace.start_after is not None and index <= trace.start_after:
            if index < trace.start_after:
                # Skipped: its output is never read, since block start_after replaces it.
                hidden_in = args[0] if args else kwargs["hidden_states"]
                return _with_hidden(template[0], hidden_in)
            assert trace.replace_output is not None
            output: Any = _with_hidden(template[0], trace.replace_output())
        else:
            output = original(*args, **kwargs)
            template[0] = None if isinstance(output, torch.Tensor) else (None, *output[1:])
            output = _matched(output, index, trace.memory)
        if trace.capture_block == index:
            trace.block_output = _hidden_of(output)
        if trace.stop_after == index:
            raise StopForward
        return output

    block.forward = forward


def _wrap_matrix(module: nn.Module, index: int, slot: _MemorySlot) -> None:
    original = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        trace = _ACTIVE.get()
        memory = slot.memory if trace is None else trace.memory
        if memory is not None and memory.key_layer == index:
            _pending.hit = memory.match(x)
        if trace is None:
            return original(x)
        if index in trace.capture_inputs:
            trace.inputs[index] = x.detach()
        weight = trace.weights.get(index)
        if weight is None:
            return original(x)
        bias = getattr(module, "bias", None)
        out = x @ weight.to(x.dtype).T
        return out if bias is None else out + bias

    module.forward = forward
