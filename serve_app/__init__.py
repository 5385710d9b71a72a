"""serve_app: structured generation for Hugging Face models as a Ray Serve application."""

__version__ = "0.1.0"
