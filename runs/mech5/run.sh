#!/bin/bash
cd /work/wt_mech5
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
echo "study start $(date -u +%T)" >> runs/mech5/study.log
taskset -c 1 nice -n 15 /work/main/.venv/bin/python bench/mechanisms.py --groups clip --only dapo,sym_clip \
    --first-seed 10 --seeds 3 --steps 100 --eval-every 50 --eval-prompts 200 --jobs 1 \
    --set algo.group_size=4 --set trainer.train_batch_size=16 --set trainer.mini_batch_size=1 \
    --set algo.overlong_buffer=24 --set rollout.temperature=1.5 --out runs/mech5/results.jsonl > runs/mech5/study.out 2>&1
echo "study done $(date -u +%T) rc=$?" >> runs/mech5/study.log
