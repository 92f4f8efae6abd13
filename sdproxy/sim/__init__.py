"""A simulated sd-webui pod (see shared/SD-WEBUI.md) for tests, the demo and benchmarks."""
