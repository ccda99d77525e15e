"""The ``rapbot`` command line: the engine on the embedded store, and a local chat.

Contract (scripts and acceptance checks rely on it): global options ``--data-dir``
(``RAPBOT_DATA_DIR``), ``--profile`` (``RAPBOT_PROFILE``), ``--chat`` (the scope, default
``local``), ``--user``, ``--json``; a user error exits 1 with one line on stderr, a usage error
exits 2.

One module per command group (:data:`rapbot.cli.app.COMMAND_GROUPS`); what they share is in
:mod:`rapbot.cli.common`; the reply texts shared with the chat core in :mod:`bots.core.replies`.
"""

from rapbot.cli.app import build_parser, main, run

__all__ = ["build_parser", "main", "run"]
