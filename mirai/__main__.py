"""``python -m mirai <command>``: the ``mirai`` command (``mirai.cli``), the form the launchers run."""
import sys

from mirai.cli import main

sys.exit(main())
