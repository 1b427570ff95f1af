"""The SP and ring sizes from an Accelerate config, read from the environment ``accelerate launch`` builds.

How the SP size gets here. ``accelerate launch`` copies the ``parallelism_config`` section of its
YAML into environment variables of every process (``ACCELERATE_USE_PARALLELISM_CONFIG=true``,
``PARALLELISM_CONFIG_SP_SIZE``, ``PARALLELISM_CONFIG_SP_BACKEND``, ...). Accelerate 1.15 accepts only
``sp_backend: deepspeed``, which makes ``Accelerator.prepare`` run DeepSpeed's ALST (a process-wide
attention swap and its own dataloader adapter) under ``distributed_type: DEEPSPEED``. ulysses_sp
uses Accelerate's own keys with a backend value of its own::

    parallelism_config:
      parallelism_config_sp_size: 2
      parallelism_config_sp_backend: ulysses_sp

Hybrid SP (Ulysses x ring attention) takes Accelerate's context-parallel size as the ring: with
``parallelism_config_cp_size: r`` next to ``sp_backend: ulysses_sp``, ``r`` ring groups of
``parallelism_config_sp_size`` Ulysses ranks each run ring attention between them (context parallelism
is what Accelerate and torch call ring attention). As in Accelerate's own mesh the two sizes multiply:
the SP size of the run is ``sp_size x cp_size``, so ``sp_size: 2, cp_size: 2`` is (u, r) = (2, 2) on 4
ranks of one sequence and ``sp_size: 1, cp_size: 4`` pure ring. The launcher exports only the keys it
knows, so no other key of the YAML could carry the ring size to the processes.

The launcher passes the backend through unchecked (only its CLI flag has ``choices``), but
``ParallelismConfig`` would reject it when an ``Accelerator`` is created (and reject ``sp_size`` and
``cp_size`` both above 1). :func:`claim_sp_size` therefore reads the sizes and then hides SP from
Accelerate in this process's environment: the SP size moves to ``ULYSSES_SP_SIZE`` and the ring size
to ``ULYSSES_SP_RING_SIZE``, ``PARALLELISM_CONFIG_SP_SIZE`` and ``PARALLELISM_CONFIG_CP_SIZE`` become 1
and the backend the inert ``deepspeed``, and ``ACCELERATE_USE_PARALLELISM_CONFIG`` becomes ``false``.
ALST can then never run next to ulysses_sp. Call it before ``Accelerator()`` (``SPTrainer``,
``prepare_sp``'s callers and ``launch/train.py`` do). ``ULYSSES_SP_SIZE`` and ``ULYSSES_SP_RING_SIZE``
(an integer or ``auto``, see :func:`~.sp_size.resolve_ring_size`) may also be set by hand.

Keys ignored: ``sp_seq_length`` and ``sp_seq_length_is_variable`` (ulysses_sp pads every batch to
a multiple of the SP size, so the length may change from batch to batch), and
``sp_attn_implementation`` (the launcher writes ``sdpa`` whenever it is unset, so it cannot tell a
choice from the default; pass ``attn_implementation`` / ``--attn``). Ignoring the first two is
also what keeps the launcher's bug harmless here: ``--parallelism_config_sp_seq_length_is_variable
False`` is parsed with ``type=bool`` and arrives as ``True``. The booleans read here are parsed
strictly (:func:`env_flag`): an unknown spelling is an error, not ``True``. ``cp_backend`` and
``cp_comm_strategy`` are torch's context-parallel settings; the ring attention is ulysses_sp's own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

#: the ``parallelism_config_sp_backend`` value that selects ulysses_sp.
SP_BACKEND = "ulysses_sp"
#: where :func:`claim_sp_size` keeps the size once Accelerate no longer sees it (may be set by hand).
ENV_SP_SIZE = "ULYSSES_SP_SIZE"
#: where :func:`claim_sp_size` keeps the ring size (``cp_size``); may be set by hand, also to ``auto``.
ENV_RING_SIZE = "ULYSSES_SP_RING_SIZE"

_USE_PC = "ACCELERATE_USE_PARALLELISM_CONFIG"
_PC = "PARALLELISM_CONFIG_"
_OTHER_SIZES = ("DP_REPLICATE_SIZE", "DP_SHARD_SIZE", "TP_SIZE")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def env_flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """A boolean environment variable, parsed strictly: true/1/yes/on or false/0/no/off/empty
    (any case); unset is False. Anything else is a ValueError, not True (cf. ``bool("False")``)."""
    env = os.environ if environ is None else environ
    value = env.get(name)
    if value is None:
        return False
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name}={value!r} is not a boolean; use true or false")


def _env_int(name: str, env: Mapping[str, str], default: int) -> int:
    value = env.get(name)
    if value is None or value.strip() in ("", "None"):
        return default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None
    if number < 1:
        raise ValueError(f"{name}={number} must be >= 1")
    return number


def read_sp_size(environ: Mapping[str, str] | None = None) -> int | None:
    """The ulysses_sp SP size in the environment, or None when there is none.

    Read from ``ULYSSES_SP_SIZE`` or from Accelerate's ``parallelism_config`` variables with
    ``sp_backend: ulysses_sp``: ``sp_size x cp_size`` (module docstring; both sources present: they
    must agree). An Accelerate config asking for SP with ``sp_backend: deepspeed`` (DeepSpeed's
    ALST), or for other parallelisms (dp_shard, dp_replicate, tp), is a ValueError naming the fix.
    Reads only; :func:`claim_sp_size` also hides SP from Accelerate.
    """
    env = os.environ if environ is None else environ
    own = _env_int(ENV_SP_SIZE, env, 0) if env.get(ENV_SP_SIZE) else None
    backend = env.get(_PC + "SP_BACKEND")
    size = _env_int(_PC + "SP_SIZE", env, 1)
    if backend == SP_BACKEND:
        others = {k.lower(): _env_int(_PC + k, env, 1) for k in _OTHER_SIZES}
        others = {k: v for k, v in others.items() if v > 1}
        if others:
            keys = ", ".join(f"parallelism_config_{k}: {v}" for k, v in others.items())
            raise ValueError(
                f"the Accelerate config combines parallelism_config_sp_backend: {SP_BACKEND} with {keys}; "
                "ulysses_sp runs data parallelism over world / sp_size ranks (DDP, DeepSpeed or FSDP2) and "
                "sequence parallelism over sp_size x cp_size (Ulysses x ring): set those sizes to 1"
            )
        cp = _env_int(_PC + "CP_SIZE", env, 1)
        if own is not None and own != size * cp:
            raise ValueError(
                f"{ENV_SP_SIZE}={own} disagrees with the Accelerate config's SP size {size * cp} "
                f"(parallelism_config_sp_size: {size} x parallelism_config_cp_size: {cp}); unset one of them "
                "or make them equal"
            )
        return size * cp
    if backend not in (None, "deepspeed"):
        raise ValueError(f"parallelism_config_sp_backend: {backend!r} is unknown; use {SP_BACKEND!r} for ulysses_sp")
    if size > 1 and (env_flag(_USE_PC, env) or backend is not None):
        raise ValueError(
            f"the Accelerate config asks for parallelism_config_sp_size: {size} with sp_backend "
            f"{backend or 'deepspeed'!r}, which is DeepSpeed's ALST, not ulysses_sp; set "
            f"parallelism_config_sp_backend: {SP_BACKEND} in the config's parallelism_config section"
        )
    return own


def read_ring_size(environ: Mapping[str, str] | None = None) -> int | str | None:
    """The ulysses_sp ring size in the environment (an integer, or ``"auto"`` from
    ``ULYSSES_SP_RING_SIZE``), or None when there is none.

    Read from ``ULYSSES_SP_RING_SIZE`` or from ``parallelism_config_cp_size`` with ``sp_backend:
    ulysses_sp`` (both present: they must agree). A ``cp_size`` under another backend is
    Accelerate's own context parallelism, not ours: None.
    """
    env = os.environ if environ is None else environ
    own = env.get(ENV_RING_SIZE, "").strip()
    if own and own != "auto":
        own = _env_int(ENV_RING_SIZE, env, 1)
    if env.get(_PC + "SP_BACKEND") != SP_BACKEND:
        return own or None
    cp = _env_int(_PC + "CP_SIZE", env, 1)
    if own and cp > 1 and own != cp:
        raise ValueError(
            f"{ENV_RING_SIZE}={own} disagrees with parallelism_config_cp_size: {cp} of the Accelerate config "
            "(the ring size of ulysses_sp); unset one of them or make them equal"
        )
    return own or (cp if cp > 1 else None)


def claim_sp_size(environ: MutableMapping[str, str] | None = None) -> int | None:
    """:func:`read_sp_size` (and :func:`read_ring_size`), then hide SP from Accelerate in
    ``environ`` (default ``os.environ``).

    Afterwards the size is in ``ULYSSES_SP_SIZE`` and a ring size in ``ULYSSES_SP_RING_SIZE`` (so
    calling again returns them), an ``Accelerator`` created in this process sees ``sp_size`` and
    ``cp_size`` 1 and no parallelism config, and DeepSpeed's ALST can not be activated by it. Call
    before ``Accelerator()`` / ``TrainingArguments`` are created. Returns None (and changes nothing)
    when the environment holds no ulysses_sp SP size.
    """
    env = os.environ if environ is None else environ
    size = read_sp_size(env)
    if size is None:
        return None
    ring = read_ring_size(env)
    env[ENV_SP_SIZE] = str(size)
    if ring is not None:
        env[ENV_RING_SIZE] = str(ring)
    if env.get(_PC + "SP_BACKEND") == SP_BACKEND:
        env[_PC + "SP_SIZE"] = "1"
        env[_PC + "CP_SIZE"] = "1"
        env[_PC + "SP_BACKEND"] = "deepspeed"  # the only value Accelerate 1.15 accepts; inert at size 1
        env[_USE_PC] = "false"
    return size


def launched_engine(environ: Mapping[str, str] | None = None) -> str | None:
    """ "deepspeed" or "fsdp" when ``accelerate launch`` started this process with that
    ``distributed_type``, else None."""
    env = os.environ if environ is None else environ
    if env_flag("ACCELERATE_USE_DEEPSPEED", env):
        return "deepspeed"
    return "fsdp" if env_flag("ACCELERATE_USE_FSDP", env) else None


def launched_deepspeed_config_file(environ: Mapping[str, str] | None = None) -> str | None:
    """The DeepSpeed JSON an ``accelerate launch`` with ``deepspeed_config_file`` names, else None."""
    env = os.environ if environ is None else environ
    return env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") if launched_engine(env) == "deepspeed" else None
