"""Demo: LoRA critique fine-tuning on the synthetic critique world, on a laptop CPU.

What a PEFT user does, in miniature: low-rank adapters on a base model that already knows the domain's
text. The base is configs/demo_cft_lora_base.py, a model of configs/demo_cft.py's shape trained to add
(question -> the worked column sums and the boxed answer; no candidate solution, critique or
verdict), which `cftjax train` trains first into RUN_DIR/base (model.init_from_run +
model.warmstart_config) and then keeps frozen. This run trains rank-32 adapters on every projection
(q, k, v, o, gate, up, down) and, as PEFT's modules_to_save, a copy of the lm_head: the base never
wrote a third of the critique's tokens ("vs", "ok", "no", "Conclusion", "right", "wrong", ...), and
with the base's head frozen the adapters cannot raise those tokens' logits enough (README.md, the
LoRA demo).
Held-out verdict accuracy goes from 0 to 0.835 in 1200 steps with train.seed=0 and to 0.465 with
train.seed=1 (short of demo_cft's 0.985), measured in README.md beside the full fine-tune with the
other settings tried (the embedding trained too, rank, alpha, lr).

  cftjax train --config configs/demo_cft_lora.py
  cftjax convert --to-hf --ckpt runs/demo_cft_lora --out runs/demo_cft_lora_peft --adapters-only
"""

import demo_cft

RUN_DIR = "runs/demo_cft_lora"


def get_config():
  c = demo_cft.get_config()
  c.train.run_dir = RUN_DIR
  c.data.world_dir = RUN_DIR + "/world"  # shared with the warm start
  c.model.init_from_run = RUN_DIR + "/base"  # the frozen base: its best params
  c.model.warmstart_config = "demo_cft_lora_base.py"  # beside this file; trained first
  c.model.lora.rank = 32
  c.model.lora.alpha = 32.0
  c.model.lora.modules_to_save = ("lm_head",)
  c.optim.lr = 5e-3  # adapters take a larger lr than a full fine-tune (at 1e-2 the loss rose again)
  return c
