"""A simulated sd-webui pod (see docs/sd-webui.md) for tests, the demo and benchmarks."""
