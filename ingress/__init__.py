"""The aiohttp front door: signed HTTP requests in, commands out (issue #5)."""
