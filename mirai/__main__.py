import sys

from mirai.cli import main

sys.exit(main())
