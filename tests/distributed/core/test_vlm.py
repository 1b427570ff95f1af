"""Vision-language models under SP (core/vlm.py): every rank gets the whole sample with its image; the
local logits and every parameter gradient, the vision tower's included (summed over the SP group),
equal the non-SP model's."""

from __future__ import annotations

import pytest
import torch
import transformers

import ulysses_sp
from tests.distributed import harness
from tests.distributed.core.test_attention_parity import check_model_parity
from tests.helpers import tolerances
from ulysses_sp.core import comm

#: token ids of the tiny vocabulary: image placeholder, vision start / end
IMAGE, START, END = 250, 251, 252
SEQ = 24
#: (config class, model class); Qwen3-VL also adds vision features inside the first text layers (deepstack)
MODELS = [
    ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
    ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
]


def tiny_vlm(config_name: str, model_name: str, seed: int = 0):
    """A random-init VLM: 2 text layers of width 64 (4 heads, 2 kv heads, mRoPE), a 2-block vision tower."""
    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    text = dict(
        vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rope_parameters=rope, attention_dropout=0.0, pad_token_id=0,
    )  # fmt: skip
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=32, num_heads=2, patch_size=2, spatial_merge_size=2,
        temporal_patch_size=1, window_size=4, out_hidden_size=64, fullatt_block_indexes=[1],
        num_position_embeddings=16, deepstack_visual_indexes=[0],
    )  # fmt: skip
    config = getattr(transformers, config_name)(
        text_config=text, vision_config=vision, image_token_id=IMAGE, vision_start_token_id=START,
        vision_end_token_id=END, video_token_id=253,
    )  # fmt: skip
    return getattr(transformers, model_name)(config).train()


def image_batch(batch: int, seed: int, device) -> dict:
    """One 8x8-pixel image per sample (4x4 patches of 2x2, merged 2x2 into 4 tokens) at tokens 10..13."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 240, (batch, SEQ), generator=g)
    ids[:, 9], ids[:, 10:14], ids[:, 14] = START, IMAGE, END  # the image crosses the sp2 shard boundary
    return {
        "input_ids": ids.to(device),
        "pixel_values": torch.randn(batch * 16, 3 * 2 * 2, generator=g).to(device),  # [patches, C*T*p*p]
        "image_grid_thw": torch.tensor([[1, 4, 4]] * batch, device=device),
        "mm_token_type_ids": (ids == IMAGE).int().to(device),
    }


def _body_vlm(ctx, sp, models):
    topo = ulysses_sp.init_sp(sp)
    for config_name, model_name in models:
        model = tiny_vlm(config_name, model_name).to(ctx.dtype)
        inputs = image_batch(2, 100 + topo.dp_rank, ctx.device)
        check_model_parity(ctx, topo, model, model_name, seq=SEQ, full_inputs=inputs)
        _check_text_loss(topo, model, inputs)


def _check_text_loss(topo, model, inputs):
    """The loss over text tokens (labels -100 on the image tokens): the shard's cross-entropy against
    shard_batch's shift_labels (shifted on the full row, then sliced), summed over the SP group and
    divided by the sample's label count, equals transformers' loss of the non-SP model."""
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] >= IMAGE, -100)
    ref = model(**inputs, labels=labels).loss
    ulysses_sp.apply(model, topo)
    try:
        shift = ulysses_sp.shard_batch({"input_ids": inputs["input_ids"], "labels": labels}, topo)["shift_labels"]
        logits = model(**inputs).logits  # [B, s, V]
        local = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), shift.flatten(), reduction="sum")
        count = (labels[:, 1:] != -100).sum()
        loss = comm.all_reduce_autograd_sum(local, topo.sp_group) / count
        torch.testing.assert_close(loss, ref.float(), **tolerances(next(model.parameters()).dtype))
    finally:
        ulysses_sp.remove(model)


@pytest.mark.parametrize("world,sp", [(2, 2)], ids=["sp2"])
def test_vlm_parity(world, sp):
    harness.run(_body_vlm, world, sp, MODELS)


@pytest.mark.gpu
def test_vlm_parity_gpu():
    """The same on CUDA (this transformers' vision attention kernels): sp2 on a 2-GPU host, else sp1."""
    if not harness.on_gpu():
        pytest.skip("GPU-only: run with ULYSSES_SP_TEST_BACKEND=nccl on a CUDA machine")
    world = min(2, torch.cuda.device_count())
    harness.run(_body_vlm, world, world, MODELS)
