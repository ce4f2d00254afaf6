"""How much GPU memory a training task needs, roughly, before it runs.

ms-swift's own figures for a 7B model are LoRA ~17-22 GiB, QLoRA ~10 GiB and full ~76 GiB; they
are scaled here by parameter count (from a local model's ``config.json``, or from the size written
in a hub id such as ``Qwen2.5-7B``) and by dtype. It is an estimate for placement and for the
user's information; ``gpu_config.min_memory_gb`` overrides it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

# GiB per billion parameters, plus a fixed overhead (activations, CUDA context), in 16-bit dtypes.
_PROFILE = {
    "lora": (2.4, 3.0),  # 7B → ~20 GiB
    "qlora": (0.9, 3.5),  # 7B → ~10 GiB
    "full": (10.4, 3.0),  # 7B → ~76 GiB
}
_SIZE_IN_NAME = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])")


def parameters_from_config(config: dict[str, Any]) -> float | None:
    """Approximate parameter count of a decoder-only transformer from its config."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    try:
        hidden = int(text["hidden_size"])
        layers = int(text["num_hidden_layers"])
        vocab = int(text["vocab_size"])
        inter = int(text.get("intermediate_size") or 4 * hidden)
        heads = int(text.get("num_attention_heads") or 1)
        kv_heads = int(text.get("num_key_value_heads") or heads)
    except (KeyError, TypeError, ValueError):
        return None
    head_dim = hidden // max(heads, 1)
    attention = hidden * hidden * 2 + 2 * hidden * kv_heads * head_dim
    mlp = 3 * hidden * inter
    embeddings = vocab * hidden * (1 if text.get("tie_word_embeddings") else 2)
    return float(layers * (attention + mlp) + embeddings)


def parameters_for(model_source: str, model_path: str, base_model: str) -> float | None:
    if model_source == "local":
        try:
            config = json.loads((Path(model_path) / "config.json").read_text())
        except (OSError, ValueError):
            return None
        return parameters_from_config(config)
    sizes = _SIZE_IN_NAME.findall(base_model.rsplit("/", 1)[-1])
    return float(sizes[-1]) * 1e9 if sizes else None


def estimate_memory_gb(
    *, model_source: str, model_path: str, base_model: str, train_type: str, training_args: dict[str, Any]
) -> float | None:
    """GiB per GPU a task is expected to need, or None when the model size is unknown."""
    params = parameters_for(model_source, model_path, base_model)
    if params is None:
        return None
    per_billion, overhead = _PROFILE.get(train_type, _PROFILE["lora"])
    if training_args.get("torch_dtype") == "float32" and train_type != "qlora":
        per_billion *= 2
    return round(per_billion * params / 1e9 + overhead, 1)
