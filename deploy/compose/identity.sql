-- The demo's addition to the canonical schema (internal/bench/schema.sql):
-- events and event_json carry their whole old row, so deletes carry room_id
-- (the invalidation rule on events keys by it).
ALTER TABLE events REPLICA IDENTITY FULL;
ALTER TABLE event_json REPLICA IDENTITY FULL;
