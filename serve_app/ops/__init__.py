"""Operating the app on a Ray cluster, one module per job; `serve_app/cli.py` is the argparse face.

    serve_config.py  our config (or a Ray Serve one) -> the complete Ray Serve config; shipped configs
    dashboard.py     the Ray dashboard's REST API: deploy, wait, the app's own /v1/replicas
    status_text.py   `serve-app status` as lines
    jobs.py          `serve-app submit`: the config as a Ray job
    kuberay.py       a KubeRay RayService manifest, checked for room
"""


class CliError(Exception):
    """Shown to the user as one line, exit code 1."""


def one_line(text: str) -> str:
    return " ".join(text.split())
