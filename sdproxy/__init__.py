"""sdproxy: a concurrency-limiting, autoscaling reverse proxy for Stable Diffusion WebUI pods."""

__version__ = "0.1.0"
