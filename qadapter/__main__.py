import sys

from qadapter.cli import main

sys.exit(main())
