"""Write a merge as a Hugging Face model directory, atomically.

The directory holds config.json (the reference model's, with the output dtype), the tokenizer files of
the chosen tokenizer source, safetensors weights (sharded past `max_shard_bytes`), the recipe, its
mergekit YAML and a README model card. Everything is written into a hidden temporary sibling that is
renamed into place at the end; on any failure the temporary directory is removed and the output path
stays untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from evomerge.merge.build import default_threads, merge_job, ordered_map
from evomerge.merge.export.files import write_dir
from evomerge.merge.mergekit_out import mergekit_yaml
from evomerge.merge.plan import MergePlan


def model_card(plan: MergePlan, extra: str = "") -> str:
    r = plan.recipe
    base = f"base_model:\n- {r.models[r.base].path}\n" if r.base else ""
    return (
        f"---\n{base}library_name: transformers\ntags:\n- merge\n- evomerge\n---\n"
        f"# Merged model\n\nBuilt by [evomerge](https://pypi.org/project/evomerge/) with the "
        f"`{r.method}` method from {len(r.models)} models (recipe hash `{r.content_hash()}`).\n\n"
        "## Sources\n\n" + "\n".join(f"- `{n}`: {m.path}" + (" (base)" if n == r.base else "")
                                     for n, m in r.models.items())
        + f"\n\n## Recipe (evomerge)\n\n```yaml\n{r.to_yaml()}```\n\n"
        f"## Equivalent mergekit configuration\n\n```yaml\n{mergekit_yaml(r)}```\n"
        + (f"\n{extra}" if extra else "")
    )


def write_model_dir(plan: MergePlan, out_dir: str | Path, *, device: str = "cpu",
                    max_shard_bytes: int | None = 5 * 2**30,
                    progress: Callable[[int, int], None] | None = None, card_extra: str = "") -> Path:
    def tensors() -> Iterator[tuple[str, Any]]:
        merged = ordered_map(lambda job: (job, merge_job(plan, job, device=device)), plan.jobs,
                             default_threads(device))
        for job, tensor in merged:
            yield job.name, tensor
            for m, src in plan.sources.items():
                src.release(job.source_name(m))

    ref = plan.sources[plan.reference]
    config = plan.output_config()
    files = {"evomerge_recipe.yaml": plan.recipe.to_yaml(), "mergekit_config.yml": mergekit_yaml(plan.recipe),
             "README.md": model_card(plan, card_extra)}
    return write_dir(out_dir, [(j.name, j.shape) for j in plan.jobs], tensors(), plan.out_dtype, config,
                     tokenizer_dir=plan.tokenizer_dir, generation_dir=ref.path,
                     files=files, metadata={"evomerge_recipe_hash": plan.recipe.content_hash()},
                     max_shard_bytes=max_shard_bytes, progress=progress,
                     chat_template=getattr(plan.recipe, "chat_template", None))


