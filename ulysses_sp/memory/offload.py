"""Checkpoint offload: each checkpointed layer's input, the tensor its checkpoint saves for the
recomputation, lives in host memory between the forward and the backward.

Shape legend: B batch, s = S/P local tokens, d hidden size.

The input [B, s, d] goes to host memory when the forward saves it and comes back when the backward
recomputes the layer. On CUDA the device-to-host copy runs on a side stream into pinned memory (the
compute stream does not wait for it); the copy back runs on the compute stream right before the
layer's recomputation. It
removes the checkpoint stack (2d bytes per token and layer, all layers) from the device and costs
host memory of the same size. Scoped to the model's own layers; activation_checkpointing.py turns
it on (``enable_checkpointing(..., offload=True)``) and off (``disable_checkpointing``).
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch


def offload_layer_inputs(layers: list[torch.nn.Module]) -> None:
    """Wrap the checkpoint function of each of ``layers`` (transformers' ``GradientCheckpointingLayer``s
    with checkpointing on) so that the input it saves goes to host memory."""
    streams: dict[torch.device, torch.cuda.Stream] = {}  # one side stream per CUDA device, shared by the layers
    for layer in layers:
        layer._gradient_checkpointing_func = OffloadLayerInput(layer._gradient_checkpointing_func, streams)


def restore_layer_inputs(layers: list[torch.nn.Module]) -> None:
    """Undo :func:`offload_layer_inputs` where it was applied."""
    for layer in layers:
        if isinstance(layer._gradient_checkpointing_func, OffloadLayerInput):
            layer._gradient_checkpointing_func = layer._gradient_checkpointing_func.checkpoint_fn


class _HostCopy(NamedTuple):
    host: torch.Tensor  # the saved tensor's copy in host memory (pinned on CUDA)
    device: torch.device  # where it goes back to
    copied: torch.cuda.Event | None  # the device-to-host copy's completion on its side stream (CUDA only)


class OffloadLayerInput:
    """A layer's checkpoint function that keeps the layer input, the tensor the checkpoint saves for
    the recomputation, in host memory: the ``saved_tensors_hooks`` below see what the checkpoint
    saves outside its own hooks (its inputs); only ``args[0]`` (hidden states [B, s, d]) moves."""

    def __init__(self, checkpoint_fn, streams: dict):
        self.checkpoint_fn = checkpoint_fn
        self.streams = streams  # one side stream per CUDA device, shared by the model's layers

    def __call__(self, function, *args, **kwargs):
        hidden = args[0] if args else None
        if not (torch.is_tensor(hidden) and torch.is_grad_enabled()):
            return self.checkpoint_fn(function, *args, **kwargs)

        # autograd keeps a saved tensor's pack hook alive with it: a closure over ``hidden`` itself
        # would hold the device tensor until the layer's backward, the memory the offload frees
        hidden_ref = weakref.ref(hidden)

        def pack(t: torch.Tensor):
            return self._to_host(t) if t is hidden_ref() else t

        with torch.autograd.graph.saved_tensors_hooks(pack, _from_host):
            return self.checkpoint_fn(function, *args, **kwargs)

    def _to_host(self, t: torch.Tensor) -> _HostCopy:
        t = t.detach()
        if t.device.type != "cuda":  # a real copy, so that the CPU tests run this path
            return _HostCopy(t.clone(), t.device, None)
        stream = self.streams.get(t.device)
        if stream is None:
            stream = self.streams[t.device] = torch.cuda.Stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))  # t is complete
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(stream)  # the allocator keeps t's memory until the copy is done
        return _HostCopy(host, t.device, stream.record_event())


def _from_host(saved):
    if not isinstance(saved, _HostCopy):
        return saved
    if saved.copied is None:
        return saved.host
    torch.cuda.current_stream(saved.device).wait_event(saved.copied)
    return saved.host.to(saved.device, non_blocking=True)
