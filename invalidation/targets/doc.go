// Package targets keeps, for every room, the users to notify of a new event:
// joined (per the membership source) and with an active account (per the
// user source), as configured by a Mapping rather than code (DESIGN §4, §5).
//
// Changes arrive through the consumer runtime (package invalidation) from
// the membership and user tables' topics. The Handler turns them into facts
// kept in Postgres (Store) with the position of the change that stated them;
// a fact only replaces an older one, so redeliveries and changes arriving
// out of order across partitions are no-ops. A room's targets are derived
// from the facts once every transaction that touched it is whole (TxnIndex
// reads the END records of <prefix>.transaction), so a transaction's net
// effect is published, never its intermediate states; what a dirty room
// waits for is kept with the facts, so this holds across restarts too
// (Store.Waiting, Handler.Recover). Derived changes are
// committed with an outbox and then published (KafkaOutput, RedisOutput),
// in order and at least once.
//
// Rebuilder recomputes rooms from the source database at a snapshot that
// holds exactly the transactions committed before its WAL position (a
// temporary logical slot's exported snapshot), merging with the facts by
// position, so it can run while the consumer does. Auditor compares the
// kept state with the database and re-checks a difference once the pipeline
// has passed the snapshot's position, so lag raises no false alarm.
package targets
