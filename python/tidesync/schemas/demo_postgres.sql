-- The demo EMR application's tables (PostgreSQL). This is the application's DDL:
-- tidesync adds its metadata columns, triggers and bookkeeping on top of it with
-- `tidesync schema install`, and removes them with `tidesync schema uninstall`.
-- Foreign keys are DEFERRABLE so that sync apply can check them once per table step
-- (the application still sees them checked immediately).

CREATE TABLE IF NOT EXISTS facilities (
    id uuid PRIMARY KEY DEFAULT uuidv7(),
    code text NOT NULL UNIQUE,
    name text NOT NULL,
    is_sensitive boolean NOT NULL DEFAULT false,
    updated_at timestamptz DEFAULT now()
);

CREATE TABLE IF NOT EXISTS reference_data (
    id uuid PRIMARY KEY DEFAULT uuidv7(),
    type text NOT NULL,
    code text NOT NULL,
    name text NOT NULL,
    visibility text NOT NULL DEFAULT 'current' CHECK (visibility IN ('current', 'historical'))
);

CREATE TABLE IF NOT EXISTS users (
    id uuid PRIMARY KEY DEFAULT uuidv7(),
    email text NOT NULL,
    display_name text NOT NULL,
    role text NOT NULL,
    facility_id uuid REFERENCES facilities (id) DEFERRABLE,
    deleted_at timestamptz
);

CREATE TABLE IF NOT EXISTS patients (
    id uuid PRIMARY KEY DEFAULT uuidv7(),
    display_id text NOT NULL,
    first_name text,
    middle_name text,
    last_name text,
    sex text CHECK (sex IN ('female', 'male', 'other', 'unknown')),
    date_of_birth date,
    village_id uuid REFERENCES reference_data (id) DEFERRABLE,
    deleted_at timestamptz,
    updated_at timestamptz DEFAULT now()
);

CREATE TABLE IF NOT EXISTS patient_additional_data (
    id uuid PRIMARY KEY DEFAULT uuidv7(),
    patient_id uuid NOT NULL REFERENCES patients (id) DEFERRABLE,
    phone text,
    address text,
    blood_type text,
    emergency_contact text,
    height_cm double precision,
    updated_at timestamptz DEFAULT now()
);

CREATE TABLE IF NOT EXISTS patient_facilities (
    id uuid PRIMARY KEY DEFAULT uuidv7(),
    patient_id uuid NOT NULL REFERENCES patients (id) DEFERRABLE,
    facility_id uuid NOT NULL REFERENCES facilities (id) DEFERRABLE,
    created_at timestamptz DEFAULT now(),
    deleted_at timestamptz
);

CREATE TABLE IF NOT EXISTS encounters (
    id uuid PRIMARY KEY DEFAULT uuidv7(),
    patient_id uuid NOT NULL REFERENCES patients (id) DEFERRABLE,
    facility_id uuid NOT NULL REFERENCES facilities (id) DEFERRABLE,
    examiner_id uuid REFERENCES users (id) DEFERRABLE,
    encounter_type text NOT NULL,
    reason text,
    start_at timestamptz NOT NULL,
    end_at timestamptz,
    deleted_at timestamptz
);
CREATE INDEX IF NOT EXISTS encounters_patient ON encounters (patient_id);

CREATE TABLE IF NOT EXISTS vitals (
    id uuid PRIMARY KEY DEFAULT uuidv7(),
    encounter_id uuid NOT NULL REFERENCES encounters (id) DEFERRABLE,
    patient_id uuid NOT NULL REFERENCES patients (id) DEFERRABLE,
    recorded_at timestamptz NOT NULL,
    temperature_c double precision CHECK (temperature_c BETWEEN 25 AND 45),
    heart_rate integer CHECK (heart_rate BETWEEN 0 AND 300),
    systolic integer,
    diastolic integer,
    spo2 integer CHECK (spo2 BETWEEN 0 AND 100),
    weight_kg double precision,
    deleted_at timestamptz
);
CREATE INDEX IF NOT EXISTS vitals_patient ON vitals (patient_id);

CREATE TABLE IF NOT EXISTS notes (
    id uuid PRIMARY KEY DEFAULT uuidv7(),
    encounter_id uuid REFERENCES encounters (id) DEFERRABLE,
    patient_id uuid NOT NULL REFERENCES patients (id) DEFERRABLE,
    author_id uuid REFERENCES users (id) DEFERRABLE,
    note_type text NOT NULL,
    content text NOT NULL,
    recorded_at timestamptz NOT NULL,
    deleted_at timestamptz
);
CREATE INDEX IF NOT EXISTS notes_patient ON notes (patient_id);

CREATE TABLE IF NOT EXISTS lab_requests (
    id uuid PRIMARY KEY DEFAULT uuidv7(),
    encounter_id uuid REFERENCES encounters (id) DEFERRABLE,
    patient_id uuid NOT NULL REFERENCES patients (id) DEFERRABLE,
    requested_by uuid REFERENCES users (id) DEFERRABLE,
    test_type_id uuid REFERENCES reference_data (id) DEFERRABLE,
    status text NOT NULL DEFAULT 'requested',
    priority text,
    requested_at timestamptz NOT NULL,
    sample_at timestamp,
    result text,
    result_value double precision,
    deleted_at timestamptz
);
CREATE INDEX IF NOT EXISTS lab_requests_patient ON lab_requests (patient_id);

CREATE TABLE IF NOT EXISTS audit_log (
    id uuid PRIMARY KEY DEFAULT uuidv7(),
    facility_id uuid,
    user_id uuid,
    action text NOT NULL,
    table_name text,
    record_id text,
    at timestamptz NOT NULL DEFAULT now(),
    sequence bigint
);

CREATE TABLE IF NOT EXISTS attachments (
    id uuid PRIMARY KEY DEFAULT uuidv7(),
    facility_id uuid NOT NULL REFERENCES facilities (id) DEFERRABLE,
    patient_id uuid REFERENCES patients (id) DEFERRABLE,
    kind text NOT NULL,
    size_bytes bigint NOT NULL,
    data bytea,
    created_at timestamptz DEFAULT now()
);
