"""The evaluate step's config (``--config``, ``--dataset``, ``--set``) and which tasks it runs."""

from __future__ import annotations

from typing import Any

EVAL_TASKS = ("auto", "segmentation", "classification", "both")


def load_eval_config(config: str | None, dataset: str | None, sets: list[str] | None):
    """The step's config: ``--config`` (or defaults), then ``--dataset``, then ``--set`` overrides.

    A dataset YAML is either a partial config (its ``data`` section replaces
    the config's, its ``tasks`` keys are merged) or a bare data section.
    """
    from insight.config import ConfigError, build_config, read_yaml_mapping

    data: dict[str, Any] = read_yaml_mapping(config, "config") if config else {}
    source = config or "defaults"
    if dataset:
        ds = read_yaml_mapping(dataset, "dataset")
        if "data" not in ds and "tasks" not in ds:
            ds = {"data": ds}
        extra = sorted(set(ds) - {"data", "tasks"})
        if extra:
            raise ConfigError(f"dataset file {dataset}: only 'data' and 'tasks' sections belong here, found {extra}")
        if "data" in ds:
            data["data"] = ds["data"]
        if "tasks" in ds:
            data["tasks"] = {**(data.get("tasks") or {}), **(ds["tasks"] or {})}
        source += f" + --dataset {dataset}"
    return build_config(data, sets, source)


def choose_tasks(task: str, dataset_kind: str) -> tuple[bool, bool]:
    """(segmentation, classification) for a --task value and a dataset kind."""
    if task not in EVAL_TASKS:
        raise ValueError(f"--task must be one of {', '.join(EVAL_TASKS)}, got {task!r}")
    has_masks = dataset_kind in ("coco", "voc")
    if task == "auto":
        return has_masks, True
    seg = task in ("segmentation", "both")
    if seg and not has_masks:
        raise ValueError(f"segmentation needs masks: data.kind={dataset_kind!r} has none (use coco or voc)")
    return seg, task in ("classification", "both")
