"""Block-FP8 checkpoints (dcp_compile/fp8.py): HF's FP8Linear under apply.

CPU: the tiny DeepSeek-V3.2 with every linear but the LM head replaced by transformers' ``FP8Linear`` (weights
quantized to float8_e4m3fn in 16 x 16 blocks, ``weight_scale_inv`` per block; the tiny heads are 24 / 16 wide,
so 128 x 128 blocks would not shard). HF's FP8 kernels are CUDA-only, so on CPU both the unmodified model and
the rewritten one run ``fp8.dequantizing_fp8_linear`` in their place (patched into transformers, each rank).

GPU (``test_fp8_checkpoint_on_cuda_matches_unmodified``, skipped without CUDA): a random tiny DeepSeek-V3.2 with
128-multiple dims saved as a real block-FP8 safetensors checkpoint (``quantization_config``: fp8, [128, 128]),
loaded with ``from_pretrained(..., device_map="cuda")`` (HF's FP8Linear, HF's kernels when they load), apply on
world 1, greedy generate against the unmodified FP8 model.
"""
import os

import pytest
import torch
from torch import nn

import dcp_compile
from dcp_compile.capture import probe_layers
from dcp_compile.fp8 import FP8_LINEAR, check_fp8_layer, dequantize, dequantize_kv_expansion, quantize, \
    use_dequantizing_fp8_linear
from dcp_compile.shard import head_shard_plan, shard_heads
from dcp_compile.testing import left_padded_prompts, run_ranks, tiny_deepseek_v32, write_block_fp8

BLOCK = (16, 16)
# Kept unquantized, as in DeepSeek-V3.2's checkpoint: HF's indexer casts its input to weights_proj's weight dtype.
NOT_FP8 = ("lm_head", "weights_proj")
NEW_TOKENS = 10
PROMPT = (6, 19)  # batch 2, left padded; 19 > index_topk 8: the indexer selects
LOGIT_TOL = 1e-5  # float64, as test_generate_parity.py (HF's eager softmax rounds through float32)


def fp8_model(block=BLOCK, dtype=torch.float64, seed=0):
    """The tiny DeepSeek-V3.2 in ``dtype`` with every nn.Linear but ``NOT_FP8`` an FP8Linear of its quantized weight."""
    from transformers.integrations.finegrained_fp8 import FP8Linear

    model = tiny_deepseek_v32(seed=seed, dtype=dtype, attn_implementation="sdpa")
    for name, linear in list(model.named_modules()):
        if type(linear) is not nn.Linear or name.endswith(NOT_FP8):
            continue
        fp8 = FP8Linear(linear.in_features, linear.out_features, block_size=tuple(block), has_bias=linear.bias is not None)
        weight, scale_inv = quantize(linear.weight.detach(), block)
        fp8.weight = nn.Parameter(weight, requires_grad=False)
        fp8.weight_scale_inv = nn.Parameter(scale_inv, requires_grad=False)
        if linear.bias is not None:
            fp8.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        model.set_submodule(name, fp8)
    return model.eval()


def _generate(model):
    ids, mask = left_padded_prompts(PROMPT, seed=5)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def _first_layer(model):
    layer = probe_layers(model)[0]
    captured, match = dcp_compile.capture_and_match(layer)
    return layer, captured, match


# --- dequantization ------------------------------------------------------------------------------------------------------
def test_dequantize_is_weight_times_its_block_scale_with_partial_edge_blocks():
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(40, 37, generator=gen) * 100).to(torch.float8_e4m3fn)  # 3 x 3 blocks of 16, partial edges
    scales = torch.rand(3, 3, generator=gen, dtype=torch.float32) + 0.5
    got = dequantize(weight, scales, (16, 16), torch.float64)
    want = torch.empty(40, 37, dtype=torch.float64)
    for i in range(40):
        for j in range(37):
            want[i, j] = float(weight[i, j].float()) * float(scales[i // 16, j // 16])
    assert got.dtype == torch.float64 and torch.equal(got, want)
    assert torch.equal(dequantize(weight, scales, (16, 16), torch.bfloat16), want.float().to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"does not fit a \[40, 37\] weight in 32 x 32 blocks"):
        dequantize(weight, scales, (32, 32), torch.float32)


def test_quantize_then_dequantize_is_within_fp8_rounding():
    weight = torch.randn(50, 70, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fp8, scale_inv = quantize(weight, (16, 32))
    assert fp8.dtype == torch.float8_e4m3fn and scale_inv.shape == (4, 3)
    back = dequantize(fp8, scale_inv, (16, 32), torch.float64)
    # e4m3: 3 mantissa bits, half an ulp of relative error for normal values; the block max maps to 448 exactly
    err = ((back - weight).abs() / weight.abs().clamp_min(1e-3)).max().item()
    assert 0 < err < 2 ** -3


# --- capture, match, head sharding ----------------------------------------------------------------------------------------
def test_fp8_linears_are_captured_as_one_op_and_matched_as_the_projections():
    with use_dequantizing_fp8_linear():
        model = fp8_model()
        layer, captured, match = _first_layer(model)
    ops = [n for n in captured.graph_module.graph.nodes if n.target is FP8_LINEAR]
    assert len(ops) >= 7  # q_a, q_b, kv_a, kv_b, o_proj, the indexer's wq_b and wk
    assert match.kv_expansion.linear.target is FP8_LINEAR
    assert match.query_projection.linear.target is FP8_LINEAR
    assert match.attention.out_proj.target is FP8_LINEAR
    assert [p.weight for p in head_shard_plan(match)] == ["q_b_proj.weight", "kv_b_proj.weight", "o_proj.weight"]


def test_kv_b_proj_is_dequantized_to_the_compute_dtype():
    with use_dequantizing_fp8_linear():
        model = fp8_model(dtype=torch.float32)
        layer, _, match = _first_layer(model)
        fp8 = layer.module.kv_b_proj
        want = dequantize(fp8.weight, fp8.weight_scale_inv, fp8.block_size, torch.float32)
        assert dequantize_kv_expansion(layer.module, match)
        plain = layer.module.kv_b_proj
        assert type(plain) is nn.Linear and plain.weight.dtype == torch.float32 and torch.equal(plain.weight, want)
        _, captured, again = _first_layer(model)
        assert again.kv_expansion.linear.target is torch.ops.aten.linear.default  # the retrace reads the plain linear
        assert not dequantize_kv_expansion(layer.module, again)  # nothing left to dequantize


@pytest.mark.parametrize("rank", [0, 1])
def test_head_sharding_slices_fp8_weights_and_block_scales_together(rank):
    with use_dequantizing_fp8_linear():
        model = fp8_model()
        layer, _, match = _first_layer(model)
    attn = layer.module
    whole = {n: (getattr(attn, n).weight.clone(), getattr(attn, n).weight_scale_inv.clone()) for n in ("q_b_proj", "o_proj")}
    deq = {n: dequantize(w, s, BLOCK, torch.float64) for n, (w, s) in whole.items()}
    check_fp8_layer(attn, match, head_shard_plan(match), 2)  # 2 heads x 24 rows / 2 heads x 16 columns: whole blocks
    dequantize_kv_expansion(attn, match)
    shard_heads(attn, match, rank, 2)
    q_rows, o_cols = slice(rank * 48, (rank + 1) * 48), slice(rank * 32, (rank + 1) * 32)
    q, o = attn.q_b_proj, attn.o_proj
    assert q.weight.view(torch.uint8).equal(whole["q_b_proj"][0][q_rows].view(torch.uint8))
    assert q.weight_scale_inv.equal(whole["q_b_proj"][1][rank * 3 : (rank + 1) * 3])
    assert o.weight.view(torch.uint8).equal(whole["o_proj"][0][:, o_cols].view(torch.uint8))
    assert o.weight_scale_inv.equal(whole["o_proj"][1][:, rank * 2 : (rank + 1) * 2])
    assert torch.equal(dequantize(q.weight, q.weight_scale_inv, BLOCK, torch.float64), deq["q_b_proj"][q_rows])
    assert torch.equal(dequantize(o.weight, o.weight_scale_inv, BLOCK, torch.float64), deq["o_proj"][:, o_cols])
    assert (q.out_features, q.in_features, o.out_features, o.in_features) == (48, 32, 64, 32)
    assert attn.kv_b_proj.weight.shape == (64, 32) and attn.kv_b_proj.weight.dtype == torch.float64


def test_heads_not_covering_whole_scale_blocks_are_rejected_naming_the_numbers():
    with use_dequantizing_fp8_linear():
        model = fp8_model()
        layer, _, match = _first_layer(model)
    plan = head_shard_plan(match)
    with pytest.raises(dcp_compile.UnsupportedModelError,
                       match=r"`q_b_proj` is an FP8 linear with 16 x 16 scale blocks, sharded colwise by head over 4 "
                             r"ranks: each rank's 1 heads x 24 rows = 24 rows are not a multiple of the block's 16"):
        check_fp8_layer(layer.module, match, plan, 4)
    check_fp8_layer(layer.module, match, plan, 1)  # one rank: nothing is split
    # An FP8Linear with FP4 weights (two e2m1 values packed per int8): not block-FP8, which is all apply reads.
    q_a = layer.module.q_a_proj
    q_a.weight = nn.Parameter(torch.zeros(q_a.out_features, q_a.in_features // 2, dtype=torch.int8), requires_grad=False)
    with pytest.raises(dcp_compile.UnsupportedModelError, match=r"`q_a_proj` is a FP8Linear holding torch.int8 weights"):
        check_fp8_layer(layer.module, match, plan, 1)


def test_apply_rejects_fp8_misaligned_blocks_before_any_collective():
    class NoCollectives:  # a 1-D mesh of 4 whose group apply must never reach
        ndim = 1

        def size(self):
            return 4

        def get_local_rank(self):
            return 0

        def get_group(self):
            raise AssertionError("apply reached a collective")

    with use_dequantizing_fp8_linear():
        model = fp8_model()
        with pytest.raises(dcp_compile.UnsupportedModelError, match=r"not a multiple of the block's 16"):
            dcp_compile.apply(model, NoCollectives())


def test_float8_parameters_outside_hf_fp8_modules_are_still_rejected():
    model = tiny_deepseek_v32(dtype=torch.float32)
    model.model.layers[0].self_attn.q_a_proj.weight.data = model.model.layers[0].self_attn.q_a_proj.weight.data.to(
        torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        dcp_compile.apply(model, object.__new__(type("Mesh", (), {"ndim": 1, "size": lambda self: 1})))


# --- parity on gloo ranks -----------------------------------------------------------------------------------------------
def rank_main(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    with use_dequantizing_fp8_linear():
        model = fp8_model()
        dcp_compile.apply(model, init_device_mesh("cpu", (world,)), page_size=4)
        tokens, logits = _generate(model)
        attn = model.model.layers[0].self_attn
        return dict(tokens=tokens, logits=logits, kv_b=type(attn.kv_b_proj).__name__, q_b=type(attn.q_b_proj).__name__,
                    q_b_scales=tuple(attn.q_b_proj.weight_scale_inv.shape))


@pytest.mark.parametrize("world", [1, 2])
def test_fp8_model_under_apply_generates_what_the_unmodified_fp8_model_does(world):
    with use_dequantizing_fp8_linear():
        want_tokens, want_logits = _generate(fp8_model())
    for rank, got in enumerate(run_ranks(rank_main, world, timeout=900)):
        assert got["kv_b"] == "Linear" and got["q_b"] == "FP8Linear", got
        assert got["q_b_scales"] == (6 // world, 2), got  # 96 rows / 16 per block, split by rank; 32 columns
        assert torch.equal(got["tokens"], want_tokens), f"world {world} rank {rank}: tokens differ"
        err = (got["logits"] - want_logits).abs().max().item()
        assert err < LOGIT_TOL, f"world {world} rank {rank}: logits differ by {err:.2e}"


# --- GPU: a real block-FP8 checkpoint -------------------------------------------------------------------------------------
GPU_BLOCK = [128, 128]
GPU_TOKENS = 16


def save_random_fp8_checkpoint(path, seed=0):
    """A random tiny DeepSeek-V3.2 saved as a block-FP8 checkpoint the way DeepSeek ships V3.2: every linear but
    ``NOT_FP8`` as float8_e4m3fn + ``weight_scale_inv`` in 128 x 128 blocks, ``quantization_config`` in config.json.
    All layers dense (no FP8 experts), and every quantized weight whole blocks, which HF's dequantizing load needs:
    rotary 128 so that kv_a_proj_with_mqa's latent + rotary rows (128 + 128) are whole blocks."""
    model = tiny_deepseek_v32(
        seed=seed, dtype=torch.bfloat16, attn_implementation="sdpa", hidden_size=256, intermediate_size=512,
        num_hidden_layers=2, first_k_dense_replace=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=256,
        kv_lora_rank=128, qk_rope_head_dim=128, qk_nope_head_dim=128, v_head_dim=128, index_n_heads=4,
        index_head_dim=256, index_topk=16, vocab_size=512)
    quantized = {f"{name}.weight" for name, m in model.named_modules()
                 if type(m) is nn.Linear and not name.endswith(NOT_FP8)}
    model.save_pretrained(path)

    def whole_blocks(key, value):  # HF's dequantizing load needs whole blocks
        if key not in quantized:
            return False
        assert value.shape[0] % GPU_BLOCK[0] == 0 and value.shape[1] % GPU_BLOCK[1] == 0, (key, value.shape)
        return True

    done = set(write_block_fp8(path, GPU_BLOCK, whole_blocks, NOT_FP8))
    assert done == quantized, f"linears not found under their module names in the checkpoint: {sorted(quantized - done)}"
    return len(done)


def _hf_fp8_kernels_load() -> str | None:
    """None if transformers' FP8 linear kernels load here, else why not."""
    from transformers.integrations.finegrained_fp8 import load_finegrained_fp8_kernel

    try:
        load_finegrained_fp8_kernel()
        return None
    except Exception as e:  # noqa: BLE001 — ImportError, or a hub download that cannot reach the network
        return f"{type(e).__name__}: {e}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (HF loads FP8 checkpoints as FP8 on GPUs only)")
def test_fp8_checkpoint_on_cuda_matches_unmodified(tmp_path):
    """apply (world 1) on a block-FP8 checkpoint loaded by HF: the same greedy tokens' first step as the unmodified
    FP8 model, first-step logits within 2 % relative L2 (bf16; kv_b_proj runs dequantized under DCP where HF
    quantizes its input activations), and the generated tokens reported."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM
    from transformers.integrations.finegrained_fp8 import FP8Linear

    from dcp_compile.testing import free_port

    n_quantized = save_random_fp8_checkpoint(tmp_path)
    why = _hf_fp8_kernels_load()
    patch = use_dequantizing_fp8_linear() if why else torch.no_grad()
    print(f"FP8 linears run {'HF kernels' if why is None else 'fp8.dequantizing_fp8_linear (' + why + ')'}")

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cuda", attn_implementation="sdpa").eval()

    ids, mask = left_padded_prompts((9, 40), vocab=512, seed=7)
    ids, mask = ids.cuda(), mask.cuda()

    def run(model):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=GPU_TOKENS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        return out.sequences, torch.stack(out.logits).float()

    made_group = not dist.is_initialized()
    with patch:
        ref = load()
        fp8_linears = [n for n, m in ref.named_modules() if type(m) is FP8Linear]
        assert len(fp8_linears) == n_quantized and ref.model.layers[0].self_attn.kv_b_proj.weight.dtype == torch.float8_e4m3fn
        want_tokens, want_logits = run(ref)
        del ref
        if made_group:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            dist.init_process_group("nccl", rank=0, world_size=1)
        try:
            model = dcp_compile.apply(load(), init_device_mesh("cuda", (1,)))
            attn = model.model.layers[0].self_attn
            assert type(attn.kv_b_proj) is nn.Linear and attn.kv_b_proj.weight.dtype == torch.bfloat16
            assert type(attn.q_b_proj) is FP8Linear and attn.q_b_proj.weight.dtype == torch.float8_e4m3fn
            got_tokens, got_logits = run(model)
        finally:
            if made_group:
                dist.destroy_process_group()
    first = (got_logits[0] - want_logits[0]).norm() / want_logits[0].norm()
    same = (got_tokens == want_tokens).float().mean().item()
    print(f"first-step logits relative L2 {first.item():.3e}; tokens equal to the unmodified FP8 model: {same:.1%}")
    assert first < 2e-2, f"first-step logits differ by {first.item():.3e} relative L2"
    assert torch.equal(got_tokens[:, : ids.shape[1] + 1], want_tokens[:, : ids.shape[1] + 1]), "first token differs"
