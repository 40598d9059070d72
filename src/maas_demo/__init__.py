"""Demo components for the maas-gateway local stack and end-to-end tests."""
