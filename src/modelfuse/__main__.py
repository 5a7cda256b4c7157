import sys

from modelfuse.cli import main

sys.exit(main())
