#!/usr/bin/env bash
# The checks only a GPU can run, as one script for a lent GPU machine (under 6 minutes on an H200):
#   1. tests/test_cuda.py: CUDA forward, search and CLI equal the CPU; bf16 training learns;
#   2. Multi30k de->en training in bf16 for MINUTES with the recipe's 6,000-token batches, then
#      1.5 minutes with 24,000-token batches (throughput per GPU from metrics.jsonl);
#   3. test BLEU on the GPU and decoding speed (decode_speed.py) on the GPU at beam 5 and greedy;
#   4. WMT16 GNMT v2 scale (issue 14): recipes/wmt16_en_de_gnmt.toml as shipped (4+4 layers of
#      1024, 32k BPE, bf16) on a synthetic WMT-shaped corpus of WMT_PAIRS pairs
#      (benchmarks/data_scale.py), training tokens/s at 6k, 16k and 32k tokens per batch against
#      NVIDIA's 140,909 tokens/s on one A100 40GB (AMP); decoding at about 128 sentences per
#      batch, beam 5, against NVIDIA's 28,201 tokens/s; then torchrun with NCCL on every GPU.
#      Set WMT=0 to skip it (it adds about 8 minutes).
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

[ "${WMT:-1}" = 0 ] && exit 0
# --- 4. WMT16 GNMT v2 at scale ------------------------------------------------------------------
wmt=$out/wmt_corpus
python3 benchmarks/data_scale.py --pairs "${WMT_PAIRS:-1000000}" --corpus-only "$wmt"
gnmt() {  # gnmt NAME MAX_TOKENS MINUTES [launcher args...]: one GNMT v2 run on the corpus
    local name=$1 tokens=$2 budget=$3
    shift 3
    mkdir -p "$out/$name"
    # one tokenizer for every run (trained by the first), so the encoded corpus is shared too
    [ -f "$out/gnmt_tok/tokenizer.sentencepiece" ] && cp "$out/gnmt_tok/tokenizer.sentencepiece" "$out/$name/"
    "$@" -m seq2seq train recipes/wmt16_en_de_gnmt.toml --out "$out/$name" \
        --set data.format=lines --set "data.root=$wmt" --set data.train=train.{lang} \
        --set data.valid=val.{lang}.gz --set data.valid_max_lines=128 \
        --set "data.cache_dir=$out/wmt_cache" --set tokenizer.max_sentences=300000 \
        --set "train.max_tokens=$tokens" --set "train.max_minutes=$budget" \
        --set train.valid_every=1000000 --set train.log_every=20 --set train.device=cuda \
        > "$out/$name.log" 2>&1
    echo "$name: exit $? (max_tokens $tokens)"
    [ -d "$out/gnmt_tok" ] || { mkdir -p "$out/gnmt_tok"; cp "$out/$name/tokenizer.sentencepiece" "$out/gnmt_tok/"; }
    python3 - "$out/$name/metrics.jsonl" <<'PY'
import json, statistics, sys
train = [e for e in map(json.loads, open(sys.argv[1])) if e["event"] == "train"]
rates = [e["tokens_per_s"] for e in train[1:]] or [0]
print(f"  steps {train[-1]['step'] if train else 0}, median {statistics.median(rates):,.0f} "
      f"tokens/s (all GPUs; NVIDIA GNMT v2, one A100 40GB, AMP: 140,909)")
PY
}
gnmt gnmt_6k 6144 1.5 python3
gnmt gnmt_16k 16384 1.5 python3
gnmt gnmt_32k 32768 1.5 python3
# decoding: about 128 sentences of ~32 source tokens per batch, beam 5 (NVIDIA: 28,201 tokens/s)
python3 benchmarks/decode_speed.py --checkpoint "$out/gnmt_6k/last.pt" --device cuda \
    --source "$wmt/val.en.gz" --reference "$wmt/val.de.gz" --beams 5 --sentences 1000 \
    --max-tokens-per-batch 4096 2>&1 | grep '^precision'
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
gnmt gnmt_nccl_$gpus 6144 1.5 torchrun --standalone --nproc-per-node "$gpus"
