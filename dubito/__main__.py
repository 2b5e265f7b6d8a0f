import sys

from dubito.cli import main

sys.exit(main())
