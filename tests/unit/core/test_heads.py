import pytest

from ulysses_sp.core.heads import plan_heads


@pytest.mark.parametrize(
    "nq,nkv,sp",
    [
        (8, 8, 4),
        (32, 8, 4),
        (8, 2, 4),
        (12, 4, 8),
        (12, 4, 5),
        (6, 1, 4),
        (7, 7, 2),
        (14, 2, 4),
        (32, 8, 8),
        (40, 8, 16),
        (6, 3, 4),
    ],
)
def test_plan_covers_every_head_once_and_gqa_is_consistent(nq, nkv, sp):
    plan = plan_heads(nq, nkv, sp)
    flat = [h for hs in plan.q_heads for h in hs]
    assert flat == list(range(nq)), "q heads must be a contiguous split in rank order"
    counts = [len(h) for h in plan.q_heads]
    assert max(counts) - min(counts) <= 1, "q split must be balanced"
    group = nq // nkv
    for q, kv in zip(plan.q_heads, plan.kv_heads):
        assert len(q) % len(kv) == 0
        local_group = len(q) // len(kv)
        # local GQA: the i-th local q head reads local kv head i // local_group
        for i, head in enumerate(q):
            assert kv[i // local_group] == head // group


def test_plain_split_and_minimal_replication():
    assert plan_heads(32, 8, 4).kv_heads == ((0, 1), (2, 3), (4, 5), (6, 7))  # plain split, nothing replicated
    plan = plan_heads(8, 2, 4)  # kv < sp: each kv head goes to exactly sp / kv = 2 ranks
    assert plan.kv_heads == ((0,), (0,), (1,), (1,))
    assert plan.q_slice(3) == slice(6, 8)


def test_sp_larger_than_heads_is_a_clear_error():
    with pytest.raises(ValueError, match=r"sp_size=8 exceeds num_attention_heads=4.*sp_size <= 4"):
        plan_heads(4, 4, 8)


def test_heads_not_multiple_of_kv_heads():
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        plan_heads(6, 4, 2)
