"""`ModelConfig`: the decoder hyperparameters, read from and written to Hugging Face `config.json`.

Supports the Qwen2/2.5 (`qwen2`), Qwen3 (`qwen3`) and Llama 3.x (`llama`) families.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from cftjax.config import ConfigError
from cftjax.models import attention, lora

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")
SUPPORTED_ROPE_SCALING = ("llama3",)
REMAT_POLICIES = ("none", "minimal", "full")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder shape and numerics. Field names follow the architecture, not HF's spelling.

  `attention` names the attention backend and the decode layout that go with it
  (`cftjax.models.attention.BACKENDS`): "auto" (per platform: "cpu" on CPU, "blocked" on GPU and
  TPU, "xla" elsewhere), "xla" (`jax.nn.dot_product_attention` under masks), "blocked" (causal query
  blocks), "cpu" (blocked, and the decode layout tuned for XLA CPU), "cudnn" (cuDNN flash attention;
  GPU, bf16/f16, one sequence per row).

  `unroll_loops` compiles the layer scan and the cross-entropy chunk loop as straight-line code, with
  every rematerialised function under `prevent_cse=True` (the recomputation a scanned body gets):
  the same math and params, a program whose every op the TPU cost model counts (it counts a while
  loop's body once; `cftjax.aot` compiles 1- and 2-layer models this way). Compile time grows with
  depth; training leaves it off.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  model_type: str = "qwen2"
  rope_theta: float = 10000.0
  rope_scaling: dict[str, Any] | None = None
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = False
  attention_bias: bool = False
  qk_norm: bool = False
  max_position_embeddings: int = 32768
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  attention: str = "auto"  # auto | xla | blocked | cudnn (see above)
  unroll_loops: bool = False  # straight-line layers and CE chunks, for cost analysis (see above)
  bos_token_id: int | None = None
  eos_token_id: int | list[int] | None = None
  lora_rank: int = 0  # LoRA adapters on lora_targets (cftjax.models.lora); 0 = none
  lora_alpha: float = 16.0  # adapter output scaled by lora_alpha / lora_rank
  lora_dropout: float = 0.0  # dropout on the adapters' input while training
  lora_targets: tuple[str, ...] = tuple(lora.TARGETS)  # q, k, v, o, gate, up, down
  quantize_base: str = "none"  # none | int8 | nf4 | int4: how the frozen base's targeted kernels are stored
  lora_modules_to_save: tuple[str, ...] = ()  # trained whole beside the adapters: embed_tokens, lm_head

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ConfigError(
          f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if self.rope_scaling is not None:
      kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
      if kind not in SUPPORTED_ROPE_SCALING:
        raise ConfigError(
            f"rope_scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_SCALING)}"
            " (or no rope_scaling)")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.remat not in REMAT_POLICIES:
      raise ConfigError(f"remat={self.remat!r}; choose one of {REMAT_POLICIES}")
    attention.check_config(self.attention, self.dtype)
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # a JSON list reads back as a tuple
    object.__setattr__(self, "lora_modules_to_save", tuple(self.lora_modules_to_save))
    try:
      lora.check_settings(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets,
                          self.quantize_base, dataclasses.asdict(self), self.lora_modules_to_save)
    except ValueError as e:
      raise ConfigError(str(e)) from None

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def without_lora(self) -> "ModelConfig":
    """This model with no adapters and a plain float base (the base a LoRA run adapts)."""
    return self.replace(lora_rank=0, lora_dropout=0.0, quantize_base="none", lora_modules_to_save=())

  @property
  def o_proj_bias(self) -> bool:
    """Llama and Qwen3 put `attention_bias` on o_proj too; Qwen2 biases only q, k and v."""
    return self.attention_bias and self.model_type != "qwen2"

  @property
  def num_params(self) -> int:
    """Parameter count (embeddings and lm_head included)."""
    d, h, k, hd = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
    attn = d * (h + 2 * k) * hd + h * hd * d
    if self.attention_bias:
      attn += (h + 2 * k) * hd + (d if self.o_proj_bias else 0)
    if self.qk_norm:
      attn += 2 * hd
    layer = attn + 3 * d * self.intermediate_size + 2 * d
    head = 0 if self.tie_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.num_layers * layer + d + head

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], *, where: str = "config.json", **overrides) -> "ModelConfig":
    """Builds a config from the fields of a Hugging Face `config.json`."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ConfigError(
          f"{where}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
      heads = int(hf["num_attention_heads"])
      hidden = int(hf["hidden_size"])
      fields = dict(
          vocab_size=int(hf["vocab_size"]),
          hidden_size=hidden,
          intermediate_size=int(hf["intermediate_size"]),
          num_layers=int(hf["num_hidden_layers"]),
          num_heads=heads,
          num_kv_heads=int(hf.get("num_key_value_heads") or heads),
          head_dim=int(hf.get("head_dim") or hidden // heads),
      )
    except KeyError as e:
      raise ConfigError(f"{where}: required field {e.args[0]!r} is missing") from None
    if hf.get("use_sliding_window"):
      raise ConfigError(f"{where}: use_sliding_window=true is not supported; set it to false")
    # transformers < 5 writes rope_theta + rope_scaling; transformers >= 5 writes rope_parameters.
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    rope_theta = hf.get("rope_theta", rope.pop("rope_theta", 10000.0))
    rope.pop("rope_theta", None)
    rope_scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
    fields.update(
        model_type=model_type,
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
        qk_norm=model_type == "qwen3",
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
    )
    fields.update(overrides)
    try:
      return cls(**fields)
    except ConfigError as e:
      raise ConfigError(f"{where}: {e}") from None

  @classmethod
  def from_hf_dir(cls, path: str, **overrides) -> "ModelConfig":
    where = os.path.join(path, "config.json")
    if not os.path.exists(where):
      raise FileNotFoundError(f"{where} not found: a Hugging Face model directory needs its config.json")
    return cls.from_hf_file(where, **overrides)

  @classmethod
  def from_hf_file(cls, path: str, **overrides) -> "ModelConfig":
    """From a Hugging Face config.json at `path` (errors name it)."""
    with open(path) as f:
      try:
        hf = json.load(f)
      except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return cls.from_hf_dict(hf, where=path, **overrides)

  def to_hf_dict(self) -> dict[str, Any]:
    """The `config.json` transformers needs to load the exported weights."""
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
    hf = {
        "architectures": [arch[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rope_theta": self.rope_theta,
        "rope_scaling": self.rope_scaling,
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "torch_dtype": self.param_dtype,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
    }
    if self.model_type != "qwen2":
      hf["attention_bias"] = self.attention_bias
    return hf

  def to_json_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
