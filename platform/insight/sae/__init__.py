"""Hierarchical (Matryoshka BatchTopK) sparse autoencoder: model, objective, metrics, step.

Build in one line, train with one function::

    sae = MatryoshkaSAE.from_config(d_in, cfg.sae)
    sae.init_from_batch(first_batch_bd)
    opt = make_optimizer(sae, cfg.train.lr)
    for step, x_bd in enumerate(batches):
        logs = train_step(sae, opt, x_bd, cfg.sae, step, grad_clip=cfg.train.grad_clip)
    save_sae("run/sae", sae, cfg.to_dict(), opt.state_dict(), step)
"""

from insight.sae.metrics import cosine, dead_fraction_per_group, fvu, fvu_per_prefix, group_l0, l0
from insight.sae.model import MatryoshkaSAE, batch_topk, geometric_median, group_sizes_from_fractions
from insight.sae.objectives import MatryoshkaLoss, dead_mask, matryoshka_loss, prefix_sse, update_dead_counter
from insight.sae.sparse import (
    SparseCodes,
    choose_decode,
    decode_groups,
    dense_decode_groups,
    sparse_decode_groups,
)
from insight.sae.step import (
    SAECheckpoint,
    calibrate_threshold,
    keep_freed_memory,
    load_checkpoint,
    load_sae,
    make_optimizer,
    save_sae,
    train_step,
)

__all__ = [
    "MatryoshkaLoss",
    "MatryoshkaSAE",
    "SAECheckpoint",
    "SparseCodes",
    "batch_topk",
    "calibrate_threshold",
    "choose_decode",
    "cosine",
    "dead_fraction_per_group",
    "dead_mask",
    "decode_groups",
    "dense_decode_groups",
    "fvu",
    "fvu_per_prefix",
    "geometric_median",
    "group_l0",
    "group_sizes_from_fractions",
    "keep_freed_memory",
    "l0",
    "load_checkpoint",
    "load_sae",
    "make_optimizer",
    "matryoshka_loss",
    "prefix_sse",
    "save_sae",
    "sparse_decode_groups",
    "train_step",
    "update_dead_counter",
]
