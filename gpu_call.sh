# Whole gpu profile for triton + triton-split (5 processes), then the benchmark. Logs stream to $OUT.
mkdir -p /tmp/res && rm -f /tmp/res/*
groups=(
 "long_context,wide_decode,single_decode"
 "large_decode,small_decode,large_prefill,mixed_large,single_prefill"
 "mixed_medium,spec_decode_medium,small_prefill,medium_decode"
 "medium_prefill,pure_prefill,chunked_context_prefill,encoder_prefill"
 "kv_shorter_than_block,spec_decode_small,mixed_small,ragged_many_small,single_token_context"
)
i=0
for g in "${groups[@]}"; do
  timeout ${PROFILE_S:-380} python3 -m conformance run --profile gpu --backend triton,triton-split --scenario $g \
    --json /tmp/res/h100-triton-$i.json > /tmp/res/log-$i.txt 2>&1 &
  i=$((i+1))
done
wait
for f in /tmp/res/log-*.txt; do grep -E "^PASS|^SKIP|results in" $f; done
python3 -m conformance report /tmp/res/h100-triton-*.json > $OUT/h100-triton-gpu-profile.md
grep -E "^PASS|FAIL|ERROR" $OUT/h100-triton-gpu-profile.md | head -20
timeout ${BENCH_S:-150} python3 -m conformance bench --scenario large_decode,mixed_large,long_context \
  --backend triton,triton-split,flashinfer-decode,flashinfer-prefill --baseline flashinfer-decode,flashinfer-prefill \
  --json /tmp/res/h100-bench.json > $OUT/h100-bench.md 2>/tmp/res/bench-err.txt
cat $OUT/h100-bench.md; tail -5 /tmp/res/bench-err.txt
cd /tmp/res && tar -cJf $OUT/res.tar.xz *.json *.txt
