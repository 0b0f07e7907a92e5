"""Demo warm start: the frozen base of configs/demo_cft_lora.py, on a laptop CPU.

The analog of the pretrained (instruct) LLM a LoRA fine-tune starts from: a model of the world that
adds and that checks worked solutions step by step, but has never seen this fine-tune's task. It is
configs/demo_step_critic_sft.py's training in this run's world: configs/demo_cft.py's model trained
from scratch for 800 steps on two of the world's row sets, mixed 1:1: the solver rows
(solver_train.jsonl: "What is a + b?" answered with the column sums and the boxed sum) and step-level
critiques of four-step worked solutions (step_train.jsonl: each column redone from the question,
"3: 4+3+1=08 vs 07 no", then the first wrong step in "**Answer**: \\boxed{k}"). It never sees a
claimed sum judged as a whole, the verdict critique ("... vs 8 ok", "Conclusion: right") or a
right/wrong verdict. `cftjax train --config configs/demo_cft_lora.py` trains this first.
"""

import demo_step_critic_sft

RUN_DIR = "runs/demo_cft_lora/base"
WORLD_DIR = "runs/demo_cft_lora/world"


def get_config():
  return demo_step_critic_sft.config_for(RUN_DIR, WORLD_DIR)
