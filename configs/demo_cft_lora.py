"""Demo: LoRA critique fine-tuning on the synthetic critique world, on a laptop CPU.

What a PEFT user does, in miniature: low-rank adapters on a frozen base that already knows the
domain. The base is configs/demo_cft_lora_base.py, a model of configs/demo_cft.py's shape that adds
and checks worked solutions step by step (the world's solver rows and step-level critiques) but has
never judged a claimed sum or written a verdict; `cftjax train` trains it first into RUN_DIR/base
(model.init_from_run + model.warmstart_config) and then keeps it frozen. This run trains rank-32
adapters on every projection (q, k, v, o, gate, up, down) and, as PEFT's modules_to_save, a copy of
the lm_head (the base never wrote the verdict's tokens: "Conclusion", "right", "wrong", ...) for
2000 steps on the critiques. Held-out verdict accuracy, its time and memory beside the full
fine-tune's, and the other bases and settings tried: README.md, the LoRA demo.

  cftjax train --config configs/demo_cft_lora.py
  cftjax convert --to-hf --ckpt runs/demo_cft_lora --out runs/demo_cft_lora_peft --adapters-only
"""

import demo_cft
import demo_cft_lora_base

RUN_DIR = "runs/demo_cft_lora"


def get_config():
  c = demo_cft.get_config()
  c.train.run_dir = RUN_DIR
  c.data.world_dir = RUN_DIR + "/world"  # shared with the warm start
  c.data.world = demo_cft_lora_base.get_config().data.world  # the base's world: step solutions too
  c.model.init_from_run = RUN_DIR + "/base"  # the frozen base: its best params
  c.model.warmstart_config = "demo_cft_lora_base.py"  # beside this file; trained first
  c.model.lora.rank = 32
  c.model.lora.alpha = 32.0
  c.model.lora.modules_to_save = ("lm_head",)
  c.optim.lr = 5e-3  # adapters take a larger lr than a full fine-tune (at 1e-2 the loss rose again)
  c.train.steps = 2000  # one seed in three still climbs at step 1200 (0.71); README.md
  c.eval.every_steps = 500
  return c
