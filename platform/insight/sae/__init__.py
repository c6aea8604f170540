"""Hierarchical (Matryoshka BatchTopK) sparse autoencoder: the model, its config, loss and training step.

Build in one line, train with one function::

    sae = MatryoshkaSAE.from_config(d_in, cfg.sae)       # cfg.sae is an SAEConfig
    sae.init_from_batch(first_batch_bd)
    opt = make_optimizer(sae, cfg.train.lr)
    for step, x_bd in enumerate(batches):
        logs = train_step(sae, opt, x_bd, cfg.sae, step, grad_clip=cfg.train.grad_clip)
    save_sae("run/sae", sae, cfg.to_dict(), opt.state_dict(), step)
    sae = load_sae("run/sae")

These are the package's public names. The metrics are plain functions of tensors in
`insight.sae.metrics` (fvu, cosine, l0, ...); the sparse decode kernels live in
`insight.sae.sparse`, checkpoint details (`load_checkpoint`) in `insight.sae.step`.
"""

from insight.config import SAEConfig
from insight.sae.model import MatryoshkaSAE
from insight.sae.objectives import matryoshka_loss
from insight.sae.step import load_sae, make_optimizer, save_sae, train_step

__all__ = ["MatryoshkaSAE", "SAEConfig", "load_sae", "make_optimizer", "matryoshka_loss", "save_sae", "train_step"]
