"""``python -m simulator``: the same as the ``sflsim`` command."""
import sys

from simulator.cli import main

sys.exit(main())
