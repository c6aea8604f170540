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
"""

from insight.tasks.classification import (
    ClassExplanation,
    ClassificationResult,
    Classifier,
    ConceptProbe,
    concept_vectors,
    concept_vectors_from_cache,
    explain_zero_shot,
    train_probe,
)
from insight.tasks.explain import (
    ConceptContribution,
    Decomposition,
    PatchCodes,
    SegmentExplanation,
    concept_namer,
    coverage_counts,
    decompose,
    encode_sparse,
    explain_segments,
    reconstruction_logits,
    segment_bias_map,
    segment_concept_maps,
)
from insight.tasks.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy, topk_accuracy
from insight.tasks.segmentation import ClassBank, SegmentationResult, Segmenter, WindowFeatures
from insight.tasks.windows import SlidePlan, assemble, assemble_adjoint, plan_windows

__all__ = [
    "ClassBank",
    "ClassExplanation",
    "ClassificationResult",
    "Classifier",
    "ConceptContribution",
    "ConceptProbe",
    "Decomposition",
    "PatchCodes",
    "SegmentExplanation",
    "SegmentationResult",
    "Segmenter",
    "SlidePlan",
    "WindowFeatures",
    "assemble",
    "assemble_adjoint",
    "concept_namer",
    "concept_vectors",
    "concept_vectors_from_cache",
    "confusion_matrix",
    "coverage_counts",
    "decompose",
    "encode_sparse",
    "explain_segments",
    "explain_zero_shot",
    "iou_per_class",
    "mean_iou",
    "pixel_accuracy",
    "plan_windows",
    "reconstruction_logits",
    "segment_bias_map",
    "segment_concept_maps",
    "topk_accuracy",
    "train_probe",
]
