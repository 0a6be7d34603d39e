"""`python -m labmetal.cli`: the `labmetal` command without its entry-point script (lab/room.py
starts its helpers so)."""
import sys

from labmetal.cli import main

sys.exit(main())
