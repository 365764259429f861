"""Scoring samples: feature extractors (torch-fidelity's Inception in inception.py, the toy
judge in judge.py), images and features read as streams (images.py, features.py), the Fréchet
distance (frechet.py), precision/recall (precision_recall.py), the metrics the papers report with
their reference statistics (metrics.py), and the evaluator that `eval_fid.py` and `eval.every`
share, with the results table (evaluate.py).
"""
