"""`insight concepts`: mine relations, hierarchy, names and galleries of a trained SAE.

`mine_concepts(cfg, model_ref, cache)` loads the model (``models:/name@alias``,
``models:/name/version``, a run id or a checkpoint folder), finds the cache it
was trained on, makes one streaming pass over it as Ray tasks
(`insight.concepts.stats`), builds the hierarchy, names every concept by both
methods, draws the hierarchy and the galleries, and stores everything in one
folder:

    concepts.parquet, concepts.json   the concept table (`insight.concepts.table`)
    relations.safetensors             Dn (sparse top-k per row) and M (sparse), counts, masses
    hierarchy.json                    alias classes, nearest parents/children, levels, roots, dense tags
                                      (layout: `insight.concepts.hierarchy`)
    hierarchy.png, hierarchy.html     the top of the tree; the whole tree, interactive
    galleries/                        concept-<id>.png, contact_levels.png, contact_groups.png

The folder is built under a temporary name and swapped in whole. A model from
MLflow gets it logged as the artifact folder ``concepts/`` of its run (the
model version's run), where ``load_model(...).concepts`` finds it; a checkpoint
folder gets it as its sibling ``concepts/`` (and logged with the step's own
MLflow run). Which config governs what: the step's config (``--config/--set``)
sets ``concepts.*``, tracking, workdir and the Ray cluster; the model's own
training config says what made its features (backbone for the text side,
dataset for the gallery images, the cache and its validation split).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from insight.atomic import swap_in_folder

log = logging.getLogger(__name__)


def _groups_of(sae: Any) -> np.ndarray:
    ends = np.asarray(sae.prefix_ends)
    return np.searchsorted(ends, np.arange(sae.n_concepts), side="right")


def build_table(stats: Any, hier: Any, vocab: Any, names: dict[str, Any], groups: np.ndarray, naming: str,
                meta: dict[str, Any]) -> Any:
    """Assemble the concept table from the pass, the hierarchy and both namings."""
    from insight.concepts.table import Candidate, Concept, ConceptTable, Relation, TopPatch

    chosen = names[naming]
    freq = stats.frequency_m
    mass = stats.mass_m
    rows = []
    for i in range(stats.n_concepts):
        cands = {k: [Candidate(w, s) for w, s in n.candidates(vocab, i)] for k, n in names.items()}
        rows.append(Concept(
            id=i, group=int(groups[i]), level=int(hier.level[i]), name=cands[naming][0].name, naming=chosen.method,
            candidates=cands[naming], name_family=cands["family"][0].name, candidates_family=cands["family"],
            name_decoder=cands["decoder"][0].name, candidates_decoder=cands["decoder"],
            parents=list(hier.parents[i]), children=list(hier.children[i]),
            parents_all=[Relation(j, s) for j, s in hier.parents_all[i]], frequency=float(freq[i]),
            count=int(stats.count_m[i]), mass=float(mass[i]),
            top_patches=[TopPatch(x, r, c, a) for x, r, c, a in stats.top_patches(i)],
            alias_class=int(hier.alias_class[i]), aliases=[a for a in hier.members(i) if a != i],
            dense=bool(hier.dense[i])))
    return ConceptTable(rows, meta)


def mine_concepts(cfg: Any, model_ref: str | None = None, cache: str | None = None) -> dict[str, Any]:
    """Run the concepts step for ``model_ref`` (default ``models:/<registered_model>@<alias>``)."""
    import mlflow

    from insight import tracking
    from insight.cache import CacheReader
    from insight.cache.locate import resolve_model_cache
    from insight.concepts.galleries import draw_galleries
    from insight.concepts.hierarchy import build_hierarchy, raw_parents, sparse_rows
    from insight.concepts.naming import decoder_names, family_names, name_spread
    from insight.concepts.stats import compute_stats
    from insight.concepts.table import Relations
    from insight.concepts.tree import draw_tree_png, write_tree_html
    from insight.concepts.vocabulary import build_vocabulary
    from insight.models import CONCEPTS, GALLERIES, attach, champion_ref, check_model, load_model, local_home
    from insight.runtime import ensure_ray

    c = cfg.concepts
    t_start = time.perf_counter()
    ref = model_ref or champion_ref(cfg)
    check_model(ref, cfg.tracking.resolved_uri(cfg.workdir))  # no store made for a missing model
    uri = tracking.setup(cfg)
    client = mlflow.MlflowClient(uri)
    with tempfile.TemporaryDirectory(prefix="insight-concepts-") as tmp, \
            tracking.step_run(cfg, "concepts", tags={"insight.model": ref}) as run:
        model = load_model(ref, tracking_uri=uri, dst=str(Path(tmp) / "model"))
        sae = model.sae.cpu().eval()
        location = resolve_model_cache(model, cache, client)
        reader = CacheReader(location)
        if reader.manifest.dim != sae.d_in:
            raise ValueError(f"cache {location} holds {reader.manifest.dim}-dim features but the model "
                             f"{ref} encodes {sae.d_in}-dim ones; pass the cache it was trained on (--cache)")
        mlflow.set_tags({"insight.cache": location, "insight.cache_key": reader.key,
                         "insight.model_run_id": model.run_id or "", "insight.model_uri": model.uri})
        log.info("concepts: %s (%d concepts) on %s (%d tokens)", ref, sae.n_concepts, location,
                 reader.manifest.num_tokens)

        ensure_ray(cfg)
        t0 = time.perf_counter()
        eps = max(c.eps, c.eps_theta * float(sae.threshold))  # activity floor (config doc of concepts.eps_theta)
        stats = compute_stats(reader, sae, eps=eps, radius=c.radius, top_n=c.top_n, split=c.split,
                              val_fraction=model.config.cache.val_fraction, tasks=c.tasks,
                              map_top=min(c.gallery_images, c.top_n))
        pass_s = time.perf_counter() - t0
        if stats.tokens == 0:
            raise ValueError(f"concepts.split={c.split!r}: cache {location} has no tokens in that split")

        timings = {"load": t0 - t_start, "pass": pass_s}
        t1 = time.perf_counter()
        parents_all = raw_parents(stats, c.tau)
        hier = build_hierarchy(parents_all, stats.count_m, tokens=stats.tokens, dense_share=c.dense_share,
                               dense_parents=c.dense_parents, min_support=c.min_support)
        family = hier.family if c.family_members == "parents" else parents_all  # Dthr of family naming
        timings["hierarchy"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        vocab = build_vocabulary(cfg, model.config, reader)
        timings["vocabulary"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        if vocab.text_vd.shape[1] != sae.d_in:
            raise ValueError(f"vocabulary embeddings are {vocab.text_vd.shape[1]}-dim, the SAE's space is "
                             f"{sae.d_in}-dim: the model's backbone ({model.config.backbone.model}) is not the one "
                             "that made the cache")
        w_dec = sae.W_dec.detach().cpu().numpy()
        b_dec = sae.b_dec.detach().cpu().numpy()
        mean_csr = stats.mean_vectors()
        fired = stats.count_m > 0  # hubness (csls) is measured against the concepts that fired
        names = {"decoder": decoder_names(w_dec, vocab, c.candidates, c.name_score, c.csls_k, fired),
                 "family": family_names(w_dec, b_dec, mean_csr, family, vocab, c.candidates, c.family_scale,
                                        c.name_score, c.csls_k, fired)}
        groups = _groups_of(sae)
        meta = {"model": model.uri, "model_ref": ref, "model_run_id": model.run_id, "model_version": model.version,
                "cache": location, "cache_key": reader.key, "split": c.split, "tokens": stats.tokens,
                "images": stats.images, "grid": list(reader.manifest.grid), "n_concepts": sae.n_concepts,
                "group_sizes": list(sae.group_sizes), "tau": c.tau, "eps": eps, "radius": c.radius,
                "dense_share": c.dense_share, "dense_parents": c.dense_parents, "min_support": c.min_support,
                "family_members": c.family_members,
                "top_n": c.top_n, "naming": c.naming, "family_scale": c.family_scale,
                "name_score": c.name_score, "csls_k": c.csls_k,
                "vocabulary": {"source": vocab.source, "kind": c.vocabulary if vocab.source != "cache" else "cache",
                               "size": len(vocab), "key": vocab.key},
                "step_run_id": run.info.run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        table = build_table(stats, hier, vocab, names, groups, c.naming, meta)
        timings["naming"] = time.perf_counter() - t1
        t1 = time.perf_counter()

        out = local_home(model, CONCEPTS, cfg.workdir)
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        stage.mkdir()
        try:
            files = table.save(stage)
            dn = sparse_rows(stats, c.relations_topk)
            Relations(*dn, *mean_csr, count=stats.count_m.copy(), mass=stats.mass_m,
                      meta={k: meta[k] for k in ("model", "cache_key", "tokens", "tau", "eps", "radius", "top_n")}
                      | {"relations_topk": c.relations_topk}).save(stage)
            (stage / "hierarchy.json").write_text(json.dumps(
                hier.to_json([x.name for x in table], stats.frequency_m), separators=(",", ":")))
            draw_tree_png(table, stage / "hierarchy.png", roots=c.tree_roots, depth=c.tree_depth)
            write_tree_html(table, stage / "hierarchy.html", title=f"Concept hierarchy of {model.uri}")
            timings["write"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            gal = draw_galleries(table, stats.top_map, reader, model.config, stage / GALLERIES,
                                 per_group=c.gallery_per_group, images=min(c.gallery_images, c.top_n),
                                 per_row=c.contact_per_row)
            swap_in_folder(stage, out)
            timings["galleries"] = time.perf_counter() - t1
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise

        t1 = time.perf_counter()
        artifact_run = attach(model, CONCEPTS, out, client, run.info.run_id)
        timings["mlflow"] = time.perf_counter() - t1
        log.info("concepts: done; seconds per phase %s", {k: round(v, 2) for k, v in timings.items()})
        levels = int(hier.level.max(initial=-1)) + 1
        result = {
            "table": str(out / files["parquet"].name), "table_json": str(out / files["json"].name),
            "relations": str(out / "relations.safetensors"), "hierarchy": str(out / "hierarchy.json"),
            "hierarchy_png": str(out / "hierarchy.png"), "hierarchy_html": str(out / "hierarchy.html"),
            "galleries": str(out / GALLERIES), "gallery_count": len(gal["galleries"]),
            "contact_sheet": str(out / GALLERIES / "contact_levels.png") if gal["contact_levels"] else None,
            "concepts": sae.n_concepts, "alive": int(hier.alive.sum()), "with_parents": hier.with_parents,
            "roots": len(hier.roots), "levels": levels, "alias_classes": hier.n_alias_classes,
            "dense": int(hier.dense.sum()), "rare": int(hier.rare.sum()),
            "tokens": stats.tokens, "images": stats.images, "pass_s": pass_s,
            "tokens_per_s": stats.tokens / max(pass_s, 1e-9), "vocabulary": len(vocab),
            "vocabulary_source": vocab.source, "naming": c.naming,
            "names_agree": float(np.mean(names["family"].index_mk[:, 0] == names["decoder"].index_mk[:, 0])),
            **{f"top50_{what}_{k}": v for k, n in names.items()
               for what, v in zip(("distinct_names", "max_name_repeat"), name_spread(n.best(vocab), stats.frequency_m),
                                  strict=True)},
            "model": model.uri, "model_run_id": model.run_id, "artifact_run_id": artifact_run,
            "artifact_path": CONCEPTS, "cache": location, "run_id": run.info.run_id, "out": str(out),
        }
        result["wall_s"] = time.perf_counter() - t_start
        tracking.log_result(result | {f"{k}_s": v for k, v in timings.items()})
        result["timings"] = timings
        return result
