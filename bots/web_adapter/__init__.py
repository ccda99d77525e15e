"""A local web chat over the command core: ``rapbot web`` serves it on 127.0.0.1.

``app`` builds the FastAPI application (routes, the NDJSON stream of one request), ``files``
checks uploads and keeps the chat's indexed photos for search results, ``format`` turns a
core Reply into the JSON the page shows; ``static/`` is the page itself (no build step).
"""

from bots.web_adapter.app import WebChat, create_app, run_web, web_core

__all__ = ["WebChat", "create_app", "run_web", "web_core"]
