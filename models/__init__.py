"""Differential diffusion on SDXL + Flash-SDXL: maps, sampler, pipeline, weights and image I/O."""
