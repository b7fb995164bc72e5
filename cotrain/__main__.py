"""``python -m cotrain`` runs the command line."""

import sys

from cotrain.cli import main

sys.exit(main())
