"""Evaluation of reward models.

- ``reward_model``: :class:`RewardScorer`, texts -> rewards (tokenized pairs are scored in packed rows by
  ``megapmp.loss.score_pairs``, which the trainer's held-out evaluation uses too) for a megapmp checkpoint or an HF directory,
  with the model's own tokenizer, template and EOS policy.
- ``metrics``: pairwise accuracy, exact / Monte-Carlo / single-draw Best-of-N, multiple choice,
  CodePrefBench (pure numpy).
- ``answers``: GSM8K / MATH final-answer extraction and equivalence.
- ``formats``: evaluation file formats -> candidate sets or text pairs.
- ``tasks`` / ``report``: the task registry and report writing behind ``tools/evaluate.py``.
"""
