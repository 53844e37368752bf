mkdir -p /tmp/res2 && rm -f /tmp/res2/*
python3 -c "
import torch, conformance
from conformance import Runner
from conformance.matrix import select_cases
from backends.triton_attention import choose_segments
r = Runner('cuda')
for s in select_cases('gpu', ['long_context', 'large_decode', 'wide_decode', 'medium_decode', 'single_decode'])[:: 60]:
    print(s.id, 'segments', choose_segments(r.prepared(s).inputs.materialize()))
"
timeout 200 python3 -m conformance run --profile gpu --backend triton --scenario long_context --json /tmp/res2/h100-triton-long.json 2>&1 | grep -v '^\[' | tail -8
timeout 200 python3 -m conformance bench --scenario large_decode,mixed_large,long_context,wide_decode \
  --backend triton,flashinfer-decode,flashinfer-prefill --baseline flashinfer-decode,flashinfer-prefill \
  --json /tmp/res2/h100-bench.json > $OUT/h100-bench.md 2>/tmp/res2/bench-err.txt
cat $OUT/h100-bench.md; tail -3 /tmp/res2/bench-err.txt
cp /tmp/res2/*.json $OUT/
