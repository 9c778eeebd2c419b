"""The front end: where a FLUX model comes from and how it becomes IR.

    models       model sources: a diffusers folder, a BFL single-file checkpoint, or a named architecture with
                 seeded random weights (synthetic, for benchmarks and tests); the transformer and its config
    components   the rest of a pipeline: text encoders, tokenizers, VAE (from the folder, or random of the real shapes)
    trace        each segment (head, double, single, tail; encoders, VAE) traced to aten-level torch.fx
"""
