"""Vision-language models under SP (core/vlm.py): every rank gets the whole sample with its image; the
local logits and every parameter gradient, the vision tower's included (summed over the SP group),
equal the non-SP model's. Through the data path (PackedDataset of whole documents with images and a
video, collate_padded, SPDataLoader(vlm=True), causal_lm_loss): the loss and every gradient after the
engine's reduction equal those of each document run alone through transformers."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
import transformers

import ulysses_sp
from tests.distributed import harness
from tests.distributed.core.test_attention_parity import check_model_parity
from tests.helpers import ROOT, assert_grads_close, clone, tolerances
from ulysses_sp.core import comm
from ulysses_sp.data import PackedDataset, SPDataLoader
from ulysses_sp.loss.causal_lm import causal_lm_loss, count_label_tokens

#: token ids of the tiny vocabulary: image and video placeholders, vision start / end
IMAGE, START, END, VIDEO = 250, 251, 252, 253
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
        vision_end_token_id=END, video_token_id=VIDEO,
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


def _document(g, model_name: str, pre: int, post: int, image=None, video_frames: int = 0) -> dict:
    """Text, then an image of ``image`` = (h, w) patches or a video of 4x4-patch frames, then text.
    A video's frames are one run of tokens for Qwen2.5-VL; Qwen3-VL separates them by a timestamp token."""
    text = lambda n: torch.randint(3, 240, (n,), generator=g).tolist()  # noqa: E731
    doc, grids = text(pre), {}
    if image is not None:
        h, w = image
        doc += [START] + [IMAGE] * (h * w // 4) + [END]
        grids = {"pixel_values": torch.randn(h * w, 12, generator=g), "image_grid_thw": torch.tensor([[1, h, w]])}
    if video_frames:
        frame = [START] + [VIDEO] * 4 + [END]
        if model_name.startswith("Qwen3"):
            doc += [t for _ in range(video_frames) for t in text(1) + frame]
        else:
            doc += [START] + [VIDEO] * (4 * video_frames) + [END]
        grids = {
            "pixel_values_videos": torch.randn(16 * video_frames, 12, generator=g),
            "video_grid_thw": torch.tensor([[video_frames, 4, 4]]),
        }
        if not model_name.startswith("Qwen3"):  # Qwen2.5-VL spaces the frames' temporal positions by it
            grids["second_per_grid_ts"] = torch.tensor([0.5])
    ids = torch.tensor(doc + text(post))
    kind = (ids == IMAGE).long() + 2 * (ids == VIDEO).long()
    return {"input_ids": ids, "labels": ids, "mm_token_type_ids": kind, **grids}  # labels: the data path masks


def vlm_documents(model_name: str) -> list[dict]:
    """Six documents: images of 4 and 8 tokens, a two-frame video, text only; whole-document rows of
    at most 24 tokens: [d0], [d1, d2], [d3], [d4, d5]."""
    g = torch.Generator().manual_seed(5)
    return [
        _document(g, model_name, 3, 4, image=(4, 4)),
        _document(g, model_name, 5, 2, image=(4, 8)),
        _document(g, model_name, 7, 0),
        _document(g, model_name, 2, 2, video_frames=2),
        _document(g, model_name, 4, 5, image=(4, 4)),
        _document(g, model_name, 6, 0),
    ]


def _check_data_path(ctx, topo, config_name, model_name):
    """One step through the data path, the engine's reduction done by hand (gradients averaged over the
    world, as DDP / DeepSpeed do) against each document run alone (transformers' loss, sum / N, over
    the text tokens: the documents' labels include the image tokens, which shard_batch ignores)."""
    tol = tolerances(ctx.dtype)
    model = tiny_vlm(config_name, model_name).to(ctx.device, ctx.dtype)
    ref = clone(model)
    docs = vlm_documents(model_name)
    rows = PackedDataset(docs, 24, whole_documents=True)
    assert len(rows) == 4
    text_labels = [d["labels"].masked_fill(d["mm_token_type_ids"] > 0, -100) for d in docs]  # the text only
    n_global = sum(int((labels[1:] != -100).sum()) for labels in text_labels)
    ref_sums, ref_pos = [], []  # each document's loss sum / N and mRoPE positions [3, n], alone
    seen = _capture_positions(ref, ref_pos)
    for doc, labels in zip(docs, text_labels):  # alone: a batch of one row
        inputs = _to(ctx, {k: v.unsqueeze(0) if v.dim() == 1 else v for k, v in {**doc, "labels": labels}.items()})
        ref_sums.append(ref(**inputs, num_items_in_batch=n_global).loss)
    seen.remove()
    sum(ref_sums).backward()

    ulysses_sp.apply(model, topo)
    sp_pos = []
    seen = _capture_positions(model, sp_pos)  # after apply's hook: the shard's [3, B, s]
    try:
        loader = SPDataLoader(rows, topo, 4 // topo.dp_size, shuffle=False, vlm=True, pad_token_id=0)
        (local,) = list(loader)  # every rank: its DP replica's rows whole, its shard's labels
        local = _to(ctx, local)
        n = count_label_tokens(local, topo)
        assert n.item() == n_global / topo.dp_size
        loss = causal_lm_loss(model, local, topo, n)
        loss.backward()
        mine = [i for rows_of_dp in loader.batch_indices(0) for i in rows_of_dp]  # this replica's rows
        want = sum(ref_sums[d] for r in mine for d in range(rows.row_docs[r], rows.row_docs[r + 1]))
        torch.testing.assert_close(loss.detach(), want.detach() * topo.dp_size, **tol)
        _check_positions(topo, sp_pos[0], [[ref_pos[d] for d in range(*rows.row_docs[r : r + 2])] for r in mine])
        for p in model.parameters():
            if p.grad is not None:
                p.grad = comm.all_reduce(p.grad, dist.group.WORLD) / topo.world_size
        assert_grads_close(model, ref, **tol)
    finally:
        seen.remove()
        ulysses_sp.remove(model)


def _capture_positions(model, into: list):
    """Record the mRoPE position ids [3, B, n] the language model is called with (after the hooks
    before this one); a text-only call without them numbers its tokens 0, 1, ..."""

    def hook(module, args, kwargs):
        pos = kwargs["position_ids"]
        if pos is None:
            B, n = kwargs["inputs_embeds"].shape[:2]
            pos = torch.arange(n, device=kwargs["inputs_embeds"].device).expand(3, B, n)
        into.append(pos[-3:])

    return model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def _check_positions(topo, local: torch.Tensor, rows: list[list[torch.Tensor]]) -> None:
    """The shard's mRoPE positions [3, B, s] are those of each document alone ([3, 1, n] each), the
    documents of a row one after another; the padding at a row's end is not compared."""
    S = local.shape[-1] * topo.sp_size
    want = torch.full((3, len(rows), S), -1, dtype=local.dtype, device=local.device)  # [3, B, S]
    for b, docs in enumerate(rows):
        row = torch.cat([p[:, 0] for p in docs], dim=-1)  # [3, n_b]
        want[:, b, : row.shape[-1]] = row
    s = S // topo.sp_size
    want = want[..., topo.sp_rank * s : (topo.sp_rank + 1) * s]  # [3, B, s]
    real = want >= 0
    assert real.any() and torch.equal(local[real], want[real]), (local, want)


def _check_errors(ctx, topo, model) -> None:
    """Misuse raises before any collective: a VLM called with a text shard (its SequenceInfo names the
    whole sample's length), packed documents whose visual tokens do not match their grid rows."""
    ids = torch.randint(3, 240, (1, 8), device=ctx.device)
    ulysses_sp.apply(model, topo)
    try:
        with pytest.raises(ValueError, match="must describe the 4-token sample.*vlm=True"):
            model(**ulysses_sp.shard_batch({"input_ids": ids}, topo))
        doc = vlm_documents(MODELS[0][1])[0]  # text, an image of 4 tokens, text
        batch = {k: v.unsqueeze(0) if v.dim() == 1 else v for k, v in doc.items()}
        batch["position_ids"] = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6]])  # a cut inside the image
        local = _to(ctx, ulysses_sp.shard_batch(batch, topo, vlm=True))
        with pytest.raises(ValueError, match="its 2 visual tokens of image_grid_thw do not end where"):
            model(**{k: v for k, v in local.items() if k != "shift_labels"})
    finally:
        ulysses_sp.remove(model)


def _to(ctx, batch: dict) -> dict:
    """Tensors to the device, the pixels to the compute dtype (the SequenceInfo moves with to_device)."""
    batch = ulysses_sp.to_device(batch, ctx.device)
    return {k: v.to(ctx.dtype) if k.startswith("pixel") else v for k, v in batch.items()}


def check_vlm(ctx, topo, models=MODELS) -> None:
    """Every check of this module at ``topo``: model parity with one image per sample, then the data path.
    The 4-rank layouts (sp4, dp2 x sp2) run inside tests/distributed/data/test_data.py's spawn."""
    for config_name, model_name in models:
        model = tiny_vlm(config_name, model_name).to(ctx.dtype)
        inputs = image_batch(2, 100 + topo.dp_rank, ctx.device)
        label = f"{model_name} dp{topo.dp_size}xsp{topo.sp_size}"
        check_model_parity(ctx, topo, model, label, seq=SEQ, full_inputs=inputs)
        _check_data_path(ctx, topo, config_name, model_name)
        if topo.world_size == 2:
            _check_errors(ctx, topo, model)


def _check_example_loop(ctx) -> None:
    """examples/vlm_loop.py's loop (its train function, in this spawn: no launcher to start) at sp2 logs
    the losses of the same script's global batches at dp2 without SP (the curve, 1e-4 relative)."""
    spec = importlib.util.spec_from_file_location("vlm_loop", os.path.join(ROOT, "examples", "vlm_loop.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    docs = example.synthetic_documents(8)
    run = dict(steps=3, seq_len=40, batch_size=2, lr=1e-3, device=ctx.device)
    with_sp = example.train(example.tiny_qwen2_5_vl(), docs, ulysses_sp.init_sp(2), **run)
    without = example.train(example.tiny_qwen2_5_vl(), docs, ulysses_sp.init_sp(1), **{**run, "batch_size": 1})
    assert len(with_sp) == 3
    torch.testing.assert_close(torch.tensor(with_sp), torch.tensor(without), rtol=1e-4, atol=0)


def _body_vlm(ctx, sp):
    check_vlm(ctx, ulysses_sp.init_sp(sp))
    if not harness.on_gpu():
        _check_example_loop(ctx)


def test_vlm_parity():
    harness.run(_body_vlm, 2, 2)


@pytest.mark.gpu
def test_vlm_parity_gpu():
    """The same on CUDA (this transformers' vision attention kernels): sp2 on a 2-GPU host, else sp1."""
    if not harness.on_gpu():
        pytest.skip("GPU-only: run with ULYSSES_SP_TEST_BACKEND=nccl on a CUDA machine")
    world = min(2, torch.cuda.device_count())
    harness.run(_body_vlm, world, world)
