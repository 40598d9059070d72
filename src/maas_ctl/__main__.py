import sys

from maas_ctl.cli import main

sys.exit(main())
