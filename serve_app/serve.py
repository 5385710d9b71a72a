"""`make serve`: prepare the default model, then serve CONFIG.

Serving over Ray arrives with the serving issue; until then this prepares the model and shows
how to use the engine in-process.
"""

from __future__ import annotations

import sys

from serve_app.config import ConfigError, load_config
from serve_app.models import BUILTIN_PREFIX, prepare


def main(argv: list[str]) -> int:
    path = argv[0] if argv else "configs/local.yaml"
    try:
        config = load_config(path)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    for model in config.models:
        if model.source.startswith(BUILTIN_PREFIX):
            print(f"{model.name}: {prepare(model.source.removeprefix(BUILTIN_PREFIX))}")
    print("Models are prepared. HTTP serving on Ray arrives with the serving issue; meanwhile "
          "use the engine in-process (see README: 'Use the engine in-process').")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
