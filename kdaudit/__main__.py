import sys

from kdaudit.cli import main

sys.exit(main())
