"""A data-flow path (the layers a token passes through, with input scales) written as an ordinary model directory:
the layers in path order, each scale folded into the weights."""

from __future__ import annotations

import yaml

from evomerge.merge.dataflow import (
    PathRecipe,
    check_path,
    iter_path_tensors,
    open_path_sources,
    path_config,
    path_entries,
    to_mergekit_passthrough,
)
from evomerge.merge.source_model import ST_DTYPES


def write_path_model(recipe: PathRecipe, out_dir, *, card_extra: str = "", progress=None):
    """Export a path as an ordinary model directory (layers duplicated, scales folded), atomically, with the
    recipe, the equivalent mergekit passthrough config (where one exists) and a model card."""
    from pathlib import Path

    from evomerge.merge.export.files import write_dir

    sources = open_path_sources(recipe)
    try:
        kind = check_path(recipe, sources)
        head = sources[recipe.head]
        dtype = recipe.dtype or ST_DTYPES[next(iter(head.tensors.values())).dtype][0]
        entries = [(out, sources[m].tensors[t].shape) for out, m, t, _, _ in path_entries(recipe, sources)]
        files = {"evomerge_recipe.yaml": recipe.to_yaml()}
        mk = ""
        if kind == "linear":
            mk = yaml.safe_dump(to_mergekit_passthrough(recipe, kind), sort_keys=False, default_flow_style=None,
                                width=100)
            files["mergekit_config.yml"] = mk
        hops = "".join(f"| {k} | {h.model} | {h.layer} | {h.scale:.4g} |\n" for k, h in enumerate(recipe.path))
        files["README.md"] = (
            "---\nlibrary_name: transformers\ntags:\n- merge\n- evomerge\n- dataflow\n---\n"
            f"# Data-flow merge\n\nBuilt by evomerge: a path of {len(recipe.path)} layers through "
            f"{len(recipe.models)} models (recipe hash `{recipe.content_hash()}`); embeddings, final norm and "
            f"head from `{recipe.head}`. Input scales are folded into the weights, so this is an ordinary "
            f"`{head.config.get('model_type')}` model.\n\n| hop | model | layer | input scale |\n|---|---|---|---|\n"
            + hops + f"\n## Recipe (evomerge)\n\n```yaml\n{recipe.to_yaml()}```\n"
            + (f"\n## Equivalent mergekit configuration\n\n```yaml\n{mk}```\n" if mk else "")
            + (f"\n{card_extra}" if card_extra else ""))
        return write_dir(Path(out_dir), entries, iter_path_tensors(recipe, sources, kind), dtype,
                         path_config(recipe, sources, dtype), tokenizer_dir=head.path, generation_dir=head.path,
                         files=files, metadata={"evomerge_recipe_hash": recipe.content_hash()}, progress=progress)
    finally:
        for s in sources.values():
            s.close()
