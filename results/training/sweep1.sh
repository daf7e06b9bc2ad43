#!/usr/bin/env bash
# Sweep 1 (one nvidia-h200-x2 machine, all runs at once, 7 per GPU): why a BPE testbed does not learn passkey
# retrieval (W*), and ReMamba against its SFT control on the byte testbed (R*, S*). Each run logs its loss, the
# loss on the answer tokens alone and validation passkey accuracy (needles in the training split's prose).
# Usage: bash results/training/sweep1.sh OUT_DIR MINUTES
set -u
out=$1; minutes=$2
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
word="--steps 10000 --eval-every 1000 --eval-samples 20 --save-every 2500 --log-every 500 --save-dtype float16"
fine="--init checkpoints/mamba-testbed --steps 1000 --eval-every 250 --eval-samples 20 --eval-lengths 1,2,3,4 \
      --save-every 500 --log-every 100 --save-dtype float16"
run() { gpu=$1; name=$2; shift 2
        CUDA_VISIBLE_DEVICES=$gpu timeout $((minutes * 60 + 60)) python train.py --out $out/$name \
            --time-limit $minutes "$@" > $out/$name.log 2>&1 & }
run 0 W1_bpe2048           --tokenizer bpe:2048 $word
run 0 W2_digits2048        --tokenizer bpe-digits:2048 $word
run 0 W3_digits2048_cur    --tokenizer bpe-digits:2048 --curriculum 4000 $word
run 1 W4_bpe2048_cur       --tokenizer bpe:2048 --curriculum 4000 $word
run 1 W5_digits2048_cur_pk75 --tokenizer bpe-digits:2048 --curriculum 4000 --passkey-fraction 0.75 $word
run 1 W6_digits1024_cur    --tokenizer bpe-digits:1024 --curriculum 4000 $word
run 0 R1_official_1x   --method remamba --prompt-lengths 1,1 $fine
run 0 S1_official_1x   --method sft     --prompt-lengths 1,1 $fine
run 0 R3_new_lr1e-3_1-4x   --method remamba --train new --lr 1e-3 --prompt-lengths 1,4 $fine
run 0 R4_new_zerov_lr1e-3_1-4x --method remamba --train new --remamba-init zero_v --lr 1e-3 --prompt-lengths 1,4 $fine
run 1 R2_official_1-4x --method remamba --prompt-lengths 1,4 $fine
run 1 S2_official_1-4x --method sft     --prompt-lengths 1,4 $fine
run 1 R5_official_lr2e-4_1-4x --method remamba --lr 2e-4 --prompt-lengths 1,4 $fine
run 1 S5_official_lr2e-4_1-4x --method sft     --lr 2e-4 --prompt-lengths 1,4 $fine
wait
