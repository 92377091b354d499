cd /work/main
S="--set algo.group_size=4 --set trainer.train_batch_size=16 --set trainer.mini_batch_size=2 --set algo.overlong_buffer=80"
date
.venv/bin/python bench/mechanisms.py --config examples/tiny_chains_long.yaml --groups clip,loss,overlong,dynamic --first-seed 401 --seeds 3 --steps 40 --eval-every 10 --eval-prompts 200 --jobs 2 $S --out runs/mech7/results.jsonl --primary loss=length_mean_firsthalf
date
