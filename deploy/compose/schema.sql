-- Canonical benchmark schema: a chat server's membership, event and read-marker tables.
-- Shaped after the tables the seeds describe (Matrix/Synapse, Zulip, OpenIM).
CREATE TABLE IF NOT EXISTS users (
  user_id      text PRIMARY KEY,
  deactivated  boolean NOT NULL DEFAULT false,
  updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS rooms (
  room_id      text PRIMARY KEY,
  created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS room_memberships (
  room_id      text NOT NULL,
  user_id      text NOT NULL,
  membership   text NOT NULL CHECK (membership IN ('join','leave','invite','ban')),
  event_id     text,
  updated_at   timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (room_id, user_id)
);
CREATE TABLE IF NOT EXISTS events (
  event_id        text PRIMARY KEY,
  room_id         text NOT NULL,
  sender          text NOT NULL,
  type            text NOT NULL,
  stream_ordering bigserial UNIQUE,
  origin_ts       bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS event_json (
  event_id  text PRIMARY KEY,
  room_id   text NOT NULL,
  json      text NOT NULL
);
CREATE TABLE IF NOT EXISTS read_markers (
  user_id          text NOT NULL,
  room_id          text NOT NULL,
  event_id         text NOT NULL,
  stream_ordering  bigint NOT NULL,
  updated_at       timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (user_id, room_id)
);
CREATE INDEX IF NOT EXISTS events_room_order ON events (room_id, stream_ordering);

ALTER TABLE events REPLICA IDENTITY FULL;
ALTER TABLE event_json REPLICA IDENTITY FULL;
