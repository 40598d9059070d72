"""Code shared by the maas-authz and maas-ratelimit servers."""
