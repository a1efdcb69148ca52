-- The demo EMR application's tables (SQLite, for mobile devices). This is the application's DDL:
-- tidesync adds its metadata columns, triggers and bookkeeping on top of it with
-- `tidesync schema install --db PATH`, and removes them with `tidesync schema uninstall`.
--
-- Storage conventions (what sync writes; see docs/sqlite.md):
--   uuid         TEXT, canonical lowercase '8-4-4-4-12' (the key columns must be lowercase)
--   timestamptz  TEXT, ISO-8601 in UTC with microseconds: 'YYYY-MM-DDTHH:MM:SS.ffffffZ'
--   timestamp    TEXT, 'YYYY-MM-DDTHH:MM:SS.ffffff' (no zone)
--   date         TEXT, 'YYYY-MM-DD'
--   bool         INTEGER 0 / 1
--   int32/int64  INTEGER; float64 REAL; bytes BLOB
-- Defaults write the same canonical timestamp form, so text order is time order.
-- Foreign keys are plain (checked at once when the application turns
-- PRAGMA foreign_keys on); sync apply defers them to its commit with
-- PRAGMA defer_foreign_keys, so it can write a batch in any order within a step.

CREATE TABLE IF NOT EXISTS facilities (
    id TEXT PRIMARY KEY NOT NULL,
    code TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    is_sensitive INTEGER NOT NULL DEFAULT 0 CHECK (is_sensitive IN (0, 1)),
    updated_at TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z')
);

CREATE TABLE IF NOT EXISTS reference_data (
    id TEXT PRIMARY KEY NOT NULL,
    type TEXT NOT NULL,
    code TEXT NOT NULL,
    name TEXT NOT NULL,
    visibility TEXT NOT NULL DEFAULT 'current' CHECK (visibility IN ('current', 'historical'))
);

CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY NOT NULL,
    email TEXT NOT NULL,
    display_name TEXT NOT NULL,
    role TEXT NOT NULL,
    facility_id TEXT REFERENCES facilities (id),
    deleted_at TEXT
);

CREATE TABLE IF NOT EXISTS patients (
    id TEXT PRIMARY KEY NOT NULL,
    display_id TEXT NOT NULL,
    first_name TEXT,
    middle_name TEXT,
    last_name TEXT,
    sex TEXT CHECK (sex IN ('female', 'male', 'other', 'unknown')),
    date_of_birth TEXT,
    village_id TEXT REFERENCES reference_data (id),
    deleted_at TEXT,
    updated_at TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z')
);

CREATE TABLE IF NOT EXISTS patient_additional_data (
    id TEXT PRIMARY KEY NOT NULL,
    patient_id TEXT NOT NULL REFERENCES patients (id),
    phone TEXT,
    address TEXT,
    blood_type TEXT,
    emergency_contact TEXT,
    height_cm REAL,
    updated_at TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z')
);

CREATE TABLE IF NOT EXISTS patient_facilities (
    id TEXT PRIMARY KEY NOT NULL,
    patient_id TEXT NOT NULL REFERENCES patients (id),
    facility_id TEXT NOT NULL REFERENCES facilities (id),
    created_at TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z'),
    deleted_at TEXT
);

CREATE TABLE IF NOT EXISTS encounters (
    id TEXT PRIMARY KEY NOT NULL,
    patient_id TEXT NOT NULL REFERENCES patients (id),
    facility_id TEXT NOT NULL REFERENCES facilities (id),
    examiner_id TEXT REFERENCES users (id),
    encounter_type TEXT NOT NULL,
    reason TEXT,
    start_at TEXT NOT NULL,
    end_at TEXT,
    deleted_at TEXT
);
CREATE INDEX IF NOT EXISTS encounters_patient ON encounters (patient_id);

CREATE TABLE IF NOT EXISTS vitals (
    id TEXT PRIMARY KEY NOT NULL,
    encounter_id TEXT NOT NULL REFERENCES encounters (id),
    patient_id TEXT NOT NULL REFERENCES patients (id),
    recorded_at TEXT NOT NULL,
    temperature_c REAL CHECK (temperature_c BETWEEN 25 AND 45),
    heart_rate INTEGER CHECK (heart_rate BETWEEN 0 AND 300),
    systolic INTEGER,
    diastolic INTEGER,
    spo2 INTEGER CHECK (spo2 BETWEEN 0 AND 100),
    weight_kg REAL,
    deleted_at TEXT
);
CREATE INDEX IF NOT EXISTS vitals_patient ON vitals (patient_id);

CREATE TABLE IF NOT EXISTS notes (
    id TEXT PRIMARY KEY NOT NULL,
    encounter_id TEXT REFERENCES encounters (id),
    patient_id TEXT NOT NULL REFERENCES patients (id),
    author_id TEXT REFERENCES users (id),
    note_type TEXT NOT NULL,
    content TEXT NOT NULL,
    recorded_at TEXT NOT NULL,
    deleted_at TEXT
);
CREATE INDEX IF NOT EXISTS notes_patient ON notes (patient_id);

CREATE TABLE IF NOT EXISTS lab_requests (
    id TEXT PRIMARY KEY NOT NULL,
    encounter_id TEXT REFERENCES encounters (id),
    patient_id TEXT NOT NULL REFERENCES patients (id),
    requested_by TEXT REFERENCES users (id),
    test_type_id TEXT REFERENCES reference_data (id),
    status TEXT NOT NULL DEFAULT 'requested',
    priority TEXT,
    requested_at TEXT NOT NULL,
    sample_at TEXT,
    result TEXT,
    result_value REAL,
    deleted_at TEXT
);
CREATE INDEX IF NOT EXISTS lab_requests_patient ON lab_requests (patient_id);

CREATE TABLE IF NOT EXISTS audit_log (
    id TEXT PRIMARY KEY NOT NULL,
    facility_id TEXT,
    user_id TEXT,
    action TEXT NOT NULL,
    table_name TEXT,
    record_id TEXT,
    at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z'),
    sequence INTEGER
);

CREATE TABLE IF NOT EXISTS attachments (
    id TEXT PRIMARY KEY NOT NULL,
    facility_id TEXT NOT NULL REFERENCES facilities (id),
    patient_id TEXT REFERENCES patients (id),
    kind TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    data BLOB,
    created_at TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z')
);
