"""Save a model as a dense safetensors checkpoint (e.g. SmolLM2-135M, loaded from its GGUF to fp32), so that it
can be quantized and benchmarked like the pruned checkpoints. Usage: python bench/save_dense.py MODEL OUT"""

import sys

from shapprune.models.layers import find_layer_stack
from shapprune.models.loading import load_model
from shapprune.outputs.atomic import atomic_dir
from shapprune.outputs.save import save_checkpoint

model_spec, out = sys.argv[1], sys.argv[2]
model, tokenizer = load_model(model_spec, device="cpu", dtype="float32")
L = find_layer_stack(model).num_layers
with atomic_dir(out) as tmp:
    save_checkpoint(model, tokenizer, tmp, {"source": model_spec, "num_layers": L, "removed": [],
                                            "kept": list(range(L)), "method": "none (dense)"})
print(f"wrote {out}")
