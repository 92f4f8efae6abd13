"""I/O adapters: the aiohttp proxy, discovery sources, scalers, metrics, composition root."""
