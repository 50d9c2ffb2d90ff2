"""Supervised finetuning for cell-type clustering (paper 2.4, Task 1): GEP + GEPC + ECS (+ JEPA)
from a pre-trained model directory on a labelled h5ad, through the shared training loop.

config.py (FinetuneConfig), split.py (stratified 9:1 split), data.py (h5ad -> batches, resume),
init.py (the pre-trained starting point), task.py (the loop's task). See docs/finetuning.md.
"""
