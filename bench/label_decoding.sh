#!/usr/bin/env bash
# Label decoding vs free decoding on the first 48 `train` queries (never dev): bench/results/label_decoding.md.
# Usage: bash bench/label_decoding.sh [OUT_DIR]   (predictions and the LaMP-2N hypernet anchor go to OUT_DIR)
set -euo pipefail
OUT=${1:-/tmp/label-decoding}
DATA=${PRISP_DATA:-../shared/data/lamp-offline}
mkdir -p "$OUT"
prisp anchor --description "$(python3 -c "from prisp.bench.anchors import TASK_DESCRIPTIONS as T; print(T['LaMP-2N'])")" \
    --out "$OUT/anc2n" > /dev/null
for task in LaMP-2N LaMP-1; do
  for dec in free "labels --label-normalise mean" "labels --label-normalise sum"; do
    for ad in none anchor; do
      extra=""
      if [ "$ad" = anchor ]; then
        [ "$task" = LaMP-1 ] && continue
        extra="--adapter $OUT/anc2n"
      fi
      name=$task-$(echo "$dec" | tr ' ' '_')-$ad
      start=$(date +%s.%N)
      # shellcheck disable=SC2086  # $dec and $extra are option lists
      prisp predict --task "$task" --data "$DATA" --split train --limit 48 --decode $dec $extra \
          --out "$OUT/$name.json" > /dev/null 2>&1
      end=$(date +%s.%N)
      questions=""
      [ "$task" = LaMP-2N ] && questions="--questions $DATA/$task/train_questions.json"
      # shellcheck disable=SC2086
      echo "$name $(python3 -c "print(round($end - $start, 1))") s $(prisp eval --task "$task" \
          --golds "$DATA/$task/train_outputs.json" --preds "$OUT/$name.json" $questions --partial --json)"
    done
  done
done
