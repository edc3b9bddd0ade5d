"""The merge engine: recipes (evomerge's own, mergekit configs, data-flow paths, piecewise M2N2 members), the
merge methods as pure tensor functions, planning and building merges from safetensors sources (LoRA adapters and
vocabularies included), and exporting model directories and mergekit YAML. It knows nothing of searches."""
