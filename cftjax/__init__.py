"""cftjax: JAX-native critique fine-tuning (CFT) and critique RL (GRPO) for LLM critics."""

__version__ = "0.1.0"
