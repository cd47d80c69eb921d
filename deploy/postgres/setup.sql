-- Prepare a Postgres (14+; 15 tested) for Tidemark. Run as a superuser.
--
-- 1. Server settings (postgresql.conf), then restart:
--      wal_level = logical
--      max_replication_slots = 10      # at least one per Tidemark instance
--      max_wal_senders = 10
--      max_slot_wal_keep_size = 50GB   # bound the WAL a stalled slot can pin
-- 2. pg_hba.conf must allow the role to connect for replication, e.g.:
--      host  chat  tidemark  10.0.0.0/8  scram-sha-256
--    (logical replication connects to the database itself, not "replication").

CREATE ROLE tidemark WITH LOGIN REPLICATION PASSWORD 'change-me';
GRANT CONNECT ON DATABASE chat TO tidemark;
GRANT USAGE ON SCHEMA public TO tidemark;
GRANT SELECT ON public.users, public.rooms, public.room_memberships,
                public.events, public.event_json, public.read_markers TO tidemark;
-- Heartbeats (postgres.heartbeat_interval) call pg_logical_emit_message,
-- which PUBLIC may execute by default; if your installation revoked it, grant
-- it back to tidemark or set heartbeat_interval: 0s.

-- Either let Tidemark manage the publication (manage_publication: true), which
-- needs the role to own the tables or be a superuser, or create it here and
-- set manage_publication: false:
CREATE PUBLICATION tidemark FOR TABLE public.users, public.rooms, public.room_memberships,
  public.events, public.event_json, public.read_markers
  WITH (publish_via_partition_root = true);

-- Tables without a primary key need a replica identity before they can be
-- published; `tidemark check` prints the exact statement for each.
