"""The SP size and ring size of a run, from the places a user can give them: an explicit value
(``--sp-size`` / ``--ring-size``, ``SPTrainer(sp_size=..., ring_size=...)``, ``prepare_sp(...)``), the
DeepSpeed JSON's ``sequence_parallel_size`` / ``sequence_parallel_ring_size``, the Accelerate config's
(accelerate_env.py). One function per size resolves them for every entry point, so two sources that
disagree always give the same error."""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

from ..core.checks import check_int
from ..core.heads import smallest_ring
from .accelerate_env import ENV_RING_SIZE, ENV_SP_SIZE, claim_sp_size, read_ring_size

#: the DeepSpeed JSON key of the ring size, next to DeepSpeed's own ``sequence_parallel_size``
#: (DeepSpeed reads its config key by key and ignores keys it does not know)
DS_RING_KEY = "sequence_parallel_ring_size"


def resolve_sp_size(
    explicit: int | None,
    ds_config: dict | None = None,
    environ: MutableMapping[str, str] | None = None,
    *,
    explicit_source: str | None = None,
) -> int:
    """The explicit size, else the DeepSpeed JSON's ``sequence_parallel_size``, else the Accelerate
    config's (claimed: Accelerate no longer sees it, :func:`~.accelerate_env.claim_sp_size`), else 1.

    Any two given sources that differ are a ValueError naming both: a config written for one SP
    degree is not run with another. ``explicit_source`` names the explicit value in that message
    (default ``--sp-size {explicit}``).
    """
    ds_config = ds_config or {}
    sources: list[tuple[str, int]] = []
    if explicit is not None:
        check_int("sp_size", explicit)
        sources.append((explicit_source or f"--sp-size {explicit}", explicit))
    json_sp = ds_config.get("sequence_parallel_size")
    if json_sp is not None:
        check_int('"sequence_parallel_size" in the DeepSpeed config', json_sp)
        sources.append((f'"sequence_parallel_size": {json_sp} in the DeepSpeed config', json_sp))
    accelerate_sp = claim_sp_size(os.environ if environ is None else environ)
    if accelerate_sp is not None:
        sources.append(
            (
                f"the Accelerate config's SP size {accelerate_sp} (parallelism_config_sp_size x "
                f"parallelism_config_cp_size, or {ENV_SP_SIZE})",
                accelerate_sp,
            )
        )
    return _agreed(sources)


def resolve_ring_size(
    explicit: int | str | None,
    sp_size: int,
    model=None,
    ds_config: dict | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    explicit_source: str = "--ring-size {}",
) -> int:
    """The ring size of hybrid SP (ring attention across ``ring_size`` groups of ``sp_size /
    ring_size`` Ulysses ranks): the explicit value, else the DeepSpeed JSON's
    ``"sequence_parallel_ring_size"``, else the Accelerate config's (``parallelism_config_cp_size``
    with ``sp_backend: ulysses_sp``, or ``ULYSSES_SP_RING_SIZE``), else 1.

    Each source gives an integer or ``"auto"`` (:func:`auto_ring_size`, which reads the heads of
    ``model``, a transformers model or its config, and ``LOCAL_WORLD_SIZE`` from ``environ``).
    Sources that resolve to different sizes are a ValueError naming both, as is a size that does not
    divide ``sp_size``. ``explicit_source`` names the explicit value in messages, ``{}`` standing
    for it (default ``--ring-size {}``). Call after :func:`resolve_sp_size`.
    """
    env = os.environ if environ is None else environ
    ds_config = ds_config or {}
    given: list[tuple[str, int | str]] = []  # (where, with {} for the value; the value)
    if explicit is not None:
        given.append((explicit_source, explicit))
    if ds_config.get(DS_RING_KEY) is not None:
        given.append((f'"{DS_RING_KEY}": {{}} in the DeepSpeed config', ds_config[DS_RING_KEY]))
    accelerate_ring = read_ring_size(env)
    if accelerate_ring is not None:
        given.append(
            (f"the Accelerate config's ring size {{}} (parallelism_config_cp_size or {ENV_RING_SIZE})", accelerate_ring)
        )
    sources = []
    for where, value in given:
        if value == "auto":
            ring = auto_ring_size(sp_size, model, env)
            sources.append((where.format(f"auto (= {ring})"), ring))
        else:
            source = where.format(repr(value) if isinstance(value, str) else value)
            sources.append((source, check_int(f"{source}: the ring size", value, note=" or 'auto'")))
    ring = _agreed(sources)
    if sp_size % ring:
        divisors = [d for d in range(1, sp_size + 1) if sp_size % d == 0]
        source = next(s for s, v in sources if v == ring)
        raise ValueError(
            f"{source} does not divide the SP size {sp_size}: the SP group is ring_size Ulysses groups of "
            f"sp_size / ring_size ranks; use a ring size in {divisors} or auto"
        )
    return ring


def parse_ring_size(text: str) -> int | str:
    """A ring size from the command line: ``"auto"`` or an integer >= 1 (an argparse ``type``)."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"a ring size is an integer >= 1 or auto, got {text!r}")
    return int(text)


def auto_ring_size(sp_size: int, model, environ: Mapping[str, str] | None = None) -> int:
    """``ring_size="auto"``: the smallest ring that gives every Ulysses rank a query head of ``model``
    (a transformers model or its config; none, or a model without attention heads: the heads do not
    limit) and keeps each Ulysses group inside a node of ``LOCAL_WORLD_SIZE`` ranks (set by torchrun,
    the deepspeed launcher and accelerate launch; unset: the heads alone decide)."""
    env = os.environ if environ is None else environ
    config = getattr(model, "config", model)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    heads = getattr(config, "num_attention_heads", None) or sp_size
    local = env.get("LOCAL_WORLD_SIZE", "")
    return smallest_ring(sp_size, heads, int(local) if local.isdigit() and int(local) > 0 else None)


def _agreed(sources: list[tuple[str, int]]) -> int:
    """The value all ``(source, value)`` pairs give (1 when none); a ValueError naming two that differ."""
    for source, value in sources[1:]:
        if value != sources[0][1]:
            raise ValueError(f"{sources[0][0]} disagrees with {source}; give one of them, or make them equal")
    return sources[0][1] if sources else 1


def claim_deepspeed_sp_keys(ds_config: dict | None) -> dict:
    """Take ``"sequence_parallel_size"`` and ``"sequence_parallel_ring_size"`` out of a DeepSpeed
    JSON that another engine builder reads (the HF Trainer's ``TrainingArguments(deepspeed=...)``):
    returns them, for :func:`resolve_sp_size` / :func:`resolve_ring_size`. Left in, DeepSpeed would
    divide its world size by the SP size for the batch arithmetic the Trainer filled in for all ranks."""
    if not ds_config:
        return {}
    return {key: ds_config.pop(key) for key in ("sequence_parallel_size", DS_RING_KEY) if key in ds_config}
