"""`insight quickstart` (what `make demo` runs): every pipeline step, end to end, then a report.

On a fresh machine with no network it runs on real images and real weights:
the bundled photos (a COCO dataset whose VOC and ARC 2017 photos carry real
masks), the
offline EfficientNet/MiniLM backbone (`backbone.kind: auto` picks OpenCLIP
when its weights are available), multi-view augmentation for enough tokens, a
small sweep over k and depth with the champion registered, concept relations
and names, evaluation through concepts against the opaque backbone, one
request to the model served with Ray Serve, and a self-contained HTML report.
Each stage prints one progress line; the result is one JSON line.
"""

from __future__ import annotations

import base64
import json
import logging
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STAGES = ("extract", "sweep", "concepts", "evaluate", "serve", "report")


def _say(i: int, msg: str, t0: float) -> None:
    sys.stderr.write(f"[quickstart {i}/{len(STAGES)} | {time.perf_counter() - t0:6.1f}s] {msg}\n")
    sys.stderr.flush()


def _explain_once(cfg, model_ref: str, tracking_uri: str, image: Path, config_path: str | None,
                  sets: list[str]) -> dict[str, Any]:
    """Deploy the served app on 127.0.0.1, POST one image to /v1/explain, shut it down."""
    from ray import serve

    from insight.runtime import serve_app_module

    appmod = serve_app_module()
    app = appmod.build_app({"model": model_ref, "tracking_uri": tracking_uri, "config": config_path, "set": sets})
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    try:
        serve.run(app, name="insight", route_prefix="/")
        body = json.dumps({"image_b64": base64.b64encode(image.read_bytes()).decode("ascii"), "top_k": 5,
                           "format": "png"}).encode()  # the report draws each concept's heatmap PNG
        req = urllib.request.Request(f"{url}/v1/explain", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.loads(resp.read())
    finally:
        serve.shutdown()
    return {"url": url, "response": answer}


def run_quickstart(cfg, config_path: str | None = None, sets: list[str] | None = None,
                   serve_check: bool = True) -> dict[str, Any]:
    """Run every step of ``cfg`` (loaded from ``config_path`` + ``sets``, which Serve replicas reload)."""
    import mlflow

    from insight import tracking
    from insight.cache.extract import extract
    from insight.concepts.run import mine_concepts
    from insight.config import config_with
    from insight.report import Figure, Section, write_report
    from insight.sweeps.tune import sweep
    from insight.tasks.evaluate import evaluate

    t0 = time.perf_counter()
    work = Path(cfg.workdir).resolve()
    uri = tracking.setup(cfg)

    _say(1, "extracting dense patch features (multi-view augmentation) ...", t0)
    with tracking.step_run(cfg, "extract"):
        ex = extract(cfg, progress=True)
        mlflow.set_tag("insight.cache_key", ex["key"])
        tracking.log_result(ex)
    _say(1, f"cache {ex['key']}: {ex['images']} views, {ex['tokens']} tokens of dim {ex['dim']} ({ex['status']})", t0)

    _say(2, f"sweeping {cfg.sweep.space} with Ray Tune ({cfg.sweep.num_samples} samples) ...", t0)
    sw = sweep(cfg)
    model_ref = sw["model"]
    _say(2, f"champion {model_ref} = version {sw['model_version']} ({sw['best_trial']}, "
            f"val FVU {sw['best_val_fvu']:.3f}, L0 {sw['best_val_l0']:.1f})", t0)

    _say(3, "mining concept relations, hierarchy, names and galleries ...", t0)
    co = mine_concepts(cfg, model_ref)
    _say(3, f"{co['concepts']} concepts ({co['alive']} alive), {co['with_parents']} with a parent, "
            f"{co['levels']} levels", t0)

    _say(4, "evaluating segmentation through concepts vs the opaque backbone ...", t0)
    ev = evaluate(config_with(cfg, {"tasks.split": str(_annotated_split(cfg))}), model_ref, task="segmentation")
    _say(4, f"{ev.get('segmentation_images')} annotated images: mIoU through concepts {ev.get('miou_concepts')}, "
            f"opaque {ev.get('miou_opaque')}, ratio {ev.get('miou_ratio')} (majority-class baseline "
            f"{ev.get('miou_majority')}); reconstruction cosine {ev.get('recon_cosine')}, FVU {ev.get('recon_fvu')}", t0)

    served: dict[str, Any] = {}
    if serve_check:
        _say(5, "serving the champion with Ray Serve and asking /v1/explain about one image ...", t0)
        from insight.data.datasets import build_dataset

        ds = build_dataset(cfg.data, cfg.workdir)
        image = next((Path(r.path) for r in ds.records if r.image_id == "chelsea"), Path(ds.records[0].path))
        served = _explain_once(cfg, model_ref, uri, image, config_path, list(sets or [])) | {"image": str(image)}
        names = [c.get("label", c.get("name")) for c in served["response"].get("concepts", [])]
        fid = served["response"].get("fidelity", {})
        _say(5, f"{served['url']}/v1/explain on {image.name}: top concepts {names}; reconstruction cosine "
                f"{fid.get('cosine')}, FVU {fid.get('fvu')}", t0)

    _say(6, "writing the report ...", t0)
    report = _write(cfg, ex, sw, co, ev, served, work, write_report, Section, Figure)
    ui = f"{Path(sys.executable).parent / 'insight'} ui --config <this config>  # mlflow ui --backend-store-uri {uri}"
    result = {
        "report": str(report), "model": model_ref, "model_version": sw["model_version"],
        "concepts": co["concepts"], "concepts_alive": co["alive"], "concepts_with_parent": co["with_parents"],
        "miou_concepts": ev.get("miou_concepts"), "miou_opaque": ev.get("miou_opaque"),
        "evaluation_ratio": ev.get("miou_ratio"), "miou_majority": ev.get("miou_majority"),
        "evaluation_images": ev.get("segmentation_images"),
        "val_fvu": sw.get("best_val_fvu"), "val_cosine": sw.get("best_val_cosine"),
        "recon_cosine": ev.get("recon_cosine"), "recon_fvu": ev.get("recon_fvu"),
        "explain_cosine": served.get("response", {}).get("fidelity", {}).get("cosine"),
        "served_url": served.get("url"),
        "explain_top_concepts": [c.get("label", c.get("name")) for c in served.get("response", {}).get("concepts", [])],
        "mlflow_ui": f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000",
        "serve_again": f"insight serve --model {model_ref} --set tracking.uri={uri}",
        "cache": ex["cache"], "seconds": round(time.perf_counter() - t0, 1),
    }
    _say(6, f"done in {result['seconds']}s: report {report}; MLflow: {ui}", t0)
    return result


def _held_out_images(cfg) -> tuple[list[str], int]:
    """The dataset's images in the cache's validation split (no SAE trains on them), and the image count."""
    from insight.cache.format import is_validation
    from insight.data.datasets import build_dataset

    ids = [r.image_id for r in build_dataset(cfg.data, cfg.workdir).records]
    return [i for i in ids if is_validation(i, cfg.cache.val_fraction)], len(ids)


def _fidelity_rows(cfg, sw, ev, served) -> list[dict[str, Any]]:
    """Reconstruction fidelity of the champion wherever it was measured, held-out images first."""
    held, total = _held_out_images(cfg)
    rows = [{"measured on": f"{len(held)} of {total} images held out from training ({', '.join(held)}), "
                            "every view",
             "per-patch cosine": sw.get("best_val_cosine"), "FVU": sw.get("best_val_fvu"), "L0": sw.get("best_val_l0")},
            {"measured on": "training batches (BatchTopK, last step)", "per-patch cosine": None,
             "FVU": sw.get("best_train_fvu"), "L0": None}]
    def seen(ids: list[str]) -> str:
        trained = [i for i in ids if i not in held]
        return "held out" if not trained else "trained on" if len(trained) == len(ids) else "partly trained on"

    if ev.get("recon_cosine") is not None:
        evaluated = [str(r["image"]) for r in _per_image_rows(ev)]
        rows.append({"measured on": f"the {ev.get('segmentation_images')} evaluated photos ({seen(evaluated)}), "
                                    "sliding windows",
                     "per-patch cosine": ev.get("recon_cosine"), "FVU": ev.get("recon_fvu"), "L0": ev.get("l0")})
    fid = served.get("response", {}).get("fidelity") or {}
    if fid:
        rows.append({"measured on": f"served view of {Path(served['image']).name} "
                                    f"({seen([Path(served['image']).stem])})",
                     "per-patch cosine": fid.get("cosine"), "FVU": fid.get("fvu"), "L0": fid.get("l0")})
    return rows


def _evaluation_text(ev: dict[str, Any], images: list[str], held: list[str]) -> str:
    """What the ratio is measured on, and the figures that explain it."""
    def f(key: str) -> str:
        v = ev.get(key)
        return "n/a" if v is None else (f"{v:.1f}" if key == "l0" else f"{v:.3f}") if isinstance(v, float) else str(v)

    seen = [i for i in images if i not in held]
    split = ("all held out from SAE training" if not seen else "all among the SAE's training images"
             if len(seen) == len(images) else f"{', '.join(seen)} among the SAE's training images")
    text = (f"Zero-shot segmentation of the {ev.get('segmentation_images')} photos that ship with real object masks "
            f"({', '.join(images)}; {split}), {ev.get('classes')} classes (the ones "
            "annotated in them, plus background), every pixel scored: mIoU through concepts (class logits on the "
            "SAE reconstruction of each patch) " + f("miou_concepts") + ", on the opaque backbone features "
            + f("miou_opaque") + ", ratio " + f("miou_ratio") + ". Read these against the majority-class baseline "
            "(every pixel labelled with the most frequent class, no model at all): " + f("miou_majority") + ". "
            "With so few photos the ratio is a smoke signal, not a benchmark "
            "(`insight evaluate --dataset configs/datasets/voc21.yaml` scores a real split).")
    if ev.get("recon_cosine") is not None:
        text += (" What explains the ratio: the concepts reconstruct these photos' patch features at per-patch "
                 "cosine " + f("recon_cosine") + " (FVU " + f("recon_fvu") + ") with " + f("l0") + " active concepts "
                 "per patch; the two routes pick the same class on " + f("argmax_agreement") + " of the patches; "
                 "with the background rule off (arg-max class, foreground pixels only) mIoU is " + f("miou_fg_concepts")
                 + " through concepts and " + f("miou_fg_opaque") + " opaque. Adding the residual x - x^ back as one "
                 "more term reproduces the opaque labels " + ("exactly" if ev.get("residual_equals_opaque") else
                                                              "NOT exactly (a bug)") + ".")
    return text


def _write(cfg, ex, sw, co, ev, served, work: Path, write_report, Section, Figure) -> Path:
    """Assemble the HTML report from the steps' own outputs."""
    sections = []
    sections.append(Section(
        "Reconstruction fidelity", "How much of the backbone's patch features the concepts reconstruct "
        "(cosine between each patch feature x and its reconstruction x^, averaged over patches; FVU = "
        "sum |x - x^|^2 / sum |x - mean x|^2). A model that memorises its training tokens shows a low training FVU "
        "and a high one on held-out images; the sweep picks the champion by validation FVU.",
        table=_fidelity_rows(cfg, sw, ev, served)))
    sections.append(Section(
        "Sweep", f"{sw['trials']} trials over {cfg.sweep.space}; {sw['stopped_early']} stopped early by ASHA. "
        f"Champion: {sw['best_trial']} (validation FVU {sw['best_val_fvu']:.3f}, L0 {sw['best_val_l0']:.1f}), "
        f"registered as {sw['model']} (version {sw['model_version']}). overfit = validation FVU minus training FVU.",
        figures=[Figure(Path(sw["pareto_plot"]), "Validation FVU against L0; orange: Pareto front")],
        table=[{k: v for k, v in r.items() if k != "trial_id"} for r in _csv_rows(Path(sw["pareto_table"]))]))
    hier = co.get("hierarchy_png")
    gallery_dir = Path(co["galleries"]) if co.get("galleries") else None
    gal_figs = [Path(co["contact_sheet"])] if co.get("contact_sheet") else []
    if gallery_dir and gallery_dir.is_dir() and len(gal_figs) < 4:
        gal_figs += sorted(p for p in gallery_dir.glob("*.png") if p not in gal_figs)[: 8 - len(gal_figs)]
    table_rows = _concept_rows(co.get("table"))
    sections.append(Section(
        "Concepts", f"{co['concepts']} concepts ({co['alive']} alive) mined from {co['tokens']} tokens; "
        f"{co['with_parents']} have at least one parent, in {co['levels']} levels. Names come from a "
        f"{co['vocabulary']}-word vocabulary ({co['vocabulary_source']}) with the {co['naming']} method. "
        f"Interactive tree: {co['hierarchy_html']}.",
        figures=([Figure(Path(hier), "Top of the concept hierarchy")] if hier else [])
        + [Figure(p, p.stem.replace("_", " ")) for p in gal_figs],
        table=table_rows))
    hier_text, hier_rows = _hierarchy_summary(co)
    if hier_text:
        sections.append(Section("Concept hierarchy: alias classes", hier_text, table=hier_rows))
    pics = [Path(p) for p in ev.get("pictures", [])][:6]
    per_image = _per_image_rows(ev)
    sections.append(Section(
        "Evaluation: segmentation through concepts vs the opaque backbone",
        _evaluation_text(ev, [str(r["image"]) for r in per_image], _held_out_images(cfg)[0]),
        figures=[Figure(p, p.stem.replace("_", " ")) for p in pics], table=per_image))
    sections.append(Section(
        "Evaluation: every figure", f"The step's result ({ev.get('images')} images of {ev.get('dataset')}); "
        "per-class IoU and per-image figures are CSV files beside it and in its MLflow run.",
        table=[{"result": k, "value": v} for k, v in ev.items()
               if isinstance(v, (int, float, str)) and not isinstance(v, bool) and k not in ("out_dir",)
               and not str(v).startswith("/")]))
    if served:
        resp = served["response"]
        picture = _explain_picture(served, work / "report_assets" / "served_explanation.png")
        sections.append(Section(
            "Served explanation", f"POST {served['url']}/v1/explain with {Path(served['image']).name} returned these "
            "top concepts; each heatmap (one value per patch) is laid over the part of the photo the model saw.",
            figures=[Figure(picture, "top concepts of the served answer")] if picture else [],
            table=[{k: (" › ".join(str(n.get("label", n.get("name"))) for n in v) if k == "path" and isinstance(v, list) else v)
                    for k, v in c.items() if k not in ("heatmap_png", "heatmap", "heatmap_raw")}
                   for c in resp.get("concepts", [])]))
    meta = {"backbone": _backbone_that_ran(cfg, ex["cache"]), "cache": ex["key"], "tokens": ex["tokens"], "model": sw["model"]}
    return write_report(work / "report.html", "Insight quickstart report",
                        "Every step of the platform on real bundled images: features, sweep, concepts, evaluation "
                        "and serving.", sections, meta)


def _backbone_that_ran(cfg, cache: str) -> str:
    """The backbone kind the features came from, as the cache recorded it (``auto`` is resolved)."""
    from insight.cache import CacheReader

    ran = CacheReader(cache).manifest.identity.get("backbone", {}).get("kind", "?")
    return ran if cfg.backbone.kind == ran else f"{cfg.backbone.kind} -> {ran}"


def _explain_picture(served: dict[str, Any], path: Path, side: int = 224) -> Path | None:
    """The photo's served view and, beside it, each top concept's heatmap over that view (one PNG)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from insight.atomic import write_atomic

    resp = served["response"]
    concepts = [c for c in resp.get("concepts", []) if isinstance(c.get("heatmap_png"), str)][:5]
    box = resp.get("view")
    if not concepts or not box:
        return None
    with Image.open(served["image"]) as im:
        x, y, w, h = (box[k] for k in ("x", "y", "width", "height"))
        view = im.convert("RGBA").crop((round(x), round(y), round(x + w), round(y + h))).resize((side, side))
    fig, axes = plt.subplots(1, len(concepts) + 1, figsize=(2.2 * (len(concepts) + 1), 2.6), dpi=110)
    axes[0].imshow(view)
    axes[0].set_title("served view", fontsize=9)
    for ax, c in zip(axes[1:], concepts, strict=True):
        with Image.open(io.BytesIO(base64.b64decode(c["heatmap_png"]))) as hm:
            heat = hm.convert("RGBA").resize((side, side), Image.Resampling.BILINEAR)
        ax.imshow(Image.alpha_composite(view, heat))
        ax.set_title(f"{c.get('label', c.get('name'))} #{c.get('id')}\nscore {c.get('score', 0):.3f}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return write_atomic(path, buf.getvalue())


def _annotated_split(cfg) -> Path:
    """An id list of the dataset's images that carry masks (the others cannot score segmentation)."""
    from insight.data.datasets import build_dataset

    ds = build_dataset(cfg.data, cfg.workdir)
    ids = [r.image_id for r in ds.records if (m := ds.semantic_mask(r)) is not None and (m != ds.ignore_index).any()]
    if not ids:
        raise ValueError(f"data: no image of {ds.root} has masks to evaluate segmentation on")
    path = Path(cfg.workdir).resolve() / "annotated_images.txt"
    path.write_text("\n".join(ids) + "\n")
    return path


def _per_image_rows(ev: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-image figures with the majority-class baseline beside them (from the step's CSV)."""
    path = ev.get("per_image_segmentation")
    cols = {"image": "image", "classes_present": "classes", "miou_concepts": "mIoU concepts",
            "miou_opaque": "mIoU opaque", "miou_ratio": "ratio", "miou_majority": "majority baseline",
            "miou_fg_concepts": "mIoU concepts, no bg rule", "miou_fg_opaque": "mIoU opaque, no bg rule",
            "recon_cosine": "recon cosine", "recon_fvu": "recon FVU", "l0": "L0", "argmax_agreement": "same arg-max"}
    return [{label: r.get(key) for key, label in cols.items()} for r in _csv_rows(Path(path))] if path else []


def _csv_rows(path: Path) -> list[dict[str, Any]]:
    import csv

    if not path.is_file():
        return []
    return list(csv.DictReader(path.open()))


def _hierarchy_summary(co: dict[str, Any], n: int = 10) -> tuple[str, list[dict[str, Any]]]:
    """Depth, alias classes, dense and rare concepts, and the biggest classes with their members' labels."""
    if not co.get("hierarchy") or not co.get("table"):
        return "", []
    from insight.concepts.hierarchy import Hierarchy
    from insight.concepts.table import ConceptTable

    try:
        h = Hierarchy.load(co["hierarchy"])
        table = ConceptTable.load(co["table"])
    except (OSError, ValueError):
        return "", []
    placed = h.alive & ~h.rare
    classes = sorted(((rep, ms) for rep, ms in h.classes.items() if len(ms) > 1 and placed[rep]),
                     key=lambda x: (-len(x[1]), -table[x[0]].frequency, x[0]))
    text = (f"{h.levels} levels over {sum(1 for r in h.classes if placed[r])} classes of concepts. Concepts that "
            f"cover each other (Dn > tau = {table.meta.get('tau')} both ways) fire on the same tokens and are one "
            f"alias class, not a parent and a child: {h.n_alias_classes} classes have more than one member. "
            f"{int(h.dense.sum())} concepts are dense (active on more than {h.dense_share:g} of the tokens; "
            f"nobody's parent) and {int(h.rare.sum())} are rare (fired on fewer than {h.min_support} tokens, too "
            "few to estimate a relation; outside the tree). The biggest alias classes, representative first:")
    rows = [{"class": rep, "members": len(ms), "level": int(h.level[rep]),
             "frequency": round(table[rep].frequency, 4),
             "member labels": ", ".join(table.label(i) for i in ms[:8]) + (", ..." if len(ms) > 8 else ""),
             "parents": ", ".join(table.label(p) for p in h.parents[rep][:3])} for rep, ms in classes[:n]]
    return text, rows


def _concept_rows(table_path: str | None, n: int = 25) -> list[dict[str, Any]]:
    if not table_path:
        return []
    from insight.concepts.table import ConceptTable

    try:
        table = ConceptTable.load(table_path)
    except (OSError, ValueError):
        return []
    rows = sorted(table, key=lambda r: -r.frequency)[:n]
    return [{"id": r.id, "name": table.label(r.id), "group": r.group, "level": r.level,
             "frequency": round(r.frequency, 4), "parents": ", ".join(table.label(p) for p in r.parents[:3]),
             "candidates": ", ".join(c.name for c in r.candidates[:3])} for r in rows]
