#!/bin/bash
cd /work/h21
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
taskset -c 1 nice -n 15 /work/main/.venv/bin/python bench/mechanisms.py --groups clip,loss --only dapo,sym_clip,seq_mean \
    --first-seed 7 --seeds 3 --steps 40 --eval-every 20 --eval-prompts 200 --jobs 1 \
    --set algo.group_size=4 --set trainer.train_batch_size=16 --set trainer.mini_batch_size=1 \
    --set algo.overlong_buffer=24 --set rollout.temperature=1.5 --out runs/mech4/results.jsonl > runs/mech4/study.out 2>&1
echo "study done $(date -u +%T) rc=$?" >> runs/mech4/study.log
