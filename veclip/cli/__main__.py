import sys

from veclip.cli.main import main

sys.exit(main())
