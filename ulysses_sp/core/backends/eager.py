"""eager: explicit [B, nq, S, S] scores, the reference every other backend is tested against.

Shape legend: B batch, S full sequence, nq/nk heads on this rank, H head dim (Hv for values).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dense import custom_dense, dense_mask, repeat_kv
from .spec import AttnSpec


def attend(q, k, v, spec: AttnSpec) -> torch.Tensor:
    groups = q.shape[2] // k.shape[2]
    qt = q.transpose(1, 2)  # [B, nq, S, H]
    kt = repeat_kv(k, groups).transpose(1, 2)  # [B, nq, S, H]
    vt = repeat_kv(v, groups).transpose(1, 2)  # [B, nq, S, Hv]
    scores = torch.matmul(qt, kt.transpose(2, 3)) * spec.scale  # [B, nq, S, S]
    if spec.softcap is not None:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    if spec.custom_mask is not None:
        mask = custom_dense(spec.custom_mask, scores.dtype)
    else:
        mask = (
            dense_mask(spec, q.device) if (spec.causal or not spec.info.is_plain or spec.window or spec.chunk) else None
        )
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    if spec.sinks is not None:  # one more logit per query, the head's sink, dropped after the softmax
        sink = spec.sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)  # [B, nq, S, 1]
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1, dtype=torch.float32)[..., :-1].to(q.dtype)
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if spec.dropout > 0:
        probs = F.dropout(probs, p=spec.dropout, training=True)
    return torch.matmul(probs, vt).transpose(1, 2)  # [B, S, nq, Hv]
