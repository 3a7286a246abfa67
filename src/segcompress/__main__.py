import sys

from segcompress.cli import main

sys.exit(main())
