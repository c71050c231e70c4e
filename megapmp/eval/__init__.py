"""Evaluation: reward scoring of held-out pairs and (later) Best-of-N, multiple choice, CodePrefBench."""
