#!/usr/bin/env bash
# Sweep 2 (one nvidia-h200-x2 machine, everything at once). GPU 1: word-level testbeds (A*) at shorter training
# lengths, other tokenizers, a larger state. GPU 0: ReMamba and its SFT control retrained (R*, S*, as in sweep 1)
# and evaluated; LongMamba's settings and DeciMamba's layer chosen on validation samples (needles in War and
# Peace's training prose, seed 7, and in Shakespeare, neither the evaluation haystack nor its seed), then the
# byte testbed's final tables on the held-out haystack (seed 0, 20 samples per cell).
# Usage: bash results/training/sweep2.sh RUN_DIR MINUTES   (writes results/gpu/ in the working tree)
set -u
T=$1; minutes=$2
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
mkdir -p $T results/gpu/validation results/gpu/mamba-testbed
word="--steps 16000 --eval-every 1000 --eval-samples 20 --save-every 4000 --log-every 500 --save-dtype float16"
fine="--init checkpoints/mamba-testbed --steps 1000 --eval-every 250 --eval-samples 20 --eval-lengths 1,2,3,4 \
      --save-every 500 --log-every 100 --save-dtype float16"
train() { gpu=$1; name=$2; shift 2
          CUDA_VISIBLE_DEVICES=$gpu timeout $((minutes * 60 + 60)) python train.py --out $T/$name \
              --time-limit $minutes "$@" > $T/$name.log 2>&1 & }
train 1 A1_digits2048_L192 --tokenizer bpe-digits:2048 --L-train 192 --batch-size 32 --curriculum 4000 $word
train 1 A2_digits2048_L256 --tokenizer bpe-digits:2048 --L-train 256 --batch-size 32 --curriculum 4000 $word
train 1 A3_bpe2048_L256    --tokenizer bpe:2048 --L-train 256 --batch-size 32 --curriculum 4000 $word
train 1 A4_digits2048_L256_nocur --tokenizer bpe-digits:2048 --L-train 256 --batch-size 32 $word
train 1 A5_digits2048_L512_dstate32 --tokenizer bpe-digits:2048 --d-state 32 --curriculum 4000 $word
train 1 A6_digits4096_L256 --tokenizer bpe-digits:4096 --L-train 256 --batch-size 32 --curriculum 4000 $word
train 1 A7_digits2048_L256_lr2e-3 --tokenizer bpe-digits:2048 --L-train 256 --batch-size 32 --curriculum 4000 --lr 2e-3 $word
train 0 A8_digits2048_L256_pk100 --tokenizer bpe-digits:2048 --L-train 256 --batch-size 32 --curriculum 4000 --passkey-fraction 1 $word
for r in "R1_official_1x --method remamba --prompt-lengths 1,1" "S1_official_1x --method sft --prompt-lengths 1,1" \
         "R2_official_1-4x --method remamba --prompt-lengths 1,4" "S2_official_1-4x --method sft --prompt-lengths 1,4"; do
    train 0 $r $fine
done

E="python eval.py --device cuda --no-baseline"
V="--split train --seed 7 --samples 10"
final="--lengths 1x,1.5x,2x,3x,4x,8x,16x,32x --samples 20 --out-dir results/gpu/mamba-testbed"
(   # LongMamba's settings and DeciMamba's layer on validation, then the final tables of the bundled testbed
    for hay in war_and_peace tinyshakespeare; do
        val="$V --haystack data/$hay.txt --lengths 8x,16x,32x --out-dir results/gpu/validation/$hay"
        for s in "--b 1" "--b 1.5" "--b 2" "--b 3" "--c 0.01" "--c 0.2" "--variant bound" "--sc 0.1" \
                 "--decay-state mean"; do
            $E --method longmamba $s $val > /dev/null
        done
    done
    for layer in 0 1 2 3; do
        $E --method decimamba --decimating-layers $layer $V --lengths 2x,4x,8x,16x \
           --out-dir results/gpu/validation/war_and_peace > /dev/null
    done
    python results/training/choose.py results/gpu/validation > results/gpu/validation/chosen.txt
    cat results/gpu/validation/chosen.txt
    $E $(sed -n 1p results/gpu/validation/chosen.txt) $final
    $E --method longmamba $final
    $E --method longmamba --sc 0.1 $final
) > $T/eval_testbed.log 2>&1 &
(   # ReMamba and SFT: wait for the training, then the final tables
    while pgrep -f "out $T/[RS][12]_" > /dev/null; do sleep 5; done
    for r in R1_official_1x:_1x R2_official_1-4x:_1-4x; do
        $E --model $T/${r%%:*} --method remamba --tag ${r##*:} $final
    done
    for r in S1_official_1x:_sft_1x S2_official_1-4x:_sft_1-4x; do
        $E --model $T/${r%%:*} --method vanilla --tag ${r##*:} $final
    done
) > $T/eval_remamba.log 2>&1 &
wait
