import sys

from bertscale.cli import main

sys.exit(main())
