"""config.json shapes of real models (published configs, no weights), for the estimator's and the sizing
tests: the numbers they assert are defensible only against the real shapes."""

from __future__ import annotations

# meta-llama/Llama-3.1-8B (3.0 and 3.1 share the shape)
LLAMA3_8B: dict[str, object] = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
# meta-llama/Llama-3.1-70B
LLAMA3_70B: dict[str, object] = {
    **LLAMA3_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
}
