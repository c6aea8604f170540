"""Tasks through concepts: segmentation, classification, exact explanations, evaluation.

Per image (what a server calls)::

    seg = Segmenter.from_model(model, class_names, background=True)
    result = seg.segment(image_rgb, via="concepts")       # or "opaque", or seg.segment_both(image_rgb)
    for e in explain_segments(result, top=5, namer=concept_namer(model)):
        print(e.class_name, e.mean_logit, [(c.name, c.contribution) for c in e.top])

    clf = Classifier.from_model(model, class_names)
    out = clf.classify(image_rgb)                          # zero-shot through concepts
    why = explain_zero_shot(out, int(out.logits_f.argmax()))

Over a dataset: `insight.tasks.evaluate.evaluate(cfg, model_ref)` (`insight evaluate`).

These are the package's public names; the building blocks (class banks, sliding
windows, decompositions, metrics) stay in their modules.
"""

from insight.tasks.classification import Classifier, ConceptProbe, explain_zero_shot, train_probe
from insight.tasks.explain import concept_namer, explain_segments, segment_concept_maps
from insight.tasks.segmentation import Segmenter

__all__ = [
    "Classifier",
    "ConceptProbe",
    "Segmenter",
    "concept_namer",
    "explain_segments",
    "explain_zero_shot",
    "segment_concept_maps",
    "train_probe",
]
