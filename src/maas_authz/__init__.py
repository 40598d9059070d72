"""maas-authz: Envoy external authorization for Models as a Service."""
