"""Named hook points on adapter sites, with context-manager lifetimes.

Sites (per block ``l``):
- ``key``        input of W_out          ``[batch, pos, d_ff]``
- ``key_output`` output of W_out         ``[batch, pos, d_model]``
- ``block``      residual after block l  ``[batch, pos, d_model]``
- any submodule  its first input and its output (``capture_io``: per-parameter gradients, LGA)

Callbacks always see a tensor, whether the block returns a tensor or a tuple (transformers changed
this between versions), and every hook is removed in ``__exit__`` even when the forward raises.
Indices and patch values follow the activation they touch to its device and dtype, so a model whose
blocks sit on several devices (accelerate dispatch) is traced like a single-device one.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kedit.arch import ArchitectureAdapter

Index = tuple[torch.Tensor, torch.Tensor]  # (batch rows [m], positions [m]) -> gathers [m, width]


class StopForward(Exception):
    """Raised inside a hook to end the forward pass after the deepest layer that is needed."""


def block_output(output: Any) -> torch.Tensor:
    """The residual tensor of a block's output, whether the block returns a tensor or a tuple."""
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _on(index: Index, x: torch.Tensor) -> Index:
    """``index`` on ``x``'s device (no copy when already there)."""
    return index[0].to(x.device), index[1].to(x.device)


def _gather(x: torch.Tensor, index: Index | None) -> torch.Tensor:
    if index is None:
        return x
    rows, pos = _on(index, x)
    return x[rows, pos]


@contextmanager
def record_block_calls(blocks: Sequence[torch.nn.Module]) -> Iterator[list[tuple[tuple, dict]]]:
    """Within the block, every call of each of ``blocks`` appends ``(args[1:], kwargs)`` to the yielded list.

    The first positional argument (the residual stream) is left out: it is what a caller replays.
    """
    calls: list[tuple[tuple, dict]] = []
    handles = [b.register_forward_pre_hook(lambda _m, args, kwargs: calls.append((args[1:], dict(kwargs))),
                                           with_kwargs=True) for b in blocks]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


class Trace:
    """Capture and patch activations for one or more forward passes.

    >>> with Trace(adapter) as tr:
    ...     tr.capture_key(5, index)           # W_out inputs of block 5 at (rows, positions)
    ...     tr.add_to_block(3, index, delta)   # h_3[rows, positions] += delta (differentiable)
    ...     tr.stop_after(5)
    ...     tr.run(input_ids=ids, attention_mask=mask)
    >>> tr.keys[5]                              # [m, d_ff]
    """

    def __init__(self, adapter: ArchitectureAdapter, detach: bool = True):
        self.adapter = adapter
        self.detach = detach
        self.keys: dict[int, torch.Tensor] = {}
        self.key_outputs: dict[int, torch.Tensor] = {}
        self.blocks: dict[int, torch.Tensor] = {}
        self.inputs: dict[Hashable, torch.Tensor] = {}
        self.outputs: dict[Hashable, torch.Tensor] = {}
        self.calls: dict[Hashable, tuple[int, int]] = {}  # key -> (calls, extra arguments of the last call)
        self._handles: list[Any] = []
        self._stop_layer: int | None = None

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach() if self.detach else x

    # -- capture -----------------------------------------------------------------------------
    def capture_key(self, layer: int, index: Index | None = None) -> None:
        """Record W_out's input at ``layer`` (``[m, d_ff]`` with an index, else ``[B, T, d_ff]``)."""
        mod = self.adapter.w_out_modules[self.adapter.check_layer(layer)]

        def hook(_m: Any, args: tuple) -> None:
            self.keys[layer] = self._keep(_gather(args[0], index))

        self._handles.append(mod.register_forward_pre_hook(hook))

    def capture_key_output(self, layer: int, index: Index | None = None) -> None:
        """Record W_out's output at ``layer``."""
        mod = self.adapter.w_out_modules[self.adapter.check_layer(layer)]

        def hook(_m: Any, _args: tuple, out: torch.Tensor) -> None:
            self.key_outputs[layer] = self._keep(_gather(out, index))

        self._handles.append(mod.register_forward_hook(hook))

    def capture_io(self, key: Hashable, module: torch.nn.Module) -> None:
        """Record ``module``'s first positional input (``inputs[key]``, detached) and its output (``outputs[key]``).

        An output that needs no gradient (nothing upstream of it does) is replaced by a fresh leaf that does,
        with the same values: gradients w.r.t. every recorded output can then be taken without any parameter
        requiring one, and they are exact (only what is downstream of a tensor decides its gradient).
        ``calls[key]`` is ``(number of calls, arguments beyond the first in the last call)``.
        """
        def pre(_m: Any, args: tuple, kwargs: dict) -> None:
            self.inputs[key] = args[0].detach() if args and isinstance(args[0], torch.Tensor) else None
            calls = self.calls.get(key, (0, 0))[0] + 1
            self.calls[key] = (calls, len(args) - 1 + sum(isinstance(v, torch.Tensor) for v in kwargs.values()))

        def post(_m: Any, _args: tuple, out: Any) -> Any:
            if not isinstance(out, torch.Tensor):
                self.outputs[key] = None
                return None
            if not out.requires_grad and torch.is_grad_enabled():
                out = out.detach().requires_grad_()
            self.outputs[key] = self._keep(out)
            return out

        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post))

    def capture_block(self, layer: int, index: Index | None = None) -> None:
        """Record the residual stream after block ``layer``."""
        self.patch_block(layer, lambda h: self._record_block(layer, h, index))

    def _record_block(self, layer: int, h: torch.Tensor, index: Index | None) -> torch.Tensor:
        self.blocks[layer] = self._keep(_gather(h, index))
        return h

    # -- patch -------------------------------------------------------------------------------
    def patch_block(self, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace block ``layer``'s residual output ``h [B, T, d]`` by ``fn(h)``.

        Hooks on the same block run in registration order, so a capture registered after a patch
        sees the patched value.
        """
        block = self.adapter.blocks[self.adapter.check_layer(layer)]

        def hook(_m: Any, _args: tuple, out: Any) -> Any:
            return _replace_first(out, fn(block_output(out)))

        self._handles.append(block.register_forward_hook(hook))

    def add_to_block(self, layer: int, index: Index, delta: torch.Tensor) -> None:
        """``h_layer[rows, positions] += delta`` (``delta`` is ``[m, d]``; gradients flow to it)."""
        self.patch_block(layer, lambda h: h.index_put(_on(index, h), delta.to(device=h.device, dtype=h.dtype),
                                                      accumulate=True))

    def set_block(self, layer: int, index: Index, values: torch.Tensor) -> None:
        """``h_layer[rows, positions] = values`` (``values`` is ``[m, d]``)."""
        self.patch_block(layer, lambda h: h.index_put(_on(index, h), values.to(device=h.device, dtype=h.dtype)))

    def patch_key_output(self, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace W_out's output at ``layer`` by ``fn(out)`` (e.g. a fresh leaf that roots a gradient graph)."""
        mod = self.adapter.w_out_modules[self.adapter.check_layer(layer)]

        def hook(_m: Any, _args: tuple, out: torch.Tensor) -> torch.Tensor:
            return fn(out)

        self._handles.append(mod.register_forward_hook(hook))

    def patch_embeddings(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the input embeddings' output ``e [B, T, d]`` by ``fn(e)`` (e.g. noise on subject tokens)."""

        def hook(_m: Any, _args: tuple, out: torch.Tensor) -> torch.Tensor:
            return fn(out)

        self._handles.append(self.adapter.model.get_input_embeddings().register_forward_hook(hook))

    def stop_after(self, layer: int) -> None:
        """End the forward pass once block ``layer`` has run (``run`` then returns None)."""
        self._stop_layer = self.adapter.check_layer(layer)

    def run(self, **inputs: Any) -> Any:
        """Forward the model; returns its output, or None if stopped early by ``stop_after``."""
        handle = None
        if self._stop_layer is not None:
            def stop(*_: Any) -> None:
                raise StopForward

            # registered at run time so that every patch and capture on that block runs first
            handle = self.adapter.blocks[self._stop_layer].register_forward_hook(stop)
        try:
            return self.adapter.model(**{"use_cache": False, **inputs})
        except StopForward:
            return None
        finally:
            if handle is not None:
                handle.remove()
