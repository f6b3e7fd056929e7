"""Snapshots of one tiny DeepSeek-V3.2 attention layer's graph before and after the DCP passes, and of a dense
MLA (DeepSeek-V3) layer.

Regenerate after an intended change with: EXPECTTEST_ACCEPT=1 python -m pytest tests/test_graph_snapshots.py
"""
import expecttest
import torch

from dcp_compile.api import attention_config, capture_and_match
from dcp_compile.capture import probe_layers
from dcp_compile.layout import DCPLayout
from dcp_compile.passes import dcp_passes, readable
from dcp_compile.testing import tiny_deepseek_v3, tiny_deepseek_v32


def captured_layer(impl="eager", make=tiny_deepseek_v32):
    model = make(dtype=torch.float32, attn_implementation=impl)
    layer = probe_layers(model)[0]
    return capture_and_match(layer)


def rewritten(captured, match):
    config = attention_config(match, DCPLayout(2, 1, 4), rank=0, group_name="dcp")
    return dcp_passes(match, config, "tp")(captured.graph_module)


class TestGraphSnapshots(expecttest.TestCase):
    def test_match_reads_the_layer(self):
        _, m = captured_layer()
        self.assertEqual((m.heads, m.latent_dim, m.rope_dim, m.kv_expansion.nope_dim, m.kv_expansion.v_dim), (4, 32, 8, 16, 16))
        self.assertEqual(m.indexer.topk, 8)
        self.assertAlmostEqual(m.attention.scale, 24 ** -0.5)
        self.assertAlmostEqual(m.indexer.scale, 16 ** -0.5)
        _, s = captured_layer("sdpa")
        self.assertEqual((s.heads, s.indexer.topk), (4, 8))
        self.assertAlmostEqual(s.attention.scale, 24 ** -0.5)

    def test_trace_grows_past_length_beyond_the_topk(self):
        # HF takes min(index_topk, length): the trace must be longer than the top-k to see it as a constant.
        model = tiny_deepseek_v32(dtype=torch.float32, index_topk=100)
        captured, match = capture_and_match(probe_layers(model)[0])
        self.assertEqual(match.indexer.topk, 100)
        self.assertGreater(captured.past_len, 100)

    def test_layouts_are_checked(self):
        import dataclasses

        from dcp_compile.match import MatchError, check_layouts

        _, m = captured_layer()
        check_layouts(m)  # HF's own layout passes
        swapped = dataclasses.replace(m, attention=dataclasses.replace(
            m.attention, query_nope=m.attention.query_rope, query_rope=m.attention.query_nope))
        with self.assertRaisesRegex(MatchError, r"model.layers.0.self_attn: the non-rotary query have shape"):
            check_layouts(swapped)

    def test_layer_graph_before_and_after(self):
        captured, match = captured_layer()
        self.assertExpectedInline(readable(captured.graph_module), """\
params_1 <- param q_a_proj.weight
params_2 <- param q_a_layernorm.weight
params_3 <- param q_b_proj.weight
params_4 <- param kv_a_proj_with_mqa.weight
params_5 <- param kv_a_layernorm.weight
params_6 <- param kv_b_proj.weight
params_7 <- param o_proj.weight
params_8 <- param indexer.wq_b.weight
params_9 <- param indexer.wk.weight
params_10 <- param indexer.k_norm.weight
params_11 <- param indexer.k_norm.bias
params_12 <- param indexer.weights_proj.weight
inputs_1 <- input 1.hidden_states
inputs_2 <- input 1.attention_mask
inputs_3 <- input 1.position_ids
inputs_4 <- input 1.position_embeddings.0
inputs_5 <- input 1.position_embeddings.1
past_key_1 <- past 0
past_value_1 <- past 1
past_index_1 <- past 2
linear = aten.linear(inputs_1, params_1)
to = aten.to(linear, torch.float32)
pow_1 = aten.pow(to, 2)
mean = aten.mean(pow_1, [-1], True)
add = aten.add(mean, 1e-06)
rsqrt = aten.rsqrt(add)
mul = aten.mul(to, rsqrt)
to_1 = aten.to(mul, torch.float32)
mul_1 = aten.mul(params_2, to_1)
linear_1 = aten.linear(mul_1, params_3)
sym_size_int = aten.sym_size(inputs_1, 0)
sym_size_int_1 = aten.sym_size(inputs_1, 1)
view = aten.view(linear_1, [sym_size_int, sym_size_int_1, -1, 24])
transpose = aten.transpose(view, 1, 2)
split_with_sizes = aten.split_with_sizes(transpose, [16, 8], -1)
getitem = getitem(split_with_sizes, 0)
getitem_1 = getitem(split_with_sizes, 1)
linear_2 = aten.linear(inputs_1, params_4)
split_with_sizes_1 = aten.split_with_sizes(linear_2, [32, 8], -1)
getitem_2 = getitem(split_with_sizes_1, 0)
getitem_3 = getitem(split_with_sizes_1, 1)
to_2 = aten.to(getitem_2, torch.float32)
pow_2 = aten.pow(to_2, 2)
mean_1 = aten.mean(pow_2, [-1], True)
add_1 = aten.add(mean_1, 1e-06)
rsqrt_1 = aten.rsqrt(add_1)
mul_2 = aten.mul(to_2, rsqrt_1)
to_3 = aten.to(mul_2, torch.float32)
mul_3 = aten.mul(params_5, to_3)
view_1 = aten.view(mul_3, [sym_size_int, 1, sym_size_int_1, 32])
view_2 = aten.view(getitem_3, [sym_size_int, 1, sym_size_int_1, 8])
slice_1 = aten.slice(inputs_4, 2, 0, 4)
unsqueeze = aten.unsqueeze(slice_1, 1)
slice_2 = aten.slice(inputs_5, 2, 0, 4)
unsqueeze_1 = aten.unsqueeze(slice_2, 1)
slice_3 = aten.slice(getitem_1, 3, 0, 9223372036854775807, 2)
slice_4 = aten.slice(getitem_1, 3, 1, 9223372036854775807, 2)
slice_5 = aten.slice(view_2, 3, 0, 9223372036854775807, 2)
slice_6 = aten.slice(view_2, 3, 1, 9223372036854775807, 2)
mul_4 = aten.mul(slice_3, unsqueeze)
mul_5 = aten.mul(slice_4, unsqueeze_1)
sub = aten.sub(mul_4, mul_5)
mul_6 = aten.mul(slice_4, unsqueeze)
mul_7 = aten.mul(slice_3, unsqueeze_1)
add_2 = aten.add(mul_6, mul_7)
cat = aten.cat([sub, add_2], -1)
mul_8 = aten.mul(slice_5, unsqueeze)
mul_9 = aten.mul(slice_6, unsqueeze_1)
sub_1 = aten.sub(mul_8, mul_9)
mul_10 = aten.mul(slice_6, unsqueeze)
mul_11 = aten.mul(slice_5, unsqueeze_1)
add_3 = aten.add(mul_10, mul_11)
cat_1 = aten.cat([sub_1, add_3], -1)
cache_update = dcp_capture.cache_update(view_1, cat_1, past_key_1, past_value_1, 2)
getitem_4 = getitem(cache_update, 0)
getitem_5 = getitem(cache_update, 1)
cat_2 = aten.cat([getitem, cat], -1)
linear_3 = aten.linear(getitem_4, params_6)
sym_size_int_2 = aten.sym_size(past_key_1, 0)
sym_size_int_3 = aten.sym_size(getitem_4, 2)
view_3 = aten.view(linear_3, [sym_size_int_2, sym_size_int_3, -1, 32])
transpose_1 = aten.transpose(view_3, 1, 2)
split_with_sizes_2 = aten.split_with_sizes(transpose_1, [16, 16], -1)
getitem_6 = getitem(split_with_sizes_2, 0)
getitem_7 = getitem(split_with_sizes_2, 1)
expand = aten.expand(getitem_5, [-1, 4, -1, -1])
sym_size_int_4 = aten.sym_size(view_3, 1)
new_empty = aten.new_empty(transpose_1, [sym_size_int_2, 4, sym_size_int_4, 24], pin_memory=False)
slice_7 = aten.slice(new_empty, 3, 0, 16)
copy_ = aten.copy_(slice_7, getitem_6)
slice_8 = aten.slice(new_empty, 3, 16, 9223372036854775807)
copy__1 = aten.copy_(slice_8, expand)
slice_9 = aten.slice(inputs_2, 0, 0, 9223372036854775807)
select = aten.select(slice_9, 1, 0)
slice_10 = aten.slice(select, 1, 0, 9223372036854775807)
slice_11 = aten.slice(slice_10, 2, 0, 9223372036854775807)
_set_grad_enabled = _set_grad_enabled(False)
linear_4 = aten.linear(mul_1, params_8)
view_4 = aten.view(linear_4, [sym_size_int, sym_size_int_1, 8, 16])
split_with_sizes_3 = aten.split_with_sizes(view_4, [8, 8], -1)
getitem_8 = getitem(split_with_sizes_3, 0)
getitem_9 = getitem(split_with_sizes_3, 1)
linear_5 = aten.linear(inputs_1, params_9)
layer_norm = aten.layer_norm(linear_5, [16], params_10, params_11, 1e-06)
unsqueeze_2 = aten.unsqueeze(layer_norm, 2)
split_with_sizes_4 = aten.split_with_sizes(unsqueeze_2, [8, 8], -1)
getitem_10 = getitem(split_with_sizes_4, 0)
getitem_11 = getitem(split_with_sizes_4, 1)
unsqueeze_3 = aten.unsqueeze(inputs_4, 2)
unsqueeze_4 = aten.unsqueeze(inputs_5, 2)
mul_12 = aten.mul(getitem_8, unsqueeze_3)
slice_12 = aten.slice(getitem_8, 3, 0, 4)
slice_13 = aten.slice(getitem_8, 3, 4, 9223372036854775807)
neg = aten.neg(slice_13)
cat_3 = aten.cat([neg, slice_12], -1)
mul_13 = aten.mul(cat_3, unsqueeze_4)
add_4 = aten.add(mul_12, mul_13)
mul_14 = aten.mul(getitem_10, unsqueeze_3)
slice_14 = aten.slice(getitem_10, 3, 0, 4)
slice_15 = aten.slice(getitem_10, 3, 4, 9223372036854775807)
neg_1 = aten.neg(slice_15)
cat_4 = aten.cat([neg_1, slice_14], -1)
mul_15 = aten.mul(cat_4, unsqueeze_4)
add_5 = aten.add(mul_14, mul_15)
cat_5 = aten.cat([add_4, getitem_9], -1)
cat_6 = aten.cat([add_5, getitem_11], -1)
squeeze = aten.squeeze(cat_6, 2)
indexer_update = dcp_capture.indexer_update(squeeze, past_index_1, 1)
to_4 = aten.to(cat_5, torch.float32)
transpose_2 = aten.transpose(indexer_update, -1, -2)
to_5 = aten.to(transpose_2, torch.float32)
unsqueeze_5 = aten.unsqueeze(to_5, 1)
matmul = aten.matmul(to_4, unsqueeze_5)
mul_16 = aten.mul(matmul, 0.25)
relu = aten.relu(mul_16)
to_6 = aten.to(inputs_1, torch.float32)
linear_6 = aten.linear(to_6, params_12)
to_7 = aten.to(linear_6, torch.float32)
mul_17 = aten.mul(to_7, 0.353553)
unsqueeze_6 = aten.unsqueeze(mul_17, -2)
matmul_1 = aten.matmul(unsqueeze_6, relu)
squeeze_1 = aten.squeeze(matmul_1, -2)
add_6 = aten.add(squeeze_1, slice_11)
topk = aten.topk(add_6, 8)
getitem_12 = getitem(topk, 0)
getitem_13 = getitem(topk, 1)
to_8 = aten.to(getitem_13, torch.int32)
_set_grad_enabled_1 = _set_grad_enabled(True)
new_ones = aten.new_ones(to_8, [sym_size_int, sym_size_int_1, sym_size_int_4], dtype=torch.bool, pin_memory=False)
to_9 = aten.to(to_8, torch.int64)
scatter = aten.scatter(new_ones, -1, to_9, False)
unsqueeze_7 = aten.unsqueeze(scatter, 1)
masked_fill = aten.masked_fill(inputs_2, unsqueeze_7, -3.40282e+38)
transpose_3 = aten.transpose(new_empty, 2, 3)
matmul_2 = aten.matmul(cat_2, transpose_3)
mul_18 = aten.mul(matmul_2, 0.204124)
add_7 = aten.add(mul_18, masked_fill)
softmax = aten.softmax(add_7, -1, torch.float32)
to_10 = aten.to(softmax, torch.float32)
dropout = aten.dropout(to_10, 0, False)
matmul_3 = aten.matmul(dropout, getitem_7)
transpose_4 = aten.transpose(matmul_3, 1, 2)
contiguous = aten.contiguous(transpose_4)
reshape = aten.reshape(contiguous, [sym_size_int, sym_size_int_1, -1])
linear_7 = aten.linear(reshape, params_7)
return [linear_7, dropout]""")
        self.assertExpectedInline(readable(rewritten(captured, match)), """\
params_1 <- param q_a_proj.weight
params_2 <- param q_a_layernorm.weight
params_3 <- param q_b_proj.weight
params_4 <- param kv_a_proj_with_mqa.weight
params_5 <- param kv_a_layernorm.weight
params_6 <- param kv_b_proj.weight
params_7 <- param o_proj.weight
params_8 <- param indexer.wq_b.weight
params_9 <- param indexer.wk.weight
params_10 <- param indexer.k_norm.weight
params_11 <- param indexer.k_norm.bias
params_12 <- param indexer.weights_proj.weight
inputs_1 <- input 1.hidden_states
inputs_2 <- input 1.attention_mask
inputs_4 <- input 1.position_embeddings.0
inputs_5 <- input 1.position_embeddings.1
latent_pool <- state latent_pool
index_pool <- state index_pool
block_table <- state block_table
query_positions <- state query_positions
key_positions <- state key_positions
key_slots <- state key_slots
linear = aten.linear(inputs_1, params_1)
to = aten.to(linear, torch.float32)
pow_1 = aten.pow(to, 2)
mean = aten.mean(pow_1, [-1], True)
add = aten.add(mean, 1e-06)
rsqrt = aten.rsqrt(add)
mul = aten.mul(to, rsqrt)
to_1 = aten.to(mul, torch.float32)
mul_1 = aten.mul(params_2, to_1)
linear_1 = aten.linear(mul_1, params_3)
sym_size_int = aten.sym_size(inputs_1, 0)
sym_size_int_1 = aten.sym_size(inputs_1, 1)
view = aten.view(linear_1, [sym_size_int, sym_size_int_1, -1, 24])
transpose = aten.transpose(view, 1, 2)
split_with_sizes = aten.split_with_sizes(transpose, [16, 8], -1)
getitem = getitem(split_with_sizes, 0)
getitem_1 = getitem(split_with_sizes, 1)
linear_2 = aten.linear(inputs_1, params_4)
split_with_sizes_1 = aten.split_with_sizes(linear_2, [32, 8], -1)
getitem_2 = getitem(split_with_sizes_1, 0)
getitem_3 = getitem(split_with_sizes_1, 1)
to_2 = aten.to(getitem_2, torch.float32)
pow_2 = aten.pow(to_2, 2)
mean_1 = aten.mean(pow_2, [-1], True)
add_1 = aten.add(mean_1, 1e-06)
rsqrt_1 = aten.rsqrt(add_1)
mul_2 = aten.mul(to_2, rsqrt_1)
to_3 = aten.to(mul_2, torch.float32)
mul_3 = aten.mul(params_5, to_3)
view_1 = aten.view(mul_3, [sym_size_int, 1, sym_size_int_1, 32])
view_2 = aten.view(getitem_3, [sym_size_int, 1, sym_size_int_1, 8])
slice_1 = aten.slice(inputs_4, 2, 0, 4)
unsqueeze = aten.unsqueeze(slice_1, 1)
slice_2 = aten.slice(inputs_5, 2, 0, 4)
unsqueeze_1 = aten.unsqueeze(slice_2, 1)
slice_3 = aten.slice(getitem_1, 3, 0, 9223372036854775807, 2)
slice_4 = aten.slice(getitem_1, 3, 1, 9223372036854775807, 2)
slice_5 = aten.slice(view_2, 3, 0, 9223372036854775807, 2)
slice_6 = aten.slice(view_2, 3, 1, 9223372036854775807, 2)
mul_4 = aten.mul(slice_3, unsqueeze)
mul_5 = aten.mul(slice_4, unsqueeze_1)
sub = aten.sub(mul_4, mul_5)
mul_6 = aten.mul(slice_4, unsqueeze)
mul_7 = aten.mul(slice_3, unsqueeze_1)
add_2 = aten.add(mul_6, mul_7)
cat = aten.cat([sub, add_2], -1)
mul_8 = aten.mul(slice_5, unsqueeze)
mul_9 = aten.mul(slice_6, unsqueeze_1)
sub_1 = aten.sub(mul_8, mul_9)
mul_10 = aten.mul(slice_6, unsqueeze)
mul_11 = aten.mul(slice_5, unsqueeze_1)
add_3 = aten.add(mul_10, mul_11)
cat_1 = aten.cat([sub_1, add_3], -1)
linear_4 = aten.linear(mul_1, params_8)
view_4 = aten.view(linear_4, [sym_size_int, sym_size_int_1, 8, 16])
split_with_sizes_3 = aten.split_with_sizes(view_4, [8, 8], -1)
getitem_8 = getitem(split_with_sizes_3, 0)
getitem_9 = getitem(split_with_sizes_3, 1)
linear_5 = aten.linear(inputs_1, params_9)
layer_norm = aten.layer_norm(linear_5, [16], params_10, params_11, 1e-06)
unsqueeze_2 = aten.unsqueeze(layer_norm, 2)
split_with_sizes_4 = aten.split_with_sizes(unsqueeze_2, [8, 8], -1)
getitem_10 = getitem(split_with_sizes_4, 0)
getitem_11 = getitem(split_with_sizes_4, 1)
unsqueeze_3 = aten.unsqueeze(inputs_4, 2)
unsqueeze_4 = aten.unsqueeze(inputs_5, 2)
mul_12 = aten.mul(getitem_8, unsqueeze_3)
slice_12 = aten.slice(getitem_8, 3, 0, 4)
slice_13 = aten.slice(getitem_8, 3, 4, 9223372036854775807)
neg = aten.neg(slice_13)
cat_3 = aten.cat([neg, slice_12], -1)
mul_13 = aten.mul(cat_3, unsqueeze_4)
add_4 = aten.add(mul_12, mul_13)
mul_14 = aten.mul(getitem_10, unsqueeze_3)
slice_14 = aten.slice(getitem_10, 3, 0, 4)
slice_15 = aten.slice(getitem_10, 3, 4, 9223372036854775807)
neg_1 = aten.neg(slice_15)
cat_4 = aten.cat([neg_1, slice_14], -1)
mul_15 = aten.mul(cat_4, unsqueeze_4)
add_5 = aten.add(mul_14, mul_15)
cat_5 = aten.cat([add_4, getitem_9], -1)
cat_6 = aten.cat([add_5, getitem_11], -1)
squeeze = aten.squeeze(cat_6, 2)
to_4 = aten.to(cat_5, torch.float32)
to_6 = aten.to(inputs_1, torch.float32)
linear_6 = aten.linear(to_6, params_12)
to_7 = aten.to(linear_6, torch.float32)
mul_17 = aten.mul(to_7, 0.353553)
dcp_attention = dcp_attention(q_nope=getitem, q_rope=cat, latent_new=view_1, rope_new=cat_1, index_key_new=squeeze, index_q=to_4, index_w=mul_17, mask=inputs_2, kv_b_weight=params_6, latent_pool=latent_pool, index_pool=index_pool, block_table=block_table, query_positions=query_positions, key_positions=key_positions, key_slots=key_slots)
linear_default = aten.linear(dcp_attention, params_7)
tp_all_reduce = tp_all_reduce(linear_default, 'tp')
return [tp_all_reduce, None]""")


def test_indexer_query_is_taken_before_the_float32_upcast():
    # HF scores the indexer as q.float() @ k.float(): a bf16 model's DCP indexer receives the bf16 query (the
    # same products, exact in fp32, on the kernel's fast path); a float64 model keeps HF's float32 query.
    for dtype, want in ((torch.bfloat16, torch.bfloat16), (torch.float64, torch.float32)):
        model = tiny_deepseek_v32(dtype=dtype)
        _, match = capture_and_match(probe_layers(model)[0])
        assert match.indexer.query.meta["val"].dtype == want, (dtype, match.indexer.query.meta["val"].dtype)


class TestDenseMLASnapshots(expecttest.TestCase):
    def test_dense_layer_graph_before_and_after(self):
        # No indexer: the match finds no selection of the layer's own and the mask reaching SDPA is the layer's
        # mask input as given, so the layer attends every owned row the mask allows ("owned_rows").
        captured, match = captured_layer("sdpa", make=tiny_deepseek_v3)
        self.assertEqual((match.selection, match.indexer, match.handed), ("owned_rows", None, None))
        before = readable(captured.graph_module).splitlines()
        core = next(i for i, line in enumerate(before) if "scaled_dot_product_attention" in line)
        # The cache boundary, then SDPA reading the layer's attention_mask input (inputs_2) as given: no selection.
        self.assertExpectedInline("\n".join([line for line in before if "cache_update(" in line] + before[core:]), """\
cache_update = dcp_capture.cache_update(view_1, cat_1, past_key_1, past_value_1, 2)
scaled_dot_product_attention = aten.scaled_dot_product_attention(cat_2, new_empty, getitem_7, inputs_2, scale=0.204124)
reshape = aten.reshape(scaled_dot_product_attention, [sym_size_int, -1, sym_size_int_5, 16])
transpose_2 = aten.transpose(reshape, 1, 2)
contiguous = aten.contiguous(transpose_2)
reshape_1 = aten.reshape(contiguous, [sym_size_int, sym_size_int_1, -1])
linear_4 = aten.linear(reshape_1, params_7)
return [linear_4, None]""")
        after = readable(rewritten(captured, match)).splitlines()
        # The DCP call, without indexer inputs, then the row-parallel output projection.
        self.assertExpectedInline("\n".join(after[next(i for i, x in enumerate(after) if x.startswith("dcp_attention")):]), """\
dcp_attention = dcp_attention(q_nope=getitem, q_rope=cat, latent_new=view_1, rope_new=cat_1, mask=inputs_2, kv_b_weight=params_6, latent_pool=latent_pool, index_pool=index_pool, block_table=block_table, query_positions=query_positions, key_positions=key_positions, key_slots=key_slots)
linear_default = aten.linear(dcp_attention, params_7)
tp_all_reduce = tp_all_reduce(linear_default, 'tp')
return [tp_all_reduce, None]""")
