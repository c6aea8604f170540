"""`insight evaluate --probe`: the concept-bottleneck probe, fitted and scored on the evaluated images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from insight.tasks.evaluate.labels import LabelSpace
from insight.tasks.evaluate.scores import rounded
from insight.tasks.metrics import topk_accuracy


def fit_probe(cfg, batches, space: LabelSpace, out_dir: Path, model) -> dict[str, Any]:
    """Train the concept-bottleneck probe on a split of the evaluated images; score the rest."""
    from insight.cache.format import is_validation
    from insight.models import PROBE
    from insight.tasks.classification import train_probe
    from insight.tasks.explain import concept_namer
    from insight.tasks.pictures import write_atomic

    ids = [i for _, meta in batches for i in meta["cls_ids"]]
    if not ids:
        raise ValueError("--probe: no image has a class label")
    s = np.concatenate([a["cls_s"] for a, _ in batches if "cls_s" in a])
    labels = np.concatenate([a["cls_labels"] for a, _ in batches])
    held = np.array([is_validation(i, cfg.tasks.probe_val_fraction) for i in ids])
    if held.all() or not held.any():
        raise ValueError(f"--probe: {len(ids)} labelled images give an empty train or held-out split at "
                         f"tasks.probe_val_fraction={cfg.tasks.probe_val_fraction}; evaluate more images")
    probe, info = train_probe(cfg, s[~held], labels[~held], space.fg_names)
    probe.save(out_dir / PROBE)
    logits = probe.logits(s[held]).numpy()
    acc = topk_accuracy(logits, labels[held], (1, 5))
    namer = concept_namer(model)
    held_ids = [i for i, h in zip(ids, held, strict=True) if h]
    expl, cover = [], {"90": [], "95": [], "99": []}
    for j, row in enumerate(s[held]):
        ex = probe.explain(row, top=cfg.tasks.top_concepts, namer=namer)
        for key in cover:
            cover[key].append(ex.coverage[key])
        if j < 50:
            expl.append({"image": held_ids[j], "label": space.fg_names[int(labels[held][j])], **ex.as_dict()})
    write_atomic(out_dir / "probe_explanations.json", json.dumps(expl, indent=1).encode())
    return {**info, "probe_top1": rounded(acc[1]), "probe_top5": rounded(acc[5]),
            "probe_heldout_images": int(held.sum()),
            **{f"probe_concepts_{key}": rounded(float(np.mean(v))) for key, v in cover.items()}}
