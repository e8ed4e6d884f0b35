#!/usr/bin/env bash
# Train the demo model on a lent GPU (hart_fast.train.recipe --profile gpu) within
# TRAIN_MIN minutes of training, and bring back the model folder and the logs:
#   run(command="TRAIN_MIN=6 bash bench/device_train_demo.sh", timeout_s=600)
# The stages plan their steps from probed step times (WORK/plan.json). Back here:
#   tar -xf FILES_AT/demo-model.tar -C /tmp && python bench/demo_quality.py --model /tmp/model
# The run folder stays outside $OUT: its encoded scenes (~1 GB) cannot come back,
# and at most 8 files of 16 MiB can.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/hart-fast-out}"
WORK="${WORK:-/tmp/hart-demo-gpu-run}"
MIN="${TRAIN_MIN:-6}"
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
# The embedded model's frozen text encoder, so prompts mean what they mean today.
[ -d "$WORK/text_encoder" ] || cp -r hart_fast/assets/hart-demo/text_encoder "$WORK/text_encoder"

# The budget is training time; encoding 100k scenes, probes and the export come on
# top (about two minutes): the timeout leaves that much and keeps the copy below.
limit=$(python -c "print(int(float('$MIN') * 60 + 150))")
start=$(date +%s)
timeout "$limit" python -m hart_fast.train.recipe --work "$WORK" --profile gpu --budget-min "$MIN" --quiet \
  > "$OUT/train.log" 2>&1
echo "train: exit $? in $(( $(date +%s) - start )) s"
tail -n 12 "$OUT/train.log"

cp "$WORK/plan.json" "$OUT/plan.json" 2>/dev/null
python - "$WORK" <<'PY'
import json, os, sys
work = sys.argv[1]
for stage in ("tokenizer", "tokenizer_objects", "transformer"):
    path = os.path.join(work, stage, "loss_log.jsonl")
    if os.path.exists(path):
        rows = [json.loads(l) for l in open(path) if l.strip()]
        print(stage, "first:", {k: round(v, 4) for k, v in rows[0].items()})
        print(stage, "last: ", {k: round(v, 4) for k, v in rows[-1].items()})
PY
logs=$(cd "$WORK" && ls -d */loss_log.jsonl 2>/dev/null)
[ -n "$logs" ] && tar -cf "$OUT/demo-logs.tar" -C "$WORK" $logs
if [ -d "$WORK/model" ]; then
  tar -cf "$OUT/demo-model.tar" -C "$WORK" model && echo "model: $(du -sh "$WORK/model" | cut -f1)"
else
  echo "no model folder: the run did not reach the export (see train.log)"
fi
