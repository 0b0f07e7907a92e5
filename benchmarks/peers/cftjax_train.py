"""cftjax worker: one CFT train step (forward + backward + AdamW) with `make_cft_step` on a 1-device
mesh. Usage (driver only): python benchmarks/peers/cftjax_train.py SHAPES_JSON"""

from __future__ import annotations

import jax
import numpy as np
import optax

import harness
from cftjax import parallel
from cftjax.models import ModelConfig
from cftjax.train.cft import make_cft_step
from cftjax.train.state import create_train_state


def model_config(shapes: harness.Shapes) -> ModelConfig:
  """float32 master weights, compute in shapes.dtype; the attention backend is the platform's
  default ("auto"), except on a GPU in bf16 where it is cuDNN's flash kernel (`model.attention=
  "cudnn"`: the benchmark's rows are unpacked)."""
  on_gpu_bf16 = shapes.dtype == "bfloat16" and jax.default_backend() == "gpu"
  return ModelConfig(vocab_size=shapes.vocab, hidden_size=shapes.hidden,
                     intermediate_size=shapes.intermediate, num_layers=shapes.layers,
                     num_heads=shapes.heads, num_kv_heads=shapes.kv_heads, head_dim=shapes.head_dim,
                     model_type="qwen2", rope_theta=shapes.rope_theta, rms_norm_eps=shapes.rms_norm_eps,
                     tie_embeddings=shapes.tie_embeddings, attention_bias=True, dtype=shapes.dtype,
                     attention="cudnn" if on_gpu_bf16 else "auto")


def cft_batch(shapes: harness.Shapes) -> dict[str, np.ndarray]:
  """One unpacked CFT batch [batch, seq] with every target token trained."""
  rng = np.random.default_rng(shapes.seed)
  ids = rng.integers(0, shapes.vocab, (shapes.batch, shapes.seq + 1), dtype=np.int32)
  rows = np.ones((shapes.batch, shapes.seq), np.int32)
  return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": rows.astype(np.float32),
          "positions": np.cumsum(rows, axis=1, dtype=np.int32) - 1, "segment_ids": rows}


def main() -> None:
  shapes = harness.shapes_from_argv()
  cfg = model_config(shapes)
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  tx = optax.chain(optax.clip_by_global_norm(shapes.grad_clip),
                   optax.adamw(shapes.lr, weight_decay=shapes.weight_decay))
  with parallel.use_mesh(mesh):
    state = create_train_state(cfg, tx, jax.random.key(shapes.seed))
    step = make_cft_step(cfg, tx)
    batch = jax.device_put(cft_batch(shapes), parallel.batch_sharding())
  box = {"state": state}

  def call():
    box["state"], metrics = step(box["state"], batch)
    jax.block_until_ready(metrics)
    box["loss"] = float(metrics["loss"])

  result = harness.time_calls(call, shapes.warmup, shapes.steps)
  harness.emit(result | {"system": "cftjax", "final_loss": box["loss"], "attention": cfg.attention,
                         "device": jax.devices()[0].device_kind, "jax": jax.__version__})


if __name__ == "__main__":
  main()
