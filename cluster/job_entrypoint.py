"""The Ray job entrypoint as a script, for clusters that run it from a checkout:
`python cluster/job_entrypoint.py CONFIG` is `python -m serve_app.job CONFIG` (serve_app/job.py),
which is what `serve-app submit` runs."""

import sys

from serve_app.job import main

if __name__ == "__main__":
    sys.exit(main())
