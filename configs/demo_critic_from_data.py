"""Demo: a critic trained from scratch on the CFT rows `cftjax data critique` built
(configs/critique_data_demo.py: the actor warm start's own answers, critiqued by the rule-based teacher).

  cftjax train --config configs/demo_critic_from_data.py
  cftjax eval --config configs/eval_critic_rerank.py --ckpt runs/demo_critic_from_data

configs/demo_cft.py's model and optimizer; the rows are read from the ArrayRecord file by the same
Grain pipeline as any other source. No held-out split: the critic is scored by `critic_rerank` on
the world's held-out problems.
"""

import demo_cft


def get_config():
  c = demo_cft.get_config()
  c.train.run_dir = "runs/demo_critic_from_data"
  c.data.synthetic_world = False
  c.data.train_path = "runs/critique_data_demo/cft.array_record"
  c.model.tokenizer_dir = "runs/demo_critique_grpo/world/tokenizer"  # the generator's world's
  c.data.max_seq_len = 128
  c.train.steps = 1000
  c.mesh.fsdp = 1  # one CPU device
  c.checkpoint.every_steps = 0  # the end only
  c.checkpoint.best_metric = ""
  c.eval.at_start = False
  c.eval.loss_batches = 0
  c.eval.verdict_examples = 0
  return c
