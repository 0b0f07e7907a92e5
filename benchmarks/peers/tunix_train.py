"""tunix worker: one SFT train step of tunix's Qwen2 with tunix's own jitted `PeftTrainer` step
(nnx.value_and_grad of its default masked CE + nnx.Optimizer AdamW update, optimizer donated).
Usage: python tunix_train.py SHAPES_JSON"""

from __future__ import annotations

import jax
import numpy as np
import optax
from tunix.sft import peft_trainer
from tunix.sft import utils

import harness
import tunix_common


def model_inputs(example: peft_trainer.TrainingInput) -> dict[str, jax.Array]:
  """What tunix's own PEFT pipeline (tunix.cli.peft_main) feeds the loss: positions and a causal mask
  from the padding mask."""
  pad_mask = example.input_tokens != 0
  return {"input_tokens": example.input_tokens, "input_mask": example.input_mask,
          "positions": utils.build_positions_from_mask(pad_mask),
          "attention_mask": utils.make_causal_attn_mask(pad_mask)}


def main() -> None:
  shapes = harness.shapes_from_argv()
  model = tunix_common.qwen2_model(shapes)
  tx = optax.chain(optax.clip_by_global_norm(shapes.grad_clip),
                   optax.adamw(shapes.lr, weight_decay=shapes.weight_decay))
  trainer = peft_trainer.PeftTrainer(
      model, tx, peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=10**9))
  trainer = trainer.with_gen_model_input_fn(model_inputs)
  # The step `PeftTrainer.train` runs per batch (its loop adds only metric logging around it).
  train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)
  rng = np.random.default_rng(shapes.seed)
  tokens = rng.integers(1, shapes.vocab, (shapes.batch, shapes.seq), dtype=np.int32)  # 0 is padding
  example = peft_trainer.TrainingInput(input_tokens=jax.numpy.asarray(tokens),
                                       input_mask=jax.numpy.ones(tokens.shape, bool))
  box = {}

  def call():
    loss, _, grad_norm = train_step(example)
    jax.block_until_ready((loss, grad_norm))
    box["loss"] = float(loss)

  result = harness.time_calls(call, shapes.warmup, shapes.steps)
  harness.emit(result | {"system": "tunix", "final_loss": box["loss"], "jax": jax.__version__})


if __name__ == "__main__":
  main()
