"""``python -m edgesplit.runtime`` = the ``edgesplit`` command."""
import sys

from .cli import main

sys.exit(main())
