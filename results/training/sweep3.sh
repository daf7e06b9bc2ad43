#!/usr/bin/env bash
# Sweep 3 (one nvidia-h200-x2 machine): the word-level testbed (checkpoints/mamba-testbed-words, sweep 2's A2).
# GPU 0: LongMamba's settings and DeciMamba's layer chosen on validation samples (as in sweep 2), then its final
# tables on the held-out haystack. GPU 1: ReMamba and its SFT control trained on it, then their final tables.
# Usage: bash results/training/sweep3.sh RUN_DIR
set -u
T=$1; W=checkpoints/mamba-testbed-words
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
mkdir -p $T results/gpu/validation-words results/gpu/mamba-testbed-words
E="python eval.py --no-baseline --model $W"
V="--split train --seed 7 --samples 10"
final="--lengths 1x,1.5x,2x,3x,4x,8x,16x,32x --samples 20 --out-dir results/gpu/mamba-testbed-words"
fine="--init $W --steps 1000 --eval-every 250 --eval-samples 20 --eval-lengths 1,2,3,4 --save-every 500 \
      --log-every 100 --save-dtype float16 --prompt-lengths 1,4"
pids=""
for r in "R2_official_1-4x --method remamba" "S2_official_1-4x --method sft"; do
    CUDA_VISIBLE_DEVICES=1 python train.py --out $T/$r $fine > $T/${r%% *}.log 2>&1 &
    pids="$pids $!"
done
(   export CUDA_VISIBLE_DEVICES=0
    for hay in war_and_peace tinyshakespeare; do
        val="$V --haystack data/$hay.txt --lengths 8x,16x,32x --out-dir results/gpu/validation-words/$hay"
        for s in "--b 1" "--b 1.5" "--b 2" "--b 3" "--c 0.2" "--decay-state mean" "--sc 0.1"; do
            $E --method longmamba $s $val > /dev/null
        done
    done
    for layer in 0 1 2 3; do
        $E --method decimamba --decimating-layers $layer $V --lengths 2x,4x,8x,16x \
           --out-dir results/gpu/validation-words/war_and_peace > /dev/null
    done
    python results/training/choose.py results/gpu/validation-words > results/gpu/validation-words/chosen.txt
    cat results/gpu/validation-words/chosen.txt
    $E $(sed -n 1p results/gpu/validation-words/chosen.txt) $final
    $E --method longmamba --b 1.5 $final
    $E --method longmamba $final
    $E --method longmamba --sc 0.1 $final
) > $T/eval_words.log 2>&1 &
wait $pids
(   export CUDA_VISIBLE_DEVICES=1
    $E --model $T/R2_official_1-4x --method remamba --tag _1-4x $final
    $E --model $T/S2_official_1-4x --method vanilla --tag _sft_1-4x $final
) > $T/eval_remamba_words.log 2>&1
wait
