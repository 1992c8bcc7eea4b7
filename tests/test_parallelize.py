"""parallelize(model, mesh): both modes give Hugging Face's logits, on one set of weights and one KV layout."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.device_mesh import DeviceMesh

import shiftlib
from helpers import ALL_FAMILIES, SHAPES, TOLERANCE, parallel, reference, rel_error
from shiftlib.cache import PagedKVCache
from shiftlib.paged_attention import AttentionBatch
from shiftlib.plan import shift_model


def _logit_errors(world: int) -> dict:
    ids = torch.randint(0, 256, (3, 37), generator=torch.Generator().manual_seed(1))
    errors = {}
    for dtype in (torch.float64, torch.float32):
        for family in ALL_FAMILIES:
            want = reference(family, dtype)(input_ids=ids).logits
            for tp, sp in SHAPES[world]:
                model = parallel(family, tp, sp, dtype)
                for m in ("tp", "sp"):
                    with shiftlib.mode(model, m):
                        got = model(input_ids=ids).logits
                    assert got.shape == want.shape
                    errors[(str(dtype), family, tp, sp, m)] = rel_error(got, want)
    return errors


@pytest.mark.parametrize("world", [1, 2, 4])
def test_logits_match_hugging_face_for_every_family_mesh_and_mode(ranks, world):
    for errors in ranks(world).run(_logit_errors, world):
        for (dtype, *case), err in errors.items():
            assert err <= TOLERANCE[getattr(torch, dtype.split(".")[1])], (dtype, case, err)


def _kv_after_prefill(tp: int, sp: int, kv_heads: int) -> float:
    """Run the same prompt through an empty cache in each mode and compare what each rank stored.

    Equal up to float64 rounding (the two modes multiply by the same weights in GEMMs of other shapes); a rank
    holding other heads in one mode would differ by O(1).
    """
    model = parallel("qwen3", tp, sp, num_key_value_heads=kv_heads)
    inner = shift_model(model)
    attn = inner.layers[0].self_attn
    caches = {}
    for m in ("tp", "sp"):
        cache = PagedKVCache(len(inner.layers), 4, 8, attn.heads.kv_per_chunk, attn.heads.head_dim, torch.float64, inner.mesh.device)
        n = 13  # not a multiple of sp: SP mode pads
        batch = AttentionBatch(
            query_pos=torch.arange(n), write_slots=torch.arange(n),
            block_tables=torch.tensor([[0, 1]], dtype=torch.int32), block_size=8,
            context_lens=torch.tensor([n], dtype=torch.int32), query_start=[0, n], context_lens_host=[n],
        )
        tokens = torch.arange(n) * 7 % 256
        inner.hidden(tokens, torch.arange(n), batch, m, torch.tensor([n - 1]), cache.layers, cache.trash_slot)
        caches[m] = cache.data[:, :, :n].clone()
        assert caches[m].abs().sum() > 0
    return rel_error(caches["sp"], caches["tp"])


@pytest.mark.parametrize("kv_heads", [8, 4, 1])
def test_kv_cache_is_identical_in_both_modes(ranks, kv_heads):
    for tp, sp in SHAPES[4]:
        assert max(ranks(4).run(_kv_after_prefill, tp, sp, kv_heads)) <= 1e-12, (tp, sp, kv_heads)


def _weight_storage(tp: int, sp: int) -> tuple[int, int, bool]:
    model = parallel("llama", tp, sp)
    local_bytes = sum(p.to_local().nbytes for p in set(model.parameters()))
    # Every tensor any module holds (parameters and the local/TP views the hot path uses), by storage.
    storages = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor):
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        for p in module.parameters(recurse=False):
            storages[p.to_local().untyped_storage().data_ptr()] = p.to_local().untyped_storage().nbytes()
    attn = shift_model(model).layers[0].self_attn
    shares = attn._qkv_tp.untyped_storage().data_ptr() == attn.qkv_weight.to_local().untyped_storage().data_ptr()
    return local_bytes, sum(storages.values()), shares


def test_tp_mode_weights_are_views_of_the_sp_shards(ranks):
    full = sum(p.nbytes for p in reference("llama").parameters())
    replicated = sum(p.nbytes for n, p in reference("llama").named_parameters() if "norm" in n)
    for tp, sp in SHAPES[4]:
        for local_bytes, held_bytes, shares in ranks(4).run(_weight_storage, tp, sp):
            assert shares
            assert held_bytes == local_bytes  # the TP mode adds no byte
            assert local_bytes == (full - replicated) // tp + replicated  # sharded over tp, replicated over sp


def _tp_innermost_mesh() -> float:
    """A mesh whose tp groups are contiguous ranks (multi-node layout): chunk != group rank."""
    mesh = DeviceMesh("cpu", torch.arange(4).view(2, 2).T, mesh_dim_names=("tp", "sp"))
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    want = reference("llama")(input_ids=ids).logits
    model = parallel("llama", 2, 2, mesh=mesh)
    errors = []
    for m in ("tp", "sp"):
        with shiftlib.mode(model, m):
            errors.append(rel_error(model(input_ids=ids).logits, want))
    return max(errors)


def test_both_rank_orders_give_the_same_logits(ranks):
    assert max(ranks(4).run(_tp_innermost_mesh)) <= 1e-9


def _compile_layer(tp: int, sp: int) -> float:
    model = parallel("qwen3", tp, sp, dtype=torch.float32)
    inner = shift_model(model)
    layer = inner.layers[0]
    n = 6
    batch = AttentionBatch.dense(1, n, torch.device("cpu"))
    cos, sin = (t[0] for t in inner.rotary_emb(inner.norm._w, torch.arange(n)[None]))
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(0))
    worst = 0.0
    for m in ("tp", "sp"):
        local = x if m == "tp" else x.view(sp, -1, 64)[inner.mesh.s]
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        residual = torch.ones_like(local)
        got, want = compiled(local, residual, cos, sin, batch, None, m), layer(local, residual, cos, sin, batch, None, m)
        worst = max(worst, *(rel_error(g, w) for g, w in zip(got, want)))
    return worst


def test_a_decoder_layer_compiles_with_fullgraph_in_both_modes(ranks):
    assert max(ranks(2).run(_compile_layer, 1, 2)) <= 1e-6
    assert max(ranks(2).run(_compile_layer, 2, 1)) <= 1e-6


def _random_case(family, tp, sp, heads, kv_heads, batch, seq_len) -> float:
    over = dict(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64 // heads)
    ids = torch.randint(0, 256, (batch, seq_len), generator=torch.Generator().manual_seed(seq_len))
    want = reference(family, **over)(input_ids=ids).logits
    model = parallel(family, tp, sp, **over)
    errs = []
    for m in ("tp", "sp"):
        with shiftlib.mode(model, m):
            errs.append(rel_error(model(input_ids=ids).logits, want))
    return max(errs)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    family=st.sampled_from(ALL_FAMILIES),
    shape=st.sampled_from(SHAPES[4]),
    heads_kv=st.sampled_from([(4, 4), (4, 2), (4, 1), (8, 8), (8, 2), (16, 4), (16, 16)]),
    batch=st.integers(1, 3),
    seq_len=st.integers(1, 19),
)
def test_any_batch_length_and_head_count_matches_hugging_face(ranks, family, shape, heads_kv, batch, seq_len):
    """Including fewer tokens than sp ranks (a single token on sp = 4)."""
    errors = ranks(4).run(_random_case, family, *shape, *heads_kv, batch, seq_len)
    assert max(errors) <= 1e-9


def _bad_inputs() -> list[str]:
    from transformers import GPT2Config, GPT2LMHeadModel

    messages = []

    def expect(fn, *words):
        with pytest.raises(ValueError) as info:
            fn()
        assert all(w in str(info.value) for w in words), str(info.value)
        messages.append(str(info.value))

    expect(lambda: shiftlib.init_mesh(2, 1, "cpu"), "world size 4", "--nproc-per-node 2")
    expect(lambda: shiftlib.init_mesh(0, 4, "cpu"), "positive")
    expect(lambda: parallel("llama", 4, 1, hidden_size=48, num_attention_heads=6, num_key_value_heads=6, head_dim=8), "num_attention_heads=6", "divisible")
    expect(lambda: parallel("llama", 2, 2, num_key_value_heads=8, num_attention_heads=8, intermediate_size=130), "intermediate_size=130")
    expect(lambda: parallel("llama", 2, 2, vocab_size=254), "vocab_size=254")
    expect(lambda: parallel("llama", 2, 2, hidden_size=96, num_key_value_heads=3, num_attention_heads=12, head_dim=8), "num_key_value_heads=3")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64))
    expect(lambda: shiftlib.parallelize(gpt2, shiftlib.init_mesh(2, 2, "cpu")), "GPT2LMHeadModel", "LlamaForCausalLM")
    model = parallel("llama", 2, 2)
    expect(lambda: shiftlib.mode(model, "pp").__enter__(), "unknown mode 'pp'")
    expect(lambda: shiftlib.parallelize(model, shiftlib.init_mesh(2, 2, "cpu")), "already parallelized")
    expect(lambda: shiftlib.mode(copy.deepcopy(reference("llama")), "tp").__enter__(), "not parallelized")
    expect(lambda: shiftlib.parallelize(copy.deepcopy(reference("llama")), shiftlib.init_mesh(2, 2, "cpu"), -1), "threshold")
    return messages


def test_bad_input_gets_a_clear_error(ranks):
    ranks(4).run(_bad_inputs)


ROPES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256},
}


def _rope_errors(kind: str) -> float:
    over = dict(rope_parameters={"rope_theta": 10000.0, **ROPES[kind]})
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(5))
    want = reference("llama", **over)(input_ids=ids).logits
    errors = []
    for tp, sp in SHAPES[2]:
        model = parallel("llama", tp, sp, **over)
        for m in ("tp", "sp"):
            with shiftlib.mode(model, m):
                errors.append(rel_error(model(input_ids=ids).logits, want))
    return max(errors)


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_every_rope_variant_matches_hugging_face(ranks, kind):
    assert max(ranks(2).run(_rope_errors, kind)) <= 1e-9
