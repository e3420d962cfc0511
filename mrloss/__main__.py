import sys

from mrloss.cli import main

sys.exit(main())
