"""Every call ulysses_sp makes into torch.distributed: collectives, process groups, the job's store.

No other module of the package imports torch.distributed (tests/unit/test_architecture.py checks
it): what the rest needs (a rank, a group's size, a timeout, a teardown) is a function here, so the
private torch APIs it relies on (``_set_pg_timeout``, ``pg_map``, ``_abort_process_group``, the
default store) sit in one file to follow when torch changes.

Shape legend: P ranks of ``group``; collectives work on dim 0 unless a ``dim`` says otherwise.

The differentiable collectives are torch's functional collectives (``all_to_all_single_autograd``):
they trace under ``torch.compile(fullgraph=True)`` and their backward is the inverse collective. An
``autograd.Function`` that fills a pre-allocated buffer gave silent zero gradients under compile in
DeepSpeed (#8491); functional collectives do not have that hazard.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

#: types for annotations elsewhere, so that no other module imports torch.distributed
ProcessGroup = dist.ProcessGroup
Mesh = DeviceMesh
#: the base of the errors torch.distributed raises, for failure reports
DistError = dist.DistError

# torch >= 2.13 names the dim-0 all-gather *_single; older releases call it *_tensor
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def _wait(t: torch.Tensor) -> torch.Tensor:
    # Functional collectives return AsyncCollectiveTensor outside compile; materialise so callers can
    # view/split the result freely.
    return funcol.wait_tensor(t) if isinstance(t, funcol.AsyncCollectiveTensor) else t


# --- the world and its groups ------------------------------------------------------------------


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group: ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (None: the world)."""
    return dist.get_rank(group)


def world_size(group: ProcessGroup | None = None) -> int:
    """The number of ranks of ``group`` (None: the world)."""
    return dist.get_world_size(group)


def backend() -> str:
    """The world's backend, e.g. "nccl", "gloo" or "cpu:gloo,cuda:nccl"."""
    return str(dist.get_backend())


def world_group() -> ProcessGroup:
    return dist.group.WORLD


def init_world(backend_name: str, timeout: timedelta, device: torch.device | None = None) -> None:
    """Join the job whose rendezvous the environment describes (RANK, WORLD_SIZE, MASTER_ADDR, ...).
    ``device``: the CUDA device an NCCL process group binds to."""
    kwargs = {"device_id": device} if device is not None else {}
    dist.init_process_group(backend_name, timeout=timeout, **kwargs)


def init_single_process_world() -> None:
    """A world of one gloo rank with an in-memory store (nothing to rendezvous with)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def destroy_world() -> None:
    """Destroy every process group (waits for nothing on gloo; NCCL finishes its queued work)."""
    dist.destroy_process_group()


def abort_world() -> None:
    """Abort every process group without waiting for collectives that will never complete (NCCL)."""
    dist.distributed_c10d._abort_process_group()


def device_mesh(device_type: str, shape: tuple[int, ...], names: tuple[str, ...]) -> Mesh:
    """A DeviceMesh over the world (collective: every rank calls it with the same arguments)."""
    return init_device_mesh(device_type, shape, mesh_dim_names=names)


def flatten_mesh(mesh: Mesh, dims: tuple[str, ...], name: str) -> Mesh:
    """The 1-D mesh ``name`` over the adjacent dims ``dims`` of ``mesh`` (row-major: the last dim
    innermost), also reachable as ``mesh[name]``. Collective when it creates the group."""
    return mesh[dims]._flatten(name)


def self_group() -> ProcessGroup:
    """A process group holding only this rank. Collective: every rank must call it (each gets its own)."""
    group, _ = dist.new_subgroups(group_size=1)
    return group


def group_timeout(group: ProcessGroup | None = None) -> timedelta | None:
    """The collective timeout of ``group`` (None: the world's), or None when the backend does not say."""
    group = group if group is not None else dist.group.WORLD
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout
        except (RuntimeError, AttributeError):
            continue
    return None


def set_group_timeout(group: ProcessGroup, timeout: timedelta) -> None:
    """Set the collective timeout of ``group``. torch gives a new group the backend's default (30 min
    for gloo, 10 for NCCL), not the timeout the world group was created with."""
    dist.distributed_c10d._set_pg_timeout(timeout, group)


def set_all_group_timeouts(timeout: timedelta) -> None:
    """Give every process group of this process the collective timeout ``timeout`` (groups made by
    libraries, e.g. DeepSpeed, get the backend default otherwise)."""
    for group in list(dist.distributed_c10d._world.pg_map):
        set_group_timeout(group, timeout)


def job_store(timeout: timedelta):
    """The job's rendezvous key-value store with ``timeout`` for its calls; None when there is no
    process group or the store cannot be reached (it died with its host)."""
    if not is_initialized():
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timeout)
        return store
    except (RuntimeError, OSError, ValueError):
        return None


# --- collectives ---------------------------------------------------------------------------------


def all_to_all(
    x: torch.Tensor,
    group: ProcessGroup,
    out_splits: list[int] | None = None,
    in_splits: list[int] | None = None,
) -> torch.Tensor:
    """Differentiable all-to-all over dim 0: chunk ``r`` of ``x`` goes to rank ``r`` of ``group``."""
    return _wait(funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group))


def all_gather(x: torch.Tensor, group: ProcessGroup, dim: int = 0) -> torch.Tensor:
    """All-gather of equally shaped tensors, concatenated along ``dim`` in rank order. No autograd."""
    out = _wait(_all_gather(x.detach().contiguous(), 0, group))  # [P * x.shape[0], ...]
    if dim != 0:
        out = torch.cat(out.chunk(dist.get_world_size(group), dim=0), dim=dim)
    return out


def all_reduce(x: torch.Tensor, group: ProcessGroup | None, op: str = "sum") -> torch.Tensor:
    """Out-of-place all-reduce (``op``: sum, max, min, avg) over ``group`` (None: the world). No autograd."""
    group = group if group is not None else dist.group.WORLD
    x = x.detach()  # torch >= 2.13 collectives carry autograd; these helpers never should
    if op == "avg":  # gloo has no AVG
        return _wait(funcol.all_reduce(x, "sum", group)) / dist.get_world_size(group)
    return _wait(funcol.all_reduce(x, op, group))


def broadcast(x: torch.Tensor, src: int = 0, group: ProcessGroup | None = None) -> torch.Tensor:
    """Out-of-place broadcast of ``x`` from global rank ``src``. No autograd."""
    return _wait(funcol.broadcast(x.detach().contiguous(), src, group if group is not None else dist.group.WORLD))


def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Make every parameter of ``module`` rank ``src``'s, in place (every rank built it from the same
    seed; this makes it bit-identical whatever the initialisation did)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(broadcast(p.detach(), src=src))


def all_reduce_autograd_sum(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Differentiable sum over the group: forward all-reduce, backward all-reduce of the gradient.

    The backward sums the upstream gradients of every rank, which is right when each rank's
    upstream gradient is its own share of a loss (see loss/causal_lm.py for the gradient convention).
    """
    return _SumAllReduce.apply(x, group)


class _SumAllReduce(torch.autograd.Function):
    # Out-of-place functional collectives on both passes (never writes into a saved buffer).
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _wait(funcol.all_reduce(x, "sum", group))

    @staticmethod
    def backward(ctx, grad):
        return _wait(funcol.all_reduce(grad.contiguous(), "sum", ctx.group)), None


def ring_shift(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Start passing ``x`` to the next rank of ``group`` (rank + 1 mod P) while receiving the previous
    rank's, every rank sending the same numel; returns [x.numel()] to :func:`wait` on, so the caller
    computes while the block is in flight. torch's functional ``permute_tensor`` (no autograd: ring
    attention calls it inside its own forward and backward), traceable by torch.compile."""
    P = dist.get_world_size(group)
    return funcol.permute_tensor(x.reshape(-1).contiguous(), [(r + 1) % P for r in range(P)], group)


def wait(x: torch.Tensor) -> torch.Tensor:
    """The result of an asynchronous collective of this module (e.g. :func:`ring_shift`), completed."""
    return _wait(x)


def barrier(group: ProcessGroup | None = None) -> None:
    dist.barrier(group=group)


def all_gather_object(obj, group: ProcessGroup | None = None) -> list:
    """Gather one picklable object per rank (setup/debug checks only)."""
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


# --- sharded parameters (FSDP2) and their checkpoints ------------------------------------------


def fully_shard(
    module: torch.nn.Module | list[torch.nn.Module],
    mesh: Mesh,
    *,
    reshard_after_forward: bool,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype | None,
    cast_forward_inputs: bool = True,
):
    """torch's FSDP2 over ``mesh`` (1-D: parameters sharded on dim 0 over its ranks); a list groups
    modules into one unit (one all-gather, one reduce-scatter). Gradients are averaged over the mesh.
    ``cast_forward_inputs``: the unit casts its floating-point forward inputs to ``param_dtype``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    policy = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=cast_forward_inputs
    )
    return torch_fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)


def is_fsdp_module(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (a parameter or gradient sharded by FSDP2 or tensor parallelism)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (collective over its mesh); ``t`` itself otherwise."""
    return t.full_tensor() if is_sharded(t) else t


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``{"model": ..., "optimizer": ...}`` keyed by parameter names, each rank holding its shards:
    what :func:`save_sharded` writes and any world size can read back."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def full_model_state(model: torch.nn.Module) -> dict:
    """The whole state dict of a model with DTensor parameters, on CPU, keyed by parameter names, on
    rank 0; the other ranks get an empty dict (torch's rule, so that no rank but one holds a copy).
    Collective: each parameter is all-gathered."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Put a :func:`sharded_state` (filled by :func:`load_sharded`) back into the model and optimizer."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def save_sharded(state: dict, path: str) -> None:
    """torch.distributed.checkpoint: every rank writes its shards under ``path`` (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=path)


def load_sharded(state: dict, path: str) -> None:
    """Fill ``state`` (the layout of this run, e.g. :func:`sharded_state`) in place from ``path``,
    resharded to this run's world size (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.load(state, checkpoint_id=path)
