"""Where a step's forward + backward peak goes: the allocations live at that moment, by what made them.

Method: one extra forward + backward after the timed steps runs under a ``TorchDispatchMode``.
After every op the mode names the storages the op created (not views or in-place results):

    phase  where            op           shape           dtype
    fwd    layers.*.mlp     aten.mm      [s, 14336]      bf16     forward, module by forward hooks
    rec    layers.*.mlp     ...                                   a checkpoint's recomputation
    bwd    MmBackward0      ...                                   backward, by the autograd node

(``s``: a dimension equal to this rank's token count, so that one site matches across lengths;
layer indices are written ``*``, so a site sums over layers.) Whenever the allocated bytes pass their
maximum so far by ``RESOLUTION``, the allocator's live blocks (``torch.cuda.memory_snapshot``) are
read and summed by name: blocks that existed before the step are "before the step" (weights,
gradients, optimizer state), blocks no op made (NCCL, the allocator's rounding) "unlabelled". The
op with the highest peak *inside* it is kept too (its workspace, freed when it returns, is in no
snapshot). Two lengths of one configuration give each site's growth per token (``slopes``).
On a CPU the storages the ops made are counted instead (``TrackingAllocator``): the same names and
tensors, no kernel workspace, no allocator rounding; a quick proxy for a GPU's breakdown.

The mode itself changes one thing: while a dispatch mode is active, autograd adds each gradient to
the one already accumulated for a tensor out of place (a new tensor), where an untracked backward
adds in place; gradient sums in progress therefore show one [s, d] tensor more than a plain step
holds (docs/performance.md 4e). The timed steps' peaks are the measure.

The labels come from torch's dispatcher, so compiled layers (Inductor's kernels are opaque to it)
are not measured; torch's own allocation recorder, which would name Python frames, fails under
checkpointing with custom autograd Functions on torch 2.11 (pytorch #179536).

Shape legend: s local tokens of the step (B * S / P).
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

#: on a GPU the allocated bytes must pass their maximum so far by this much before the blocks are read again
RESOLUTION = 32 << 20
#: sites kept per measurement (the rest are summed as "other")
TOP = 30
#: the allocator's rounding of a block above the bytes it was asked for (2 MiB pages of large blocks)
STALE_SLACK = 2 << 20
BEFORE = "before the step"
UNLABELLED = "unlabelled"
_LAYER_INDEX = re.compile(r"\.\d+(?=\.|$)")
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64", torch.bool: "bool"}


def shape_label(shape: torch.Size, tokens: int) -> str:
    """``[1, 32, 65536, 128]`` with 65536 tokens -> ``[1, 32, s, 128]``."""
    return "[" + ", ".join("s" if n == tokens and tokens > 1 else str(n) for n in shape) + "]"


def _address(t: torch.Tensor) -> int | None:
    """The data address of a tensor's storage; None for a tensor without one of its own (a wrapper
    subclass such as an in-flight collective's result, a meta or fake tensor)."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


class CudaAllocator:
    """What the mode reads of torch's CUDA caching allocator on one device."""

    track = None  # the allocator knows its blocks itself
    resolution = RESOLUTION  # reading the blocks costs a walk over all segments

    def __init__(self, device: torch.device):
        self.device = device

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def live_blocks(self) -> dict[int, int]:
        """address -> size of every allocated block on the device."""
        out = {}
        for segment in torch.cuda.memory_snapshot():
            if segment["device"] != self.device.index:
                continue
            for block in segment["blocks"]:
                if block["state"] == "active_allocated":
                    out[block["address"]] = block["size"]
        return out


class TrackingAllocator:
    """Any device (CPU runs): the storages the mode saw ops make, each counted while it holds memory
    (a weakref on the storage, read at each count: a storage can outlive its memory, as FSDP2's
    ``resize_(0)`` of gathered parameters does). Workspace inside an op is not seen, so the peak
    inside an op is the level after it; nothing made before the step is counted."""

    resolution = 1  # its blocks are a dict: read at every new maximum

    def __init__(self):
        self.storages: dict[int, weakref.ref] = {}  # address -> the newest storage made there

    def track(self, storage: torch.UntypedStorage) -> None:
        if storage.nbytes():
            self.storages[storage.data_ptr()] = weakref.ref(storage)

    def live_blocks(self) -> dict[int, int]:
        out = {}
        for address, ref in list(self.storages.items()):
            storage = ref()
            if storage is None or storage.nbytes() == 0 or storage.data_ptr() != address:
                del self.storages[address]  # freed, resized to nothing, or moved
            else:
                out[address] = storage.nbytes()
        return out

    def allocated(self) -> int:
        return sum(self.live_blocks().values())

    def reset_peak(self) -> None:
        pass

    def peak(self) -> int:
        return 0  # nothing allocated inside an op is seen: the mode takes the level after it


class SiteMode(TorchDispatchMode):
    """Names the storages every op creates and keeps the live blocks at the highest allocation
    (module docstring). ``scope``: the module stack, kept by the caller's forward hooks."""

    def __init__(self, allocator, device: torch.device, tokens: int, scope: list[str]):
        super().__init__()
        self.allocator, self.device, self.tokens, self.scope = allocator, device, tokens, scope
        self.maker: dict[int, tuple[str, int]] = {}  # storage address -> (the site that made it, its bytes)
        self.before = allocator.live_blocks()
        self.best, self.at_best = allocator.allocated(), dict(self.before)
        self.inside_best, self.inside_op = 0, None

    def _where(self) -> tuple[str, str]:
        if torch._C._current_graph_task_id() == -1:
            return "fwd", self.scope[-1] if self.scope else "model"
        if torch.is_grad_enabled():  # the engine runs backward ops without grad mode, a recomputation with it
            return "rec", self.scope[-1] if self.scope else "model"
        node = torch._C._current_autograd_node()
        return "bwd", type(node).__name__ if node is None else node.name()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        before = self.allocator.allocated()
        self.allocator.reset_peak()
        out = func(*args, **kwargs)
        inputs = {_address(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        phase, where = self._where()
        op = str(func.overloadpacket)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device == self.device:
                address = _address(t)
                if address is not None and address not in inputs:
                    storage = t.untyped_storage()
                    dtype = _DTYPES.get(t.dtype, str(t.dtype).removeprefix("torch."))
                    name = f"{phase} {where} {op} {shape_label(t.shape, self.tokens)} {dtype}"
                    self.maker[address] = (name, storage.nbytes())
                    if self.allocator.track is not None:
                        self.allocator.track(storage)
        now = self.allocator.allocated()
        inside = max(self.allocator.peak(), now)
        if inside > self.inside_best:
            self.inside_best = inside
            self.inside_op = (f"{phase} {where} {op}", inside - before)
        if now >= self.best + self.allocator.resolution:
            self.best, self.at_best = now, self.allocator.live_blocks()
        return out

    def summary(self) -> dict:
        sites: dict[str, list[int]] = {}
        for address, size in self.at_best.items():
            made = self.maker.get(address)
            if made is None:
                name = BEFORE if address in self.before else UNLABELLED
            elif size > made[1] + max(made[1] // 4, STALE_SLACK):
                # a block larger than the storage named at its address: something the mode did not see
                # (an op's internal allocation, the autograd engine's) reused the address since
                name = f"{UNLABELLED} (last named there: {made[0]})"
            else:
                name = made[0]
            entry = sites.setdefault(name, [0, 0])
            entry[0] += size
            entry[1] += 1
        ranked = sorted(sites.items(), key=lambda kv: -kv[1][0])
        rest = ranked[TOP:]
        ranked = ranked[:TOP] + ([("other", [sum(v[0] for _, v in rest), sum(v[1] for _, v in rest)])] if rest else [])
        label, own = self.inside_op or ("-", 0)
        return {
            "tokens": self.tokens,
            "resolution_bytes": self.allocator.resolution,
            "state_peak_bytes": self.best,
            "peak_inside_op_bytes": self.inside_best,
            "peak_inside_op": {"op": label, "own_bytes": own},
            "sites": [{"site": name, "bytes": b, "blocks": n} for name, (b, n) in ranked],
        }


@contextlib.contextmanager
def module_scope(model: torch.nn.Module):
    """Yields the stack of the modules whose forward is running (names with layer indices as ``*``),
    kept by global forward hooks while the context is open."""
    names = {m: _LAYER_INDEX.sub(".*", name) or "model" for name, m in model.named_modules()}
    scope: list[str] = []

    def enter(module, _args):
        scope.append(names.get(module, type(module).__name__))

    def leave(module, _args, _out):
        if scope:
            scope.pop()

    hooks = [
        torch.nn.modules.module.register_module_forward_pre_hook(enter),
        torch.nn.modules.module.register_module_forward_hook(leave, always_call=True),
    ]
    try:
        yield scope
    finally:
        for h in hooks:
            h.remove()


def measure(fn: Callable[[], object], model: torch.nn.Module, device: torch.device, tokens: int) -> dict:
    """Run ``fn`` (a forward + backward of ``model``) once and return where its peak went (module
    docstring): on a GPU by CUDA's allocator, elsewhere by :class:`TrackingAllocator`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        allocator = CudaAllocator(device)
    else:
        allocator = TrackingAllocator()
    with module_scope(model) as scope, SiteMode(allocator, device, tokens, scope) as mode:
        fn()
    return mode.summary()


def slopes(runs: list[dict]) -> list[dict]:
    """Per configuration measured at two or more lengths: each site's growth in bytes per token between
    the shortest and the longest (a site absent at one length counts 0 there), largest first."""
    by_config: dict[str, list[dict]] = {}
    for r in runs:
        if r.get("status") == "ok" and r.get("memory_sites"):
            by_config.setdefault(r["config"], []).append(r["memory_sites"])
    out = []
    for config, measured in by_config.items():
        if len(measured) < 2:
            continue
        short, long = min(measured, key=lambda m: m["tokens"]), max(measured, key=lambda m: m["tokens"])
        dt = long["tokens"] - short["tokens"]
        if dt <= 0:
            continue
        a = {x["site"]: x["bytes"] for x in short["sites"]}
        b = {x["site"]: x["bytes"] for x in long["sites"]}
        per_site = sorted(
            ((site, (b.get(site, 0) - a.get(site, 0)) / dt) for site in a.keys() | b.keys()),
            key=lambda x: (-x[1], x[0]),
        )
        out.append(
            {
                "config": config,
                "tokens": [short["tokens"], long["tokens"]],
                "state_peak_bytes_per_token": (long["state_peak_bytes"] - short["state_peak_bytes"]) / dt,
                "peak_inside_op_bytes_per_token": (long["peak_inside_op_bytes"] - short["peak_inside_op_bytes"]) / dt,
                "sites": [{"site": s, "bytes_per_token": v} for s, v in per_site],
            }
        )
    return out
