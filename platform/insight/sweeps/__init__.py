"""Hyperparameter sweeps over the SAE with Ray Tune."""
