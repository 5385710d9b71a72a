"""`serve-app batch`: bulk structured generation over files of requests, on Ray Data.

    items.py   an input line (OpenAI batch format) or a table row -> an item; result lines
    answer.py  items -> result lines through one engine, the router's own intake and shapes
    files.py   input chunks (JSONL byte ranges, Parquet row groups), output writers, resume
    job.py     the Ray Data pipeline, its summary and `python -m serve_app.bulk.job`

Nothing here imports Ray at module level but job.py.
"""
