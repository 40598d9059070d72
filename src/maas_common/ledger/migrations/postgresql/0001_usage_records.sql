-- One row per charged response; request_id makes every write idempotent (several replicas
-- write at once: INSERT ... ON CONFLICT (request_id) DO NOTHING).
CREATE TABLE usage_records (
  request_id        TEXT PRIMARY KEY,
  ts_ms             BIGINT NOT NULL,
  user_name         TEXT NOT NULL,
  model             TEXT NOT NULL DEFAULT '',
  tier              TEXT NOT NULL DEFAULT '',
  subscription      TEXT NOT NULL DEFAULT '',
  key_id            TEXT NOT NULL DEFAULT '',
  organization_id   TEXT NOT NULL DEFAULT '',
  cost_center       TEXT NOT NULL DEFAULT '',
  prompt_tokens     BIGINT NOT NULL DEFAULT 0,
  completion_tokens BIGINT NOT NULL DEFAULT 0,
  total_tokens      BIGINT NOT NULL DEFAULT 0,
  cost_nanos        BIGINT NOT NULL DEFAULT 0,
  priced            BOOLEAN NOT NULL DEFAULT FALSE,
  status            INTEGER NOT NULL DEFAULT 0,
  streamed          BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX usage_records_ts ON usage_records (ts_ms);
CREATE INDEX usage_records_user_ts ON usage_records (user_name, ts_ms);
CREATE INDEX usage_records_subscription_ts ON usage_records (subscription, ts_ms);
CREATE INDEX usage_records_model_ts ON usage_records (model, ts_ms);
