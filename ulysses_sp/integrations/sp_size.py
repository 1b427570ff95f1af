"""The SP size of a run, from the places a user can give it: an explicit value (``--sp-size``,
``SPTrainer(sp_size=...)``, ``prepare_sp(sp_size=...)``), the DeepSpeed JSON's
``sequence_parallel_size``, the Accelerate config's (accelerate_env.py). One function resolves them
for every entry point, so two that disagree always give the same error."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from ..core.checks import check_int
from .accelerate_env import ENV_SP_SIZE, claim_sp_size


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
                f"the Accelerate config's SP size {accelerate_sp} (parallelism_config_sp_size or {ENV_SP_SIZE})",
                accelerate_sp,
            )
        )
    for source, value in sources[1:]:
        if value != sources[0][1]:
            raise ValueError(f"{sources[0][0]} disagrees with {source}; give one of them, or make them equal")
    return sources[0][1] if sources else 1
