"""An M2N2 member (a piecewise recipe) written as a model directory."""

from __future__ import annotations

from evomerge.merge.piecewise import PiecewiseRecipe, iter_piecewise, make_layout


def write_piecewise_model(recipe: PiecewiseRecipe, out_dir, *, card_extra: str = ""):
    """Export a piecewise (M2N2) member as an ordinary model directory (atomically)."""
    from pathlib import Path

    from evomerge.merge.export.files import write_dir
    from evomerge.merge.plan import check_compatible
    from evomerge.merge.source_model import ST_DTYPES
    from evomerge.merge.sources import open_source

    recipe.validate_semantics()
    sources = {n: open_source(n, m.path) for n, m in recipe.ordered_models()}
    try:
        first = next(iter(sources.values()))
        check_compatible(sources, first.name)
        dtype = recipe.dtype or ST_DTYPES[next(iter(first.tensors.values())).dtype][0]
        layout = make_layout(first, recipe.blocks)
        config = dict(first.config)
        config["torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"] = dtype
        card = ("---\nlibrary_name: transformers\ntags:\n- merge\n- evomerge\n- m2n2\n---\n# M2N2 merge\n\n"
                f"Built by evomerge from an M2N2 archive member: a per-element linear combination of "
                f"{len(sources)} models ({', '.join(f'`{n}`' for n in sources)}) with {len(recipe.pieces)} "
                f"pieces over the flattened parameters ({recipe.blocks} blocks). mergekit has no method that "
                "splits a tensor between coefficients, so there is no mergekit config for it.\n\n"
                f"## Recipe (evomerge)\n\n```yaml\n{recipe.to_yaml()}```\n" + (f"\n{card_extra}" if card_extra else ""))
        return write_dir(Path(out_dir), [(n, first.tensors[n].shape) for n in layout.names],
                         iter_piecewise(recipe, sources), dtype, config, tokenizer_dir=first.path,
                         generation_dir=first.path, files={"evomerge_recipe.yaml": recipe.to_yaml(), "README.md": card},
                         metadata={"evomerge_recipe_hash": recipe.content_hash()})
    finally:
        for s in sources.values():
            s.close()
