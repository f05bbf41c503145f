#!/usr/bin/env bash
# The checks only a GPU can run, as one script for a lent GPU machine (under 6 minutes on an H200):
#   1. tests/test_cuda.py: CUDA forward, search and CLI equal the CPU; bf16 training learns;
#   2. Multi30k de->en training in bf16 for MINUTES with the recipe's 6,000-token batches, then
#      1.5 minutes with 24,000-token batches (throughput per GPU from metrics.jsonl);
#   3. test BLEU on the GPU and decoding speed (decode_speed.py) on the GPU at beam 5 and greedy.
# Usage: bash benchmarks/gpu_check.sh MULTI30K_DIR OUT_DIR [MINUTES]
set -uo pipefail
data=$1
out=$2
minutes=${3:-2.5}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$out"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15

train() {  # train NAME MINUTES [--set ...]
    local name=$1 budget=$2
    shift 2
    python3 -m seq2seq train recipes/multi30k_de_en.toml --out "$out/$name" \
        --set "data.root=$data" --set "train.max_minutes=$budget" --set train.device=cuda --set train.log_every=20 "$@" \
        > "$out/$name.log" 2>&1
    echo "$name: exit $?"
    python3 - "$out/$name/metrics.jsonl" <<'PY'
import json, statistics, sys
events = [json.loads(line) for line in open(sys.argv[1])]
train = [e for e in events if e["event"] == "train"]
rates = [e["tokens_per_s"] for e in train[1:]] or [0]
print(f"steps {train[-1]['step'] if train else 0} median tokens/s {statistics.median(rates):.0f}")
for e in events:
    if e["event"] == "valid":
        print(f"valid step {e['step']}: loss {e['loss']:.3f} bleu {e['bleu']:.2f}")
PY
}
train m30k_gpu "$minutes"
train m30k_gpu_24k 1.5 --set train.max_tokens=24000 --set train.valid_every=100000

python3 -m seq2seq evaluate "$out/m30k_gpu/best.pt" --device cuda --json \
    --source "$data/test_2016_flickr.de.gz" --reference "$data/test_2016_flickr.en.gz"
python3 benchmarks/decode_speed.py --checkpoint "$out/m30k_gpu/best.pt" --device cuda \
    --data "$data" 2>&1 | grep '^precision'
python3 benchmarks/decode_speed.py --checkpoint "$out/m30k_gpu/best.pt" --device cuda \
    --data "$data" --max-tokens-per-batch 30000 2>&1 | grep '^precision'
