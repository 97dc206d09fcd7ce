"""Stage 5, outputs: what comes out. A pruned checkpoint (``save``) or GGUF file (``gguf``), written without
overwriting anything (``atomic``); the report and plots (``report``), the comparison's
summary and plot (``comparison``); quantization (``quantize``) and the speed
and memory benchmark of the result (``bench``)."""
