-- maas-api's api_keys table as its migrations leave it (maas-api/db/schema 0001-0004: the
-- columns, types and constraints the gateway's lookup depends on), for tests against a real
-- PostgreSQL. Written here from those migrations; maas-api owns the real one.
CREATE TABLE IF NOT EXISTS api_keys (
    id            TEXT PRIMARY KEY,
    username      TEXT NOT NULL,
    name          TEXT NOT NULL,
    description   TEXT,
    key_hash      TEXT NOT NULL,
    status        TEXT NOT NULL DEFAULT 'active'
                  CHECK (status IN ('active', 'revoked', 'expired')),
    user_groups   TEXT[] NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    expires_at    TIMESTAMPTZ,
    last_used_at  TIMESTAMPTZ,
    ephemeral     BOOLEAN NOT NULL DEFAULT FALSE,
    subscription  TEXT NOT NULL,
    tenant        TEXT NOT NULL DEFAULT 'models-as-a-service'
);
CREATE UNIQUE INDEX IF NOT EXISTS idx_api_keys_key_hash ON api_keys (key_hash);
-- the gateway's own role: it may read this table and nothing else
DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'maas_gateway') THEN
        CREATE ROLE maas_gateway LOGIN;
    END IF;
END $$;
GRANT SELECT ON api_keys TO maas_gateway;
