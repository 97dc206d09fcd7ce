"""Stage 1, models: what goes in. Loading a model and its tokenizer (``loading``), finding and cutting its
layer stack (``layers``, with the per-architecture table in ``archs``), and cutting calibration and test text
into windows (``data``); the dtype ``--dtype auto`` loads in (``hardware``) and recognising a torchao-quantized
checkpoint before loading it (``quantized``)."""
