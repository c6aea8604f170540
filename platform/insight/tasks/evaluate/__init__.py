"""`insight evaluate`: tasks through concepts against the opaque backbone, over a dataset.

The claim being tested (docs/method.md, Tasks and explanations): going through the concept
bottleneck costs little against the opaque backbone. So every number is
reported side by side: through concepts, opaque, their ratio (and the mIoU
difference in points).

A ratio alone does not say why concepts lose, so segmentation also reports
what explains it: reconstruction fidelity of the patches the segmenter saw
(``recon_cosine``, mean per-patch cos(x, x^), and ``recon_fvu``, both as the
SAE's training metrics define them, plus the mean of each window's own FVU),
the inference ``l0``, the share of patches whose arg-max class is the same
both ways (``argmax_agreement``), mIoU with the background rule off
(``miou_fg_*``: every pixel gets its arg-max class, scored on the pixels
annotated with a foreground class, so the fixed ``tasks.bg_threshold`` no
longer favours one route's logit scale), the majority-class baseline
(``miou_majority``: every pixel labelled with the most frequent true class),
and the "concepts + residual" route (x = x^ + (x - x^): concept terms plus
a residual term), which must reproduce the opaque labels
(``residual_equals_opaque``). Per-image figures go to
``per_image_segmentation.csv``.

Flow: the driver resolves the label space (`resolve_classes`) and the images
(`select_records`), then a Ray Data pool of model replicas (`EvalWorker`, one
per ``tasks.num_workers``, GPUs with ``tasks.gpus_per_worker``) segments and
classifies each image both ways from one backbone pass and returns, per
batch of images, summed confusion matrices, classification logits, concept
vectors (for the probe) and the explanation pictures of the first
``tasks.pictures`` images, as PNG bytes. Replicas load the model themselves
from its reference, so the pool can sit on other machines. The driver adds
everything up, writes the per-class tables and pictures atomically under
``<workdir>/evaluate/<run id>/`` and logs it all to a new MLflow run tagged
with the model's run id. A probe (``--probe``) is also saved with the model
(`insight.models.attach`), where `load_model` and the server find it.

Ground truth: the data layer's ``semantic_mask`` (COCO annotations through
pycocotools, or PNG index masks), mapped into the label space: COCO
categories by name (unannotated pixels are background when the label space
has one, else ignored), PNG values through ``tasks.label_transform``.
Image-level labels for classification: the dominant foreground class by area
(masks), or the first folder of the image's path (class folders).

Modules: `config` (the step's config, which tasks), `labels` (label space, ground truth,
the images), `replicas` (the model replica and its Ray Data pool), `scores` (dataset-level
metrics and their tables), `probe` (the concept-bottleneck probe), `driver` (the step).
"""

from insight.tasks.evaluate.config import load_eval_config
from insight.tasks.evaluate.driver import evaluate

__all__ = ["evaluate", "load_eval_config"]
