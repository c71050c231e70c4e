"""Pair synthesis: code collection, rule-based pairs, LLM backends, Commit-Instruct.

Import the submodules directly (`megapmp.synth.collect`, `megapmp.synth.rules`, ...): none is imported
here, so `import megapmp.synth` stays free of optional dependencies.
"""
