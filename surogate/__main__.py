import sys

from surogate.cli import main

sys.exit(main())
