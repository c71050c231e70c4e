"""megapmp: CodePMP preference-model pretraining (arXiv 2410.02229), Megatron-style, from scratch."""

__version__ = "0.1.0"
