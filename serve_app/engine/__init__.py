"""Generation without Ray: placement, loading, constraints, compile cache, decoding.

Submodules import torch lazily where they can; `constraints` never does (the router uses it).
"""
