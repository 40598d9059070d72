import sys

from maas_ratelimit.main import main

sys.exit(main())
