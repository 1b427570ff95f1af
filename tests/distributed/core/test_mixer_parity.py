"""Hybrid models under SP: linear-attention / SSM / short-convolution layers mixed with attention.

Against the single-process model on the same batch: the local logits equal the shard of the full
logits, and every parameter gradient summed over the SP group equals the reference gradient. A packed
batch (documents of several lengths per row, positions restarting at each) is compared with the
reference model run on each document on its own (transformers' CPU fallbacks do not reset the
recurrence at documents)."""

from __future__ import annotations

import pytest
import torch
import transformers

import ulysses_sp
from tests.distributed import harness
from tests.helpers import assert_grads_close, clone, small_model, tokens, tolerances
from ulysses_sp.core import comm, mixers

_ATTN = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8)
_GDN = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)
#: Mamba2 mixers: 4 SSM heads of width 8 in 2 groups of the B/C projections (state 8), chunks of 8
_M2 = dict(mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=8, mamba_chunk_size=8)

#: family -> (config class, tiny shape): two or more layers mixing both kinds, vocab 256
FAMILIES = {
    "qwen3_next": (
        "Qwen3NextConfig",
        # 6 value heads: 2, 2, 1, 1 per rank at sp4 (uneven), each with the key head it reads
        dict(
            **_ATTN, **{**_GDN, "linear_num_value_heads": 6}, **_MOE, layer_types=["linear_attention", "full_attention"]
        ),
    ),
    "qwen3_5": ("Qwen3_5TextConfig", dict(**_ATTN, **_GDN, layer_types=["linear_attention", "full_attention"])),
    "qwen3_5_moe": (
        "Qwen3_5MoeTextConfig",
        dict(**_ATTN, **_GDN, **_MOE, layer_types=["full_attention", "linear_attention"]),
    ),
    "olmo_hybrid": (
        "OlmoHybridConfig",
        dict(**_ATTN, **_GDN, pad_token_id=0, eos_token_id=1, layer_types=["linear_attention", "full_attention"]),
    ),
    "lfm2": (
        "Lfm2Config",
        dict(
            **_ATTN,
            conv_L_cache=3,
            conv_bias=True,
            block_auto_adjust_ff_dim=False,
            layer_types=["conv", "full_attention"],
        ),
    ),
    "lfm2_moe": (
        "Lfm2MoeConfig",
        dict(
            **_ATTN,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            num_dense_layers=1,
            layer_types=["conv", "full_attention"],
        ),
    ),
    "nemotron_h": (
        "NemotronHConfig",
        dict(
            **_ATTN,
            mamba_num_heads=6,  # uneven at sp4
            mamba_head_dim=8,
            n_groups=2,
            ssm_state_size=8,
            chunk_size=8,
            use_conv_bias=True,
            layers_block_type=["mamba", "attention", "mlp"],
        ),
    ),
    "falcon_h1": (
        "FalconH1Config",
        dict(
            **_ATTN,
            num_hidden_layers=2,
            **_M2,
            mamba_d_ssm=32,
            mamba_rms_norm=True,
            mamba_norm_before_gate=False,
        ),
    ),
    "bamba": (
        "BambaConfig",
        dict(
            **_ATTN,
            num_hidden_layers=2,
            attn_layer_indices=[1],
            **_M2,
            mamba_expand=1,
        ),
    ),
    "granitemoehybrid": (
        "GraniteMoeHybridConfig",
        dict(
            **_ATTN,
            layer_types=["mamba", "attention"],
            **_M2,
            mamba_expand=1,
            num_local_experts=4,
            num_experts_per_tok=2,
            shared_intermediate_size=32,
        ),
    ),
    # lightning attention (block-wise decayed linear attention, blocks of 8 < documents) with MoE
    "minimax": (
        "MiniMaxConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            block_size=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["linear_attention", "full_attention"],
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=1,
        ),
    ),
    # attention-free models: every layer a mixer
    "mamba2": (
        "Mamba2Config",
        dict(
            num_attention_heads=None,
            num_key_value_heads=None,
            num_hidden_layers=2,
            num_heads=4,
            head_dim=8,
            n_groups=2,
            state_size=8,
            chunk_size=8,
            expand=1,
        ),
    ),
    "mamba": (
        "MambaConfig",
        dict(num_attention_heads=None, num_key_value_heads=None, num_hidden_layers=2, state_size=8, time_step_rank=4),
    ),
    "falcon_mamba": (
        "FalconMambaConfig",
        dict(num_attention_heads=None, num_key_value_heads=None, num_hidden_layers=2, state_size=8, time_step_rank=4),
    ),
    # a shared attention block beside the Mamba2 mixer of its "hybrid" layer
    "zamba2": (
        "Zamba2Config",
        dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            layers_block_type=["mamba", "hybrid"],
            mamba_d_state=8,
            mamba_expand=1,
            n_mamba_heads=4,
            mamba_ngroups=2,
            chunk_size=8,
            num_mem_blocks=1,
            use_shared_attention_adapter=False,
            adapter_rank=4,
            pad_token_id=0,
        ),
    ),
    # Mamba1 (selective scan) with 64 inner channels, attention on the second layer, experts on the first
    "jamba": (
        "JambaConfig",
        dict(
            **_ATTN,
            num_hidden_layers=2,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=0,
            num_experts=4,
            num_experts_per_tok=2,
            mamba_d_state=8,
            mamba_dt_rank=4,
            mamba_expand=2,
            use_mamba_kernels=False,
        ),
    ),
    # KDA (per-channel decay) with MLA attention
    "kimi_linear": (
        "KimiLinearConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            linear_num_heads=4,
            linear_head_dim=8,
            num_experts=4,
            num_experts_per_token=2,
            moe_intermediate_size=16,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            layer_types=["linear_attention", "full_attention"],
        ),
    ),
}

#: documents per row of the packed batch (S = 24)
DOCS = [[5, 11, 8], [24]]


def _model(family: str, dtype, **overrides):
    name, shape = FAMILIES[family]
    layers = shape.get("layer_types") or shape.get("layers_block_type")
    overrides = {"num_hidden_layers": len(layers), **shape, **overrides} if layers else {**shape, **overrides}
    attn = None if shape.get("num_attention_heads", 0) is None else "sdpa"  # attention-free: the model's default
    return small_model(name, attn=attn, vocab_size=256, **overrides).to(dtype).train()


def _reference(ref, ids, docs, **extra):
    """Full logits [B, S, V]: the whole rows, or each document of each row on its own."""
    if docs is None:
        return ref(input_ids=ids, **extra).logits
    rows = []
    for b, lengths in enumerate(docs):
        cuts = torch.tensor([0, *lengths]).cumsum(0).tolist()
        rows.append(torch.cat([ref(input_ids=ids[b : b + 1, lo:hi]).logits for lo, hi in zip(cuts, cuts[1:])], 1))
    return torch.cat(rows, 0)


def _positions(docs, batch: int, seq: int) -> torch.Tensor:
    if docs is None:
        return torch.arange(seq).expand(batch, -1)
    return torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in docs])  # [B, S]


def _check(ctx, topo, family: str, docs=None, pad: int = 0, batch: int = 2, seq: int = 24):
    """``docs``: a packed batch (documents per row); ``pad``: the first row left-padded by ``pad`` tokens
    (a 2-D mask; only the valid tokens' logits are compared and weighted)."""
    dtype = ctx.dtype
    model = _model(family, dtype).to(ctx.device)
    ref = clone(model)
    ids = tokens(batch, seq, seed=100 + topo.dp_rank, device=ctx.device)
    mask = torch.ones(batch, seq, dtype=torch.long, device=ctx.device)
    mask[0, :pad] = 0
    gen = torch.Generator().manual_seed(7 + topo.dp_rank)
    weights = torch.randn(batch, seq, model.config.vocab_size, generator=gen).to(ctx.device, dtype)
    weights = weights * mask[:, :, None]
    extra = {"attention_mask": mask} if pad else {}
    ref_logits = _reference(ref, ids, docs, **extra)
    (ref_logits.float() * weights).sum().backward()

    ulysses_sp.apply(model, topo)
    s = seq // topo.sp_size
    sl = slice(topo.sp_rank * s, (topo.sp_rank + 1) * s)
    pos = _positions(docs, batch, seq).to(ctx.device)[:, sl]
    extra = {"attention_mask": mask[:, sl]} if pad else {}
    logits = model(input_ids=ids[:, sl], position_ids=pos, **extra).logits
    tol = tolerances(dtype)
    what = f"{family}{' packed' if docs else ''}{' padded' if pad else ''} sp{topo.sp_size}"
    valid = mask[:, sl].bool()
    torch.testing.assert_close(
        logits[valid], ref_logits[:, sl][valid].detach(), **tol, msg=lambda m: f"{what} logits: {m}"
    )
    (logits.float() * weights[:, sl]).sum().backward()
    for p in model.parameters():
        if p.grad is not None:
            p.grad = comm.all_reduce(p.grad, topo.sp_group)
    assert_grads_close(model, ref, **tol)
    patched = [m for m, _ in mixers.find(model)]
    assert patched and all("forward" in vars(m) for m in patched)
    ulysses_sp.remove(model)
    assert not any("forward" in vars(m) for m in patched), "remove restores the mixers' own forward"


def _check_shard_batch(ctx, topo, family: str, seq: int = 23):
    """The data path: a packed row given as ``cu_seqlens`` to ``shard_batch``, which pads 23 tokens to a
    multiple of P; logits of the valid tokens and every gradient against per-document runs."""
    model = _model(family, ctx.dtype).to(ctx.device)
    ref = clone(model)
    ids = tokens(1, seq, seed=5, device=ctx.device)
    weights = torch.randn(1, seq, model.config.vocab_size, generator=torch.Generator().manual_seed(3))
    weights = weights.to(ctx.device, ctx.dtype)
    ref_logits = _reference(ref, ids, [[7, 9, 7]])
    (ref_logits.float() * weights).sum().backward()
    ulysses_sp.apply(model, topo)
    cu = torch.tensor([0, 7, 16, seq], dtype=torch.int32, device=ctx.device)
    local = ulysses_sp.shard_batch({"input_ids": ids, "cu_seqlens": cu}, topo)
    logits = model(input_ids=local["input_ids"], ulysses_sp_info=local["ulysses_sp_info"]).logits  # [1, s, V]
    lo = topo.sp_rank * logits.shape[1]
    n = max(0, min(seq - lo, logits.shape[1]))  # valid tokens of this shard (the last one holds the padding)
    tol = tolerances(ctx.dtype)
    torch.testing.assert_close(logits[:, :n], ref_logits[:, lo : lo + n].detach(), **tol)
    (logits[:, :n].float() * weights[:, lo : lo + n]).sum().backward()
    for p in model.parameters():
        if p.grad is not None:
            p.grad = comm.all_reduce(p.grad, topo.sp_group)
    assert_grads_close(model, ref, **tol)
    ulysses_sp.remove(model)


#: one family per mixer kind at sp4 and dp2 x sp2; every family runs at sp2
CORE_FAMILIES = ["qwen3_next", "lfm2", "nemotron_h", "jamba", "kimi_linear", "minimax"]


#: batches of the parity check: one sequence per row, packed documents, a left-padded row
BATCHES = {"plain": {}, "packed": {"docs": DOCS}, "padded": {"pad": 3}}


def _body(ctx, layouts, families):
    """``layouts``: (sp size, names of the BATCHES to check) in one spawn of ranks."""
    for sp_size, batches in layouts:
        topo = ulysses_sp.init_sp(sp_size)
        for family in families:
            for batch in batches:
                _check(ctx, topo, family, **BATCHES[batch])
        if sp_size == 2 and "packed" in batches:
            for family in CORE_FAMILIES:
                _check_shard_batch(ctx, topo, family)
        if sp_size == 4:  # two value heads cannot be split over four ranks: refused before any collective
            model = _model("qwen3_5", ctx.dtype, linear_num_key_heads=2, linear_num_value_heads=2)
            with pytest.raises(ValueError, match=r"sp_size=4 exceeds the 2 heads .*linear_num_value_heads=2"):
                ulysses_sp.apply(model, topo)
            assert not ulysses_sp.is_applied(model)
            # mixers run over the Ulysses all-to-all only: a ring (its zigzag layout) is refused
            hybrid = ulysses_sp.init_sp(4, ring_size=2)
            model = _model("qwen3_next", ctx.dtype)
            with pytest.raises(ValueError, match=r"not on a ring \(ring_size=2"):
                ulysses_sp.apply(model, hybrid)
            assert not ulysses_sp.is_applied(model)


#: world size -> (layouts, families): sp2 the plain and packed batches of every family (and the packed
#: batch through shard_batch's cu_seqlens on one family per mixer kind); sp4 the packed
#: batch (its second row is one plain sequence; documents cross the shards' borders) and the refusal,
#: dp2 x sp2 the plain and the padded batch, on one family per mixer kind
LAYOUTS = {
    2: ([(2, ("plain", "packed"))], list(FAMILIES)),
    4: ([(4, ("packed",)), (2, ("plain", "padded"))], CORE_FAMILIES),
}


@pytest.mark.parametrize("world", [2, 4], ids=["sp2", "sp4+dp2xsp2"])
def test_hybrid_parity(world):
    harness.run(_body, world, *LAYOUTS[world])


def _body_gpu(ctx, families):
    """sp=1 on one GPU, against the plain model: the kernels transformers picks there (FLA, causal-conv1d,
    mamba-ssm when installed, else the torch versions on CUDA). A family this transformers cannot run
    under SP is refused with a ValueError, reported and not failed; a mismatch or any other error fails,
    after every family has run."""
    topo = ulysses_sp.init_sp(1)
    failed = []
    for family in families:
        for batch, options in BATCHES.items():
            what = f"{family} {batch} {ctx.dtype}"
            try:
                _check(ctx, topo, family, **options)
                print(f"PARITY  {what}", flush=True)
            except ValueError as e:
                print(f"REFUSED {what}: {e}", flush=True)
            except Exception as e:  # a mismatch, or a module this transformers shapes differently: go on
                print(f"FAILED  {what}: {type(e).__name__}: {e}", flush=True)
                failed.append(what)
    assert not failed, f"mismatches: {failed}"


@pytest.mark.gpu
def test_hybrid_sp1_gpu():
    if not harness.on_gpu():
        pytest.skip("GPU-only: run with ULYSSES_SP_TEST_BACKEND=nccl on a CUDA machine")
    present = [f for f, (name, _) in FAMILIES.items() if hasattr(transformers, name)]
    missing = sorted(set(FAMILIES) - set(present))
    if missing:
        print(f"not in transformers {transformers.__version__}: {missing}")
    harness.run(_body_gpu, 1, present)
