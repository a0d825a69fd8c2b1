import sys

from swin.bench import main

sys.exit(1 if main().get("errors") else 0)
