"""``python -m scripts.benchmarks`` (what ``scripts/bench`` runs): see ``cli.py``."""

import sys

from scripts.benchmarks.cli import main

sys.exit(main())
