set -x
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -m conformance run --profile gpu --backend triton,triton-split --scenario small_decode,mixed_small --json '' 2>&1 | grep -v '^\[' | tail -25
groups=(
 "long_context"
 "wide_decode"
 "large_decode,single_decode,small_decode"
 "large_prefill,mixed_large,single_prefill"
 "mixed_medium,spec_decode_medium,small_prefill"
 "medium_decode,medium_prefill,pure_prefill"
 "chunked_context_prefill,encoder_prefill,kv_shorter_than_block"
 "spec_decode_small,mixed_small,ragged_many_small,single_token_context"
)
mkdir -p /tmp/res
i=0
for g in "${groups[@]}"; do
  timeout 500 python3 -m conformance run --profile gpu --backend triton,triton-split --scenario $g --json /tmp/res/h100-triton-$i.json > /tmp/res/log-$i.txt 2>&1 &
  i=$((i+1))
done
# FlashInfer JIT warm-up for the benchmark, beside the profile (CPU-bound nvcc)
timeout 500 python3 -m conformance bench --scenario large_decode,mixed_large --backend flashinfer-decode,flashinfer-prefill --iters 1 > /tmp/res/fi-warm.txt 2>&1 &
wait
tail -3 /tmp/res/log-*.txt /tmp/res/fi-warm.txt
python3 -m conformance report /tmp/res/h100-triton-*.json > /tmp/res/h100-triton.md
grep -A40 "^| scenario" /tmp/res/h100-triton.md | head -40
grep -B2 -A30 "^PASS" /tmp/res/h100-triton.md | head -60
cd /tmp/res && xz -9 h100-triton-*.json && tar -cf $OUT/res.tar *.xz *.txt h100-triton.md
save_jit_cache
