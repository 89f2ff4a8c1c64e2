"""``agents-sessions ui``: a small, read-only conversation explorer in the browser.

Installed with the ``[ui]`` extra (Starlette, Jinja2, uvicorn). Pages:

* **Conversations** -- newest first, filtered by user and creation date, keyset pages;
* **a conversation** -- its transcript as a person reads it, every stored item's exact
  JSON one click away, its usage per model, and a JSON Lines download (the ``export``
  format);
* **Usage** -- tokens per model and active conversations over time as server-rendered
  SVG charts, top users, and the seed's monitoring numbers, over 24 h, 7 d or 30 d.

It only reads (:mod:`.reading`), escapes everything it shows (Jinja2 autoescaping),
runs no script at all, and asks for a token whenever it listens beyond loopback
(:mod:`.security`). This package imports the core and ``ops``; nothing imports it
except the ``ui`` command.
"""

from .app import create_app
from .security import ExplorerAccess

__all__ = ["ExplorerAccess", "create_app"]
