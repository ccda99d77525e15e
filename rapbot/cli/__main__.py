"""``python -m rapbot.cli``: the same as the ``rapbot`` command."""

import sys

from rapbot.cli.app import main

sys.exit(main())
