"""Training jobs on Ray Train: the SAE (`sae`) and the DINOiser heads (`dinoiser`)."""
