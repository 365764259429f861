"""Scoring samples: feature extractors (torch-fidelity's Inception in inception.py, the toy
judge in judge.py, chosen by name in extractors.py), images and features read as streams
(images.py, features.py), the Fréchet distance (frechet.py), precision/recall
(precision_recall.py), the metrics the papers report with their reference statistics
(metrics.py), how a set of images is scored as one object (config.py: `ScoringConfig`), the one
evaluator that eval_fid.py and `eval.every` share (evaluator.py), and the results table
(table.py). The eval_fid.py program itself is dit/cli/eval_fid.py.
"""
