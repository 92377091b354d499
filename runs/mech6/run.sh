cd /work/main
S="--set algo.group_size=4 --set trainer.train_batch_size=16 --set trainer.mini_batch_size=2"
date
.venv/bin/python bench/mechanisms.py --config examples/tiny_chains_long.yaml --groups clip,loss,overlong,dynamic --first-seed 301 --seeds 3 --steps 40 --eval-every 10 --eval-prompts 200 --jobs 2 $S --out runs/mech6/results.jsonl
date
.venv/bin/python bench/mechanisms.py --config examples/tiny_chains_long.yaml --groups cumulative,dynamic --only cum_grpo,cum_overlong_filter,cum_clip_higher,cum_soft_overlong,cum_token_loss,cum_dapo,dyn_off_no_shaping --first-seed 301 --seeds 3 --steps 40 --eval-every 10 --eval-prompts 200 --jobs 2 $S --out runs/mech6/results.jsonl
date
