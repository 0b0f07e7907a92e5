"""Demo: LoRA critique fine-tuning on the synthetic critique world, on a laptop CPU.

configs/demo_cft.py with only low-rank adapters trained (model.lora): rank 32 on every projection
(q, k, v, o, gate, up, down) of a frozen base. There is no pretrained model in the demo, so the
frozen base is the randomly initialised model of train.seed (embeddings, norms and lm_head stay
random); the adapters alone learn to check sums. Measured in README.md beside the full fine-tune.

  cftjax train --config configs/demo_cft_lora.py
"""

import demo_cft


def get_config():
  c = demo_cft.get_config()
  c.model.lora.rank = 32
  c.model.lora.alpha = 32.0
  c.optim.lr = 1e-2  # adapters take a larger lr than a full fine-tune
  return c
