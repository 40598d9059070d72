"""maas-ratelimit: Envoy rate limit service with token buckets for requests and LLM tokens."""
