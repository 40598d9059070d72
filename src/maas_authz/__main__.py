import sys

from maas_authz.main import main

sys.exit(main())
