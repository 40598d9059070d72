"""maas-ctl: the operator's command line over maas-authz's operator API."""
