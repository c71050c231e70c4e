"""Serving a trained reward model over HTTP (tools/serve_rm.py).

- ``batcher``: many clients' requests gathered into packed batches by a token budget and a maximum
  wait, scored on one worker thread, each request's rewards routed back to it.
- ``scoring``: the one path every scoring route takes, from the body (read under the pending-bytes budget)
  to the answer, with 4xx answers for what a client got wrong.
- ``app``: the aiohttp application (native and OpenRLHF request shapes, /health, /info), its limits
  (``ServeSettings``), connections, and the serve loop that drains in-flight requests on SIGTERM.
- ``compare``: POST /compare, the route of a pairwise judge.

Scores come from ``RewardScorer(batch_invariant=True)`` (megapmp.eval.batch_invariant): a text's reward
is the same bits whatever it was batched with.
"""
