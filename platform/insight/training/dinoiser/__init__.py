"""`insight train-dinoiser`: train the CLIP-DINOiser refinement heads with Ray Train.

What is learned (docs/method.md, Features). CLIP stays frozen. Both heads read the
output of the second layer norm of block ``backbone.dinoiser.block`` (the
third-from-last by default) on a ``dinoiser_train.crop`` crop:

- Correlation head (3x3 conv, replicate padding -> ``proj_dim``). Target: the
  teacher's binarised patch correlations. The teacher is a frozen timm ViT
  (DINO ViT-B/16 by default); its features are the *value* vectors of its last
  block (what CLIP-DINOiser uses), resized to the CLIP grid when the patch
  sizes differ, L2-normalised; target_nm = 1[cos(v_n, v_m) >= teacher_gamma].
  Prediction: the cosine s_nm of the head's L2-normalised outputs, scored by
  BCE with logit (s_nm - gamma) * corr_logit_scale, gamma being
  ``backbone.dinoiser.gamma``. Why not the reference's logit: CLIP-DINOiser's
  code feeds the clamped cosine itself to BCE-with-logits, so its
  probabilities live in [0.5, 0.73] and the loss can never approach zero;
  shifting by gamma puts the BCE decision boundary exactly at the threshold
  extraction applies, and the scale lets the loss saturate.
- Background head (1x1 conv -> 1, on L2-normalised features). Target: the
  teacher's last-block attention of the class token to the patches (mean over
  heads), binarised at its per-image mean: 1 = salient (object), 0 =
  background. Why this one: the reference distils FOUND, which needs its own
  trained decoder (not available offline) and whose starting point is this
  very signal (DINO's class token attends to objects; FOUND takes the
  least-attended patch as its background seed). The class-token attention
  comes out of the teacher forward we run anyway, needs no extra weights, and
  binarising at the mean has no parameter to tune. It is coarser than FOUND
  on cluttered scenes: prefer a stronger saliency model when one is at hand.

Data: any dataset of the data layer; each step takes ``batch_size`` images per
worker, albumentations shortest-side resize + random crop, flips and colour
jitter, seeded by (seed, epoch, image) so a rerun sees the same pixels.
Unreadable images are masked out of the loss (every rank still steps, so DDP
stays in step) and counted. ``eval_images`` fixed centre crops are scored
before and after training (rank 0): ``initial_loss`` and ``final_loss``
compare the same pixels and targets, free of augmentation noise.

Distribution and outputs: a Ray Train ``TorchTrainer`` (DDP over
``num_workers``); rank 0 prints a progress line, logs its params and the loss
curve to the step's MLflow run, and reports a checkpoint (heads safetensors +
optimiser state) every ``checkpoint_every`` epochs and at the end, from which a
failed worker group resumes. The driver writes the final heads atomically to
``dinoiser_train.out`` in the published key layout (``obj_proj.*``,
``bkg_decoder.*``); ``backbone.dinoiser.heads=<that file>`` then refines
extracted features and changes the cache key (the backbone identity carries
the heads' sha256).

Modules: `targets` (targets and losses), `teacher` (the timm teacher), `clip`
(the frozen CLIP features the heads read), `images` (augmented crops),
`checkpoint` (the heads file), `tracker` (rank-0 logging), `worker` (the Ray
Train loop), `driver` (`train_dinoiser`, the step).
"""

from insight.training.dinoiser.driver import train_dinoiser

__all__ = ["train_dinoiser"]
