"""Pretraining the tiny Qwen-VL on rendered image-text data (docs/pretraining.md).

Modules: ``render`` (the rendered tasks and writing them as platform data), ``probe`` (stage-by-stage linear
probes and diagnostics), ``vision_warmup`` (stage 1: the vision tower), ``recipe`` (the recipe, its LM stage,
``pretrain_base`` and the held-out measurements). Nothing is imported here: importing the package does no work.
"""
