"""`make bench`: the policy plane measured against its own floor (see bench/__main__.py)."""
