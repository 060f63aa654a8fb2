"""Evaluation: Frechet distances, the shipped digits classifier and digits sample metrics, data NLL.

``frechet`` (FD between fitted Gaussians), ``digits_classifier`` (the judge and its recipe,
runnable as ``python -m difflab.eval.digits_classifier``), ``metrics`` (digits FD, confident
share, class histogram, real-vs-real floor, bits/dim) and ``inception`` (FID with local
torchvision Inception-v3 weights, optional). Nothing is imported here, so running a module with
``-m`` does not import it twice.
"""
