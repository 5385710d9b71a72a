"""Generation without Ray: placement, loading, backends, the compile cache, decoding.

`serve_app.engine.factory.create_engine(model_config)` builds the engine a model's config names;
engines follow protocol.py. This package's `__init__` imports nothing: the router imports
`serve_app.generation` and must not pull in torch with it.
"""
