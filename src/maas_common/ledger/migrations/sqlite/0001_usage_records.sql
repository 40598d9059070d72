-- One row per charged response; request_id makes every write idempotent.
CREATE TABLE usage_records (
  request_id        TEXT PRIMARY KEY,
  ts_ms             INTEGER NOT NULL,
  user_name         TEXT NOT NULL,
  model             TEXT NOT NULL DEFAULT '',
  tier              TEXT NOT NULL DEFAULT '',
  subscription      TEXT NOT NULL DEFAULT '',
  key_id            TEXT NOT NULL DEFAULT '',
  organization_id   TEXT NOT NULL DEFAULT '',
  cost_center       TEXT NOT NULL DEFAULT '',
  prompt_tokens     INTEGER NOT NULL DEFAULT 0,
  completion_tokens INTEGER NOT NULL DEFAULT 0,
  total_tokens      INTEGER NOT NULL DEFAULT 0,
  cost_nanos        INTEGER NOT NULL DEFAULT 0,
  priced            INTEGER NOT NULL DEFAULT 0,
  status            INTEGER NOT NULL DEFAULT 0,
  streamed          INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX usage_records_ts ON usage_records (ts_ms);
CREATE INDEX usage_records_user_ts ON usage_records (user_name, ts_ms);
CREATE INDEX usage_records_subscription_ts ON usage_records (subscription, ts_ms);
CREATE INDEX usage_records_model_ts ON usage_records (model, ts_ms);
