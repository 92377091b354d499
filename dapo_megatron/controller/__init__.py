"""The DAPO loop on Ray: the only package that imports all the others.

- loop.py           `train(cfg)` and `Trainer`: a step is generate/score/filter, advantages,
                    old log-probs, train, weight sync, then metrics, checkpoint and eval
- rollout_phase.py  generation rounds with streaming reward and dynamic sampling
- eval_phase.py     avg@k / pass@k on the eval prompts (the paper's sampling)
- batch.py          shaped rewards, group advantages, loss masks
- policy_group.py   the Megatron ranks as Ray actors (policy_worker.py is one rank)
- engines.py        rollout engines behind the manager, with restart
- task.py           prompts, references and tokenizer of a run
- metrics.py, checkpoint.py   run-directory bookkeeping
"""
