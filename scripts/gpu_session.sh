#!/usr/bin/env bash
# One device call: install (carry .whl, the pinned transformers wheel), then the parts named in PARTS, each
# bounded so that the call ends inside 10 minutes. Every part's full log and outputs go to $W/<part>(.log); a
# summary (each log's last lines) to stdout; at the end everything is packed into $OUT/gpu_session.tgz (the
# device tool brings back at most 8 files). Unpack with: tar xzf gpu_session.tgz -C benchmarks/runs/<date-card>/
#   PARTS="graphs topk lowering kernels fp8 demo bench_topk" bash scripts/gpu_session.sh        # one GPU
#   PARTS="e2e_x e2e_long prefill_sel" bash scripts/gpu_session.sh                            # every GPU (4)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_session}
. scripts/gpu_env.sh
W=${W:-/tmp/gpu_work}
mkdir -p "$W"
PYTEST="python3 -m pytest -q -rs -p no:logging --tb=short"
RUN="torchrun --standalone --nproc-per-node $ngpu"
part() {  # part NAME SECONDS CMD...: full log to $W/NAME.log, its last lines here
  local name=$1 s=$2; shift 2; echo "== $name: $*"; local t0=$SECONDS
  timeout "$s" "$@" > "$W/$name.log" 2>&1; echo "rc=$? ($((SECONDS - t0)) s)"
  grep -v -i "warn" "$W/$name.log" | tail -n "${TAIL:-15}"
}
PARTS=${PARTS:-"graphs topk lowering kernels fp8 demo bench_topk"}
for p in $PARTS; do case $p in
  graphs) TAIL=40 part graphs 150 $PYTEST -x tests/test_cuda_graphs.py ;;
  e2e) TAIL=45 part e2e 280 $RUN benchmarks/bench_e2e.py --out "$W/e2e" \
         --modes dcp hf --compile eager inductor cudagraphs --batch 8 --context 32768 --layers 2 --profile ;;
  # issue 9/10 on every GPU: DCP N vs TP N at 32K, prefilled through the model (prefill time, first use,
  # recorded op calls, profiles), then the recorded calls against their floors
  e2e_x) TAIL=30 part e2e_x 230 $RUN benchmarks/bench_e2e.py --out "$W/e2e_x" --modes dcp tp \
           --compile eager cudagraphs --batch 1 8 --context 32768 --layers 2 --profile --record "$W/e2e_x/calls.pt"
         TAIL=25 part recorded 60 python3 benchmarks/bench_kernels.py --recorded "$W/e2e_x/calls.pt" \
           --out "$W/recorded" ;;
  # decode at long context and large batch, the cache filled in place (a 64 x 128K prefill takes minutes)
  e2e_long) TAIL=30 part e2e_long 230 $RUN benchmarks/bench_e2e.py --out "$W/e2e_long" --modes dcp tp \
              --compile cudagraphs --batch 8 64 --context 32768 131072 --layers 2 --fill random \
              --profile --profile-at 64 131072 --first-use-profile ;;
  # decode at 64 x 128K only (the selection target's shape): DCP N vs TP N, CUDA graphs, profiled
  e2e_long64) TAIL=20 part e2e_long64 200 $RUN benchmarks/bench_e2e.py --out "$W/e2e_long64" --modes dcp tp \
                --compile cudagraphs --batch 64 --context 131072 --layers 2 --fill random \
                --profile --profile-at 64 131072 ;;
  # A/B of the merge (docs/design.md §4.6) at small batch, where DCP's extra collectives cost most: the
  # default reduce-scatter, then the one all-to-all, same configs, same call (random fill: no prefill)
  e2e_merge) for m in reduce_scatter all_to_all; do
               TAIL=12 DCP_MERGE_SCHEME=$m part e2e_merge_$m 130 $RUN benchmarks/bench_e2e.py \
                 --out "$W/e2e_merge_$m" --modes dcp --compile cudagraphs --batch 1 8 --context 32768 --layers 2 \
                 --fill random --profile
             done ;;
  prefill_sel) TAIL=12 part prefill_sel 120 $RUN benchmarks/bench_prefill_selection.py --cuda ;;
  tune_indexer) TAIL=14 part tune_indexer 240 python3 benchmarks/tune_indexer.py --out "$W/tune_indexer" ;;
  tune_topk) TAIL=14 part tune_topk 150 python3 benchmarks/tune_topk_select.py --out "$W/tune_topk" ;;
  tune_prefill) TAIL=16 part tune_prefill 200 python3 benchmarks/tune_indexer.py --cases prefill --out "$W/tune_prefill" ;;
  indexer) TAIL=8 part indexer 260 $PYTEST tests/test_indexer_prefill.py tests/test_op_lowering.py ;;
  # prefill only (eager): DCP N vs TP N, 8 x 32K through the model; one chunk per mode profiled
  # (profile_prefill_<mode>.txt), each mode's first prefill cProfiled (first_use_profile_<mode>.txt)
  e2e_prefill) TAIL=18 part e2e_prefill 160 $RUN benchmarks/bench_e2e.py --out "$W/e2e_prefill" --modes dcp tp \
                 --compile eager --batch 8 --context 32768 --layers 2 --warmup 2 --steps 5 \
                 --profile-prefill --trace-prefill --first-use-profile ;;
  slice) TAIL=40 part slice 280 $RUN examples/real_dims_slice.py --out "$W/slice" ;;
  topk) TAIL=30 part topk 150 $PYTEST -x tests/test_triton_topk.py ;;
  # the local top-k through torch.compile (Inductor owns its buffers; dynamic row length; CUDA-graph replays)
  topk_compiled) TAIL=12 part topk_compiled 150 $PYTEST tests/test_triton_topk.py tests/test_op_lowering.py \
                   -k "compiled_equals_eager or dynamic_row_length or decode_shapes" ;;
  lowering) TAIL=30 part lowering 150 $PYTEST tests/test_op_lowering.py ;;
  kernels) TAIL=6 part kernels 150 $PYTEST tests/test_triton_kernels.py tests/test_ops.py ;;
  fp8) TAIL=30 part fp8 120 $PYTEST -s tests/test_fp8.py -k cuda ;;
  demo) TAIL=14 part demo 90 $RUN examples/generate.py --cudagraphs --max-new-tokens 64 ;;
  # the prefill path (key-gather selection + latent-gather attention, the latents gathered while the selection
  # computes) forced on every step, float32: every token must equal HF's
  demo_kv) TAIL=14 DCP_SELECTION_SCHEME=key_gather DCP_ATTENTION_SCHEME=kv_gather part demo_kv 90 \
             $RUN examples/generate.py --max-new-tokens 32 ;;
  # all-gather bandwidth at DCP's sizes: NCCL's own protocol choice vs NCCL_PROTO=Simple (transports logged)
  nccl) TAIL=12 NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT part nccl_default 60 $RUN benchmarks/bench_nccl_gather.py --out "$W/nccl"
        grep -h -E "via|NCCL version|Channel 00" "$W/nccl_default.log" | sort -u | head -20
        TAIL=12 NCCL_PROTO=Simple part nccl_simple 60 $RUN benchmarks/bench_nccl_gather.py --out "$W/nccl" ;;
  e2e_prefill_simple) TAIL=18 NCCL_PROTO=Simple part e2e_prefill_simple 160 $RUN benchmarks/bench_e2e.py \
                        --out "$W/e2e_prefill_simple" --modes dcp tp --compile eager --batch 8 --context 32768 \
                        --layers 2 --warmup 2 --steps 5 --profile-prefill --trace-prefill ;;
  # prefill at a production chunk (16K tokens a forward: vLLM / SGLang budgets), eager; and prefill through the
  # compiled forward (README's usage), 4K-token chunks
  e2e_prefill_16k) TAIL=18 part e2e_prefill_16k 150 $RUN benchmarks/bench_e2e.py --out "$W/e2e_prefill_16k" \
                     --modes dcp tp --compile eager --batch 8 --context 32768 --layers 2 --warmup 2 --steps 5 \
                     --chunk 16384 --profile-prefill --trace-prefill ;;
  e2e_prefill_compiled) TAIL=18 part e2e_prefill_compiled 220 $RUN benchmarks/bench_e2e.py \
                          --out "$W/e2e_prefill_compiled" --modes dcp tp --compile eager --batch 8 --context 32768 \
                          --layers 2 --warmup 2 --steps 5 --prefill-compile inductor --profile-prefill --trace-prefill ;;
  # decode under NCCL_PROTO=Simple (before recommending it for prefill): CUDA-graph steps, random fill
  e2e_decode_simple) TAIL=14 NCCL_PROTO=Simple part e2e_decode_simple 150 $RUN benchmarks/bench_e2e.py \
                       --out "$W/e2e_decode_simple" --modes dcp tp --compile cudagraphs --batch 8 64 \
                       --context 32768 --layers 2 --fill random ;;
  e2e_decode) TAIL=14 part e2e_decode 150 $RUN benchmarks/bench_e2e.py --out "$W/e2e_decode" --modes dcp tp \
                --compile cudagraphs --batch 8 64 --context 32768 --layers 2 --fill random ;;
  bench_topk) TAIL=45 OUT="$W/bench_topk" part bench_topk 150 python3 benchmarks/bench_local_topk.py ;;
  # the local top-k's scheme table, per-kernel breakdown and selection chain only; then the same on a previous
  # version carried in .prev/ (`git archive <commit> dcp_compile ops pyproject.toml README.md` there, this
  # bench copied in as .prev/benchmarks/bench_local_topk_new.py): an A/B in one call
  bench_topk_ab) TAIL=45 OUT="$W/bench_topk_new" part bench_topk_new 150 python3 benchmarks/bench_local_topk.py \
                   --parts schemes breakdown selection
                 if [ -d .prev ]; then
                   python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .prev > /dev/null
                   TAIL=45 OUT="$W/bench_topk_prev" part bench_topk_prev 150 python3 \
                     .prev/benchmarks/bench_local_topk_new.py --parts schemes breakdown selection
                   python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /dev/null
                 fi ;;
  # Nsight Compute on each local top-k kernel of one call at 64 x 131072 (the selection target's shape)
  ncu_topk) TAIL=60 part ncu_topk 120 ncu --clock-control none -k regex:local_topk -c 8 --section SpeedOfLight \
              --section Occupancy --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis \
              python3 benchmarks/bench_local_topk.py --ncu 64 131072 ;;
  # the decode indexer's looped kernel: bit-identity with the one-tile kernel, then the sweep at model shapes
  indexer_decode) TAIL=6 part indexer_decode_tests 150 $PYTEST tests/test_triton_kernels.py -k "indexer or decode"
                  TAIL=40 part tune_indexer_decode 200 python3 benchmarks/tune_indexer_decode.py --out "$W/tune_indexer_decode" ;;
  # the decode loop kernel's live-range skip (LIVE_SCAN) against the one-tile kernel at the recorded call
  indexer_live) TAIL=6 part indexer_live_tests 120 $PYTEST tests/test_triton_kernels.py -k "decode and gpu"
                TAIL=45 part tune_indexer_live 200 python3 benchmarks/tune_indexer_decode.py --live --out "$W/tune_live" ;;
  # Nsight Compute on the decode indexer at the recorded small-batch call (8 x 10240, 80 % of keys live)
  ncu_indexer) TAIL=80 part ncu_indexer 120 ncu --clock-control none -k regex:"indexer_scores|paged_gather_probe|stream_copy" -c 9 \
                 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
                 --section MemoryWorkloadAnalysis python3 benchmarks/tune_indexer_decode.py --ncu ;;
  # the prefill indexer beside probes without its mask / relu·w / epilogue, at two key layouts (NOTES session 9)
  prefill_probe) TAIL=16 part prefill_probe 200 python3 benchmarks/bench_prefill_indexer_probe.py --out "$W/prefill_probe" \
                 ${PROBE_CONFIG:+--config $PROBE_CONFIG} ;;
  ncu_prefill) TAIL=120 part ncu_prefill 200 ncu --clock-control none -k regex:"indexer_scores_prefill|prefill_dot_probe" \
                 -c 2 --set full python3 benchmarks/bench_prefill_indexer_probe.py --ncu ;;
  # the copy ceiling by size and the indexer's access pattern without its math (its real floor), one GPU
  gather_ceiling) TAIL=40 part gather_ceiling 300 python3 benchmarks/bench_gather_ceiling.py --out "$W/gather_ceiling" ;;
  gather_variants) TAIL=60 part gather_variants 300 python3 benchmarks/bench_gather_ceiling.py --variants \
                    --out "$W/gather_variants" ;;
  # the candidate scheme's pass configs (one pass varied at a time, per-kernel µs)
  tune_local_topk) TAIL=70 part tune_local_topk 240 python3 benchmarks/tune_local_topk.py --out "$W/tune_local_topk" ;;
  # README's usage on the GPUs: torch.compile(model.forward) for prefill and decode, parity with HF
  demo_compile) TAIL=14 part demo_compile 150 $RUN examples/generate.py --compile --max-new-tokens 16 ;;
  # A/B of the prefill kernel's query-block order (last to first, the committed one, vs first to last)
  prefill_order_ab) TAIL=5 part prefill_order_last_first 100 python3 benchmarks/bench_prefill_indexer_kernels.py last-first
                    sed -i 's/sb = n_sb - 1 - rest % n_sb/sb = rest % n_sb/' ops/triton/kernels/indexer_scores_prefill.py
                    TAIL=5 part prefill_order_first_last 100 python3 benchmarks/bench_prefill_indexer_kernels.py first-last
                    sed -i 's/sb = rest % n_sb/sb = n_sb - 1 - rest % n_sb/' ops/triton/kernels/indexer_scores_prefill.py ;;
  # the prefill indexer's tests (both kernels), and the two kernels at tune_indexer's prefill cases
  prefill_tests) TAIL=8 part prefill_tests 200 $PYTEST tests/test_indexer_prefill.py ${PREFILL_K:+-k $PREFILL_K} ;;
  prefill_cases) TAIL=30 OUT="$W/prefill_kernels" part prefill_cases 150 python3 benchmarks/bench_prefill_indexer_kernels.py ;;
  # e2e_prefill with the Triton prefill indexer (the warp-specialised kernel off): the A/B of e2e_prefill
  e2e_prefill_triton) TAIL=18 DCP_PREFILL_INDEXER=triton part e2e_prefill_triton 160 $RUN benchmarks/bench_e2e.py \
                        --out "$W/e2e_prefill_triton" --modes dcp tp --compile eager --batch 8 --context 32768 \
                        --layers 2 --warmup 2 --steps 5 --profile-prefill ;;
  # the decode indexer as a dependent launch: its tests, its benchmark in a compiled layer, the compiled
  # decode step's op lowering on CUDA, and the model's decode step with it off / on / on with Inductor's own PDL
  pdl_tests) TAIL=8 part pdl_tests 200 $PYTEST tests/test_indexer_decode_pdl.py ;;
  pdl_bench) TAIL=40 part pdl_bench 240 python3 benchmarks/bench_decode_indexer_pdl.py --out "$W/decode_pdl" ;;
  lowering_cuda) TAIL=8 part lowering_cuda 200 $PYTEST tests/test_op_lowering.py -k cuda ;;
  e2e_pdl) for s in off on; do
             TAIL=8 DCP_DECODE_INDEXER_PDL=$s part e2e_pdl_$s 130 $RUN benchmarks/bench_e2e.py --out "$W/e2e_pdl_$s" \
               --modes dcp --compile cudagraphs --batch 8 --context 16384 --layers 4 --fill random --steps 60
           done
           TAIL=8 TORCHINDUCTOR_ENABLE_PDL=1 DCP_DECODE_INDEXER_PDL=on part e2e_pdl_inductor 130 $RUN benchmarks/bench_e2e.py \
             --out "$W/e2e_pdl_inductor" --modes dcp --compile cudagraphs --batch 8 --context 16384 --layers 4 \
             --fill random --steps 60 ;;
  # the same step with the dependent launch's wait alone (0 tiles prefetched), each with and without Inductor's
  # own kernels as dependent launches, the plain step first and last (process-to-process spread)
  e2e_pdl_wait) i=0; for c in off:0 0:0 off:1 0:1 off:0; do i=$((i + 1)); n="e2e_pdl${i}_${c%:*}_ind${c#*:}"
                  TAIL=4 DCP_DECODE_INDEXER_PDL=${c%:*} TORCHINDUCTOR_ENABLE_PDL=${c#*:} part "$n" 100 \
                    $RUN benchmarks/bench_e2e.py --out "$W/$n" --modes dcp --compile cudagraphs --batch 8 \
                    --context 16384 --layers 4 --fill random --steps 100
                done ;;
  *) echo "unknown part $p" ;;
esac; done
rm -f "$W"/*/calls.pt.tmp
tar czf "$OUT/gpu_session.tgz" --exclude="*.pt" -C "$W" . && ls -la "$OUT"
