#!/usr/bin/env bash
# Every run of docs/pretrained.md: a plain CLIP checkpoint (the demo's plain run) made 2x, 4x and 10x cheaper with
# each pooling, (a) training-free, (b) frozen tower + probe, (c) after a short finetune; then the table and figure.
#   bash docs/pretrained.sh     # SEEDS="0 1 2" STAGES="probe ft" JOBS=2 STEPS=125 by default; a finished run is skipped
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-0 1 2}; STAGES=${STAGES:-probe ft}; JOBS=${JOBS:-2}; STEPS=${STEPS:-125}; OUT=${OUT:-out/pretrained}
CKPT=out/clip-shapes-vit/ckpt.pt
[ -f "$CKPT" ] || python train_clip.py config/shapes_vit.py   # the pretrained model: 1248 steps
jobs_file=$(mktemp)
mkdir -p "$OUT"
declare -A POOLING=(
  [vit1]="--boundary=none"
  [fixed2]="--boundary=fixed --compression=2" [fixed4]="--boundary=fixed --compression=4"
  [fixed10]="--boundary=fixed --compression=10"
  [dtp2]="--boundary=gumbel --compression=2" [dtp4]="--boundary=gumbel --compression=4"
  [dtp10]="--boundary=gumbel --compression=10"
  [router2]="--boundary=router --compression=2 --router=\"{'min_segment': 1}\"" [router4]="--boundary=router --compression=4"
  [router10]="--boundary=router --compression=10"
  [cosine2]="--boundary=cosine --compression=2 --router=\"{'size_attention': True}\""
  [cosine4]="--boundary=cosine --compression=4 --router=\"{'size_attention': True}\""
  [cosine10]="--boundary=cosine --compression=10 --router=\"{'size_attention': True}\""
  [tome2]="--boundary=none --tome_cost=0.676" [tome4]="--boundary=none --tome_cost=0.518"
  [tome10]="--boundary=none --tome_cost=0.431"   # the ToMe schedules nearest DTP's MMACs at 2x, 4x, 10x
)  # the router at 2x: min_segment 1 (18 segments of at least 2 of 36 patches would leave it no choice)
ORDER=${ORDER:-vit1 fixed2 fixed4 fixed10 dtp2 dtp4 dtp10 router2 router4 router10 cosine2 cosine4 cosine10 tome2 tome4 tome10}
# What makes pooling safe to insert (training-free only): the cosine rule with and without size-aware attention,
# and the layer the pooling comes after (pre_layers of the 6 blocks), at 4x
declare -A SAFE=([fixed4x]=${POOLING[fixed4]})
for r in 2 4 10; do
  SAFE[cosine${r}x]="--boundary=cosine --compression=$r" SAFE[cosinesa${r}x]=${POOLING[cosine$r]}
done
for pre in 1 3; do
  SAFE[fixed4x-pre$pre]="${POOLING[fixed4]} --pre_layers=$pre --short_layers=$((6 - pre))"
  SAFE[cosinesa4x-pre$pre]="${POOLING[cosine4]} --pre_layers=$pre --short_layers=$((6 - pre))"
done
for name in "${!SAFE[@]}"; do
  dir=$OUT/tf-$name
  [ -f "$dir/log.jsonl" ] && grep -q zeroshot_top1 "$dir/log.jsonl" && continue
  rm -rf "$dir"
  echo "OMP_NUM_THREADS=1 python train_clip.py config/shapes_vit.py --init_from=$CKPT --eval_only=True ${SAFE[$name]} --out_dir=$dir > $dir.log 2>&1" >> "$jobs_file"
done
for seed in $SEEDS; do
  for stage in $STAGES; do
    for name in $ORDER; do
      dir=$OUT/$stage-${name}x-s$seed
      [ -f "$dir/ckpt.pt" ] && continue
      rm -rf "$dir"   # a run that did not finish starts again
      if [ $stage = probe ]; then script="train_cls.py config/shapes_cls_probe.py"; else script="train_clip.py config/shapes_finetune.py"; fi
      echo "OMP_NUM_THREADS=1 python $script ${POOLING[$name]} --max_steps=$STEPS --seed=$seed --out_dir=$dir > $dir.log 2>&1" >> "$jobs_file"
    done
  done
done
xargs -P "$JOBS" -I{} -d '\n' bash -c {} < "$jobs_file" || true
rm -f "$jobs_file"
python docs/pretrained.py --plot
