"""SQL schema of the run store (``PRAGMA user_version`` = SCHEMA_VERSION)."""

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    name        TEXT,
    status      TEXT NOT NULL
                CHECK (status IN ('running', 'completed', 'failed', 'interrupted', 'killed')),
    config      TEXT NOT NULL,
    seed        INTEGER,
    versions    TEXT NOT NULL,
    host        TEXT,
    pid         INTEGER,
    pid_start   TEXT,
    parent      TEXT REFERENCES runs(id),
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    ended_at    REAL,
    error       TEXT,
    summary     TEXT
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id      TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    round       INTEGER NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('running', 'completed', 'skipped', 'failed')),
    started_at  REAL,
    ended_at    REAL,
    info        TEXT,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS metrics (
    id          INTEGER PRIMARY KEY,
    run_id      TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    round       INTEGER,
    step        INTEGER,
    scope       TEXT NOT NULL,
    name        TEXT NOT NULL,
    value       REAL,
    recorded_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_run ON metrics (run_id, name);
CREATE TABLE IF NOT EXISTS privacy_events (
    id               INTEGER PRIMARY KEY,
    run_id           TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    seq              INTEGER NOT NULL,
    participant      TEXT NOT NULL,
    mechanism        TEXT NOT NULL,
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier >= 0),
    sample_rate      REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps            INTEGER NOT NULL CHECK (steps >= 0),
    accountant       TEXT NOT NULL,
    delta            REAL NOT NULL,
    epsilon_after    REAL,
    round            INTEGER,
    note             TEXT,
    recorded_at      REAL NOT NULL,
    UNIQUE (run_id, seq)
);
CREATE TABLE IF NOT EXISTS artifacts (
    id          INTEGER PRIMARY KEY,
    run_id      TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    kind        TEXT NOT NULL,
    name        TEXT NOT NULL,
    round       INTEGER,
    media_type  TEXT NOT NULL,
    data        BLOB NOT NULL,
    sha256      TEXT NOT NULL,
    created_at  REAL NOT NULL
)
"""
