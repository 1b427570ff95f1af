"""Trainer checkpoints: what a resumed run needs to continue the loss curve exactly.

Layout of ``--save-dir DIR`` (one directory per saved step)::

    DIR/latest                       name of the newest complete step directory
    DIR/step_00000300/trainer.json   step, topology, engine, run settings, data-loader position;
                                     written last: a directory without it is incomplete
    DIR/step_00000300/rng/dp_00000.pt   random streams of DP group 0 (the same on its SP ranks)
    DIR/step_00000300/torch_engine.pt   torch engine: model, optimizer, scheduler (replicated state)
    DIR/step_00000300/deepspeed/state/  DeepSpeed engine: engine.save_checkpoint (ZeRO shards per rank)
    DIR/step_00000300/fsdp2/            FSDP2 engine: torch.distributed.checkpoint (every rank's shards)

Resuming at another SP size (docs/checkpointing.md):

* torch engine: any sp / dp / world size (the state is the same on every rank);
* FSDP2: any sp / dp / world size (torch.distributed.checkpoint reshards on load);
* DeepSpeed: the same world size and ZeRO stage load natively, whatever the sp x dp split (ZeRO
  partitions over all ranks); a stage-0 fp32 checkpoint (no ZeRO shards) loads at any world size;
  otherwise convert once with DeepSpeed's universal checkpoint tool, into ``deepspeed/universal``
  (the error message gives the command), and resume again;
* the data position maps to another dp_size / batch size when batch_size x dp_size divides the
  samples consumed in the epoch (:meth:`ulysses_sp.SPDataLoader.load_state_dict`);
* random streams are restored exactly at the same dp_size, and re-seeded from (seed, step)
  otherwise (a warning: dropout masks then differ from an uninterrupted run).
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from dataclasses import dataclass

import torch

from ..core import comm
from ..core.layout import ring_size_of
from ..core.rng import derive_seed, get_rng_state, set_rng_state, sync_rng
from .engines import DEEPSPEED_DIR, NATIVE_TAG, UNIVERSAL_TAG

FORMAT = 1
META_FILE = "trainer.json"
LATEST_FILE = "latest"
#: run settings a resumed run must share with the saved one (the data order and the model depend on them)
RUN_KEYS = ("seed", "seq_len", "pack", "heldout_fraction")
#: config entries that do not change the model's parameters or computation
_CONFIG_IGNORED = {
    "_attn_implementation_internal",
    "_attn_implementation",
    "transformers_version",
    "_name_or_path",
    "dtype",
    "torch_dtype",
    "architectures",
    "use_cache",
    "_commit_hash",
}


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint directory and its ``trainer.json``."""

    path: str
    meta: dict

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def step_dir(save_dir: str, step: int) -> str:
    return os.path.join(save_dir, f"step_{step:08d}")


def find_checkpoint(path: str) -> Checkpoint:
    """The checkpoint at ``path``: a step directory, or a ``--save-dir`` (its newest complete step)."""
    if not os.path.isdir(path):
        raise ValueError(
            f"--resume {path}: no such directory; give a --save-dir of an earlier run or one of its step_* directories"
        )
    if not os.path.isfile(os.path.join(path, META_FILE)):
        latest = os.path.join(path, LATEST_FILE)
        if not os.path.isfile(latest):
            steps = sorted(glob.glob(os.path.join(path, "step_*")))
            hint = (
                (
                    f"; it holds {[os.path.basename(s) for s in steps]} but none is complete (no {META_FILE}: "
                    f"the run stopped while saving)"
                )
                if steps
                else ""
            )
            raise ValueError(
                f"--resume {path}: no checkpoint there (expected {LATEST_FILE} in a --save-dir or "
                f"{META_FILE} in a step directory){hint}"
            )
        with open(latest) as f:
            path = os.path.join(path, f.read().strip())
        if not os.path.isfile(os.path.join(path, META_FILE)):
            raise ValueError(f"--resume: {latest} names {path}, which is incomplete (no {META_FILE})")
    with open(os.path.join(path, META_FILE)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"--resume {path}: checkpoint format {meta.get('format')!r}, this version reads {FORMAT}")
    return Checkpoint(path, meta)


def run_settings(config, model_config) -> dict:
    """What :func:`check_compatible` compares: the run's settings (a TrainConfig) and the model's config."""
    run = {
        "seed": config.seed,
        "seq_len": config.seq_len,
        "pack": bool(config.pack),
        "heldout_fraction": config.eval_fraction if config.eval_every else None,
    }
    config = {k: v for k, v in model_config.to_dict().items() if k not in _CONFIG_IGNORED}
    return {"run": run, "model_config": json.loads(json.dumps(config, default=str))}


def check_compatible(ckpt: Checkpoint, settings: dict, engine: str) -> None:
    """ValueError when the run differs from the saved one in what an exact continuation depends on."""
    saved = ckpt.meta
    for key in RUN_KEYS:
        a, b = saved["run"].get(key), settings["run"][key]
        if a != b:
            flag = {"heldout_fraction": "eval-fraction (with --eval-every)"}.get(key, key.replace("_", "-"))
            raise ValueError(
                f"--resume {ckpt.path}: the checkpoint was saved with --{flag} {a}, this run has {b}; "
                f"resume with the same value (the data order depends on it)"
            )
    diff = sorted(
        k
        for k in set(saved["model_config"]) | set(settings["model_config"])
        if saved["model_config"].get(k) != settings["model_config"].get(k)
    )
    if diff:
        shown = ", ".join(
            f"{k}: {saved['model_config'].get(k)!r} -> {settings['model_config'].get(k)!r}" for k in diff[:5]
        )
        raise ValueError(
            f"--resume {ckpt.path}: the model differs from the saved one ({shown}); resume with the same --model"
        )
    if saved["engine"] != engine:
        fix = {"deepspeed": "with --deepspeed CONFIG.json", "fsdp2": "with --fsdp"}.get(
            saved["engine"], "without --deepspeed and --fsdp"
        )
        raise ValueError(
            f"--resume {ckpt.path}: the checkpoint was written by the {saved['engine']} engine, this "
            f"run uses the {engine} engine; resume {fix}"
        )


def deepspeed_tag(ckpt: Checkpoint, world_size: int, zero_stage: int) -> str:
    """Which DeepSpeed checkpoint this run loads: the native one, or the universal conversion."""
    saved_world, saved_stage = ckpt.meta["world_size"], ckpt.meta["zero_stage"]
    base = os.path.join(ckpt.path, DEEPSPEED_DIR)
    if saved_world == world_size and saved_stage == zero_stage:
        return NATIVE_TAG
    sharded = glob.glob(os.path.join(base, NATIVE_TAG, "*optim_states.pt"))
    if saved_stage == zero_stage == 0 and not sharded:
        return NATIVE_TAG  # the optimizer state is replicated in the model-states file
    if os.path.isdir(os.path.join(base, UNIVERSAL_TAG)):
        return UNIVERSAL_TAG
    raise ValueError(
        f"--resume {ckpt.path}: the DeepSpeed checkpoint was saved at world size {saved_world} "
        f"(sp={ckpt.meta['sp_size']} x dp={ckpt.meta['dp_size']}) with ZeRO stage {saved_stage}; this run has "
        f"world size {world_size} and stage {zero_stage}. ZeRO shards depend on both: convert the checkpoint once "
        f"with\n"
        f"  python -m deepspeed.checkpoint.ds_to_universal --input_folder {os.path.join(base, NATIVE_TAG)} "
        f"--output_folder {os.path.join(base, UNIVERSAL_TAG)}\nand resume again (the universal checkpoint is then "
        f"loaded), or resume at world size {saved_world}"
    )


def save(
    save_dir: str, step: int, *, engine, loader, topology, settings: dict, engine_name: str, zero_stage: int | None
) -> str:
    """Write the checkpoint of ``step`` (collective: every rank calls it); returns its directory."""
    path = step_dir(save_dir, step)
    rank = comm.rank()
    if rank == 0:
        os.makedirs(os.path.join(path, "rng"), exist_ok=True)
        if os.path.exists(os.path.join(path, META_FILE)):
            os.remove(os.path.join(path, META_FILE))  # rewriting a step: incomplete until the end
    comm.barrier()
    engine.save(path)
    if topology.sp_rank == 0:
        torch.save(get_rng_state(), _rng_file(path, topology.dp_rank))
    comm.barrier()
    if rank == 0:
        meta = {
            "format": FORMAT,
            "step": step,
            "engine": engine_name,
            "zero_stage": zero_stage,
            "world_size": topology.world_size,
            "sp_size": topology.sp_size,
            "ring_size": ring_size_of(topology),  # for the record: any (ulysses, ring) layout resumes it
            "dp_size": topology.dp_size,
            "data": loader.state_dict(),
            **settings,
        }
        _write_atomic(os.path.join(path, META_FILE), json.dumps(meta, indent=1))
        _write_atomic(os.path.join(save_dir, LATEST_FILE), os.path.basename(path))
    return path


def load(ckpt: Checkpoint, *, engine, loader, topology, seed: int, deepspeed_tag: str | None = None) -> int:
    """Restore engine, data position and random streams from ``ckpt``; returns its step (collective)."""
    if deepspeed_tag is None:
        engine.load(ckpt.path)
    else:
        engine.load(ckpt.path, deepspeed_tag)
    loader.load_state_dict(ckpt.meta["data"])
    if ckpt.meta["dp_size"] == topology.dp_size:
        set_rng_state(torch.load(_rng_file(ckpt.path, topology.dp_rank), weights_only=True))
    else:
        sync_rng(topology, derive_seed(seed, ckpt.step))
        if comm.rank() == 0:
            warnings.warn(
                f"resuming at dp_size={topology.dp_size} from a checkpoint saved at dp_size="
                f"{ckpt.meta['dp_size']}: the random streams are re-seeded from (seed, step), so random "
                f"ops (dropout) differ from an uninterrupted run",
                stacklevel=2,
            )
    return ckpt.step


def _rng_file(path: str, dp_rank: int) -> str:
    return os.path.join(path, "rng", f"dp_{dp_rank:05d}.pt")


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
