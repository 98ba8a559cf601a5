import sys

from adapter.cli import console

sys.exit(console())
