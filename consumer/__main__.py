"""``python -m consumer`` runs the ``mailbus`` command line."""

import sys

from consumer.cli.app import main

sys.exit(main())
