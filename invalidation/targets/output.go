package targets

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/tidemark/tidemark/pipeline"
)

// KafkaOutput publishes room updates to two topics, both keyed by room id
// (so one room's records keep their order):
//
//   - Targets (compacted, <prefix>.notify_targets): the room's full target
//     set, version and position,
//     {"room_id":"!r","users":["@a","@b"],"version":7,"position":"<lsn>:<seq>"};
//     an empty set is published as "users":[] (not a tombstone), so
//     consumers see the removal.
//   - Changes (<prefix>.notify_target_changes): one record per added or
//     removed user, {"room_id","user_id","change":"added|removed","reason",
//     "version","position"}; position is the source change that caused it.
//
// Versions count a room's updates; a record published again (after a
// crash) repeats its version.
//
// Records carry the tidemark-lsn and tidemark-seq headers.
//
// A large room's updates (Partial, see Store) publish only their change
// records; its targets record is written by PublishFull, on a schedule, at
// the version it has then: a consumer of the compacted topic takes the
// record of version V and applies the change records above V.
//
// A room whose full set would exceed MaxRecordBytes is published without
// its list: {"room_id","users":null,"truncated":true,"user_count",...}
// (consumers read that room from the Postgres tables or Redis set); its
// change records are published as usual. One huge room never stalls the
// others.
type KafkaOutput struct {
	Sink         pipeline.Sink
	TargetsTopic string // "" disables
	ChangesTopic string // "" disables
	// MaxRecordBytes bounds a targets record (key, value and headers); 0
	// is no bound. Set it before the first Publish.
	MaxRecordBytes int64
	// Truncated, when set, is told of each record published without its
	// list: the room, its member count and the size the full record had.
	Truncated func(room string, users, bytes int)
}

// recordOverhead covers a targets record's key framing and headers in the
// sink's size accounting.
const recordOverhead = 256

// Publish writes the updates and returns once Kafka acknowledged them.
func (k *KafkaOutput) Publish(ctx context.Context, ups []RoomUpdate) error {
	var msgs []pipeline.Message
	for _, u := range ups {
		key := []byte(u.Room)
		if k.ChangesTopic != "" {
			for _, c := range u.Changes {
				msgs = append(msgs, pipeline.Message{Topic: k.ChangesTopic, Key: key, Value: changeJSON(u.Room, u.Version, c), Headers: posHeaders(c.Pos), Pos: c.Pos})
			}
		}
		if k.TargetsTopic != "" && !u.Partial {
			var v []byte
			// Sized before it is built: a set too large is never encoded.
			if size := targetsSize(u.Room, u.Users) + int64(len(key)+recordOverhead); k.MaxRecordBytes > 0 && size > k.MaxRecordBytes {
				if k.Truncated != nil {
					k.Truncated(u.Room, len(u.Users), int(size))
				}
				v = truncatedTargetsJSON(u.Room, len(u.Users), u.Version, u.Pos)
			} else {
				v = TargetsJSON(u.Room, u.Users, u.Version, u.Pos)
			}
			msgs = append(msgs, pipeline.Message{Topic: k.TargetsTopic, Key: key, Value: v, Headers: posHeaders(u.Pos), Pos: u.Pos})
		}
	}
	if len(msgs) == 0 {
		return nil
	}
	return k.Sink.Write(ctx, msgs)
}

// PrepareFull builds a room's full-set record for the targets topic
// (without its list when it exceeds MaxRecordBytes: memory stays within
// that bound); send writes it, returning once Kafka acknowledged it. It is
// a FullPublisher.
func (k *KafkaOutput) PrepareFull(ctx context.Context, fs *FullSet) (send func(context.Context) error, err error) {
	if k.TargetsTopic == "" {
		return func(context.Context) error { return nil }, nil
	}
	key := []byte(fs.Room)
	var users []string
	size := targetsSize(fs.Room, nil) + int64(len(key)+recordOverhead)
	truncated := false
	next, done := fs.Users(ctx)
	defer done()
	for {
		chunk, err := next()
		if err != nil {
			return nil, err
		}
		if chunk == nil {
			break
		}
		for _, u := range chunk {
			size += jsonStringSize(u) + 1
		}
		if k.MaxRecordBytes > 0 && size > k.MaxRecordBytes {
			truncated, users = true, nil
			break
		}
		users = append(users, chunk...)
	}
	var v []byte
	if truncated {
		if k.Truncated != nil {
			k.Truncated(fs.Room, fs.Count, int(size))
		}
		v = truncatedTargetsJSON(fs.Room, fs.Count, fs.Version, fs.Pos)
	} else {
		v = TargetsJSON(fs.Room, users, fs.Version, fs.Pos)
	}
	msg := pipeline.Message{Topic: k.TargetsTopic, Key: key, Value: v, Headers: posHeaders(fs.Pos), Pos: fs.Pos}
	return func(ctx context.Context) error { return k.Sink.Write(ctx, []pipeline.Message{msg}) }, nil
}

func posHeaders(p pipeline.Position) []pipeline.Header {
	return []pipeline.Header{
		{Key: "tidemark-lsn", Value: strconv.AppendUint(nil, uint64(p.CommitLSN), 10)},
		{Key: "tidemark-seq", Value: strconv.AppendUint(nil, uint64(p.Seq), 10)},
	}
}

// TargetsJSON is the value of a notify_targets record.
func TargetsJSON(room string, users []string, version uint64, pos pipeline.Position) []byte {
	b := append([]byte(`{"room_id":`), pipeline.AppendJSONString(nil, room)...)
	b = append(b, `,"users":[`...)
	for i, u := range users {
		if i > 0 {
			b = append(b, ',')
		}
		b = pipeline.AppendJSONString(b, u)
	}
	b = append(b, `],"version":`...)
	b = strconv.AppendUint(b, version, 10)
	b = append(b, `,"position":"`...)
	b = append(b, pos.String()...)
	return append(b, `"}`...)
}

// targetsSize is the length of TargetsJSON's value, up to the digits of
// version and position (counted generously), computed without building it.
func targetsSize(room string, users []string) int64 {
	n := jsonStringSize(room) + 100
	for _, u := range users {
		n += jsonStringSize(u) + 1
	}
	return n
}

// jsonStringSize is len(pipeline.AppendJSONString(nil, s)).
func jsonStringSize(s string) int64 {
	n := int64(len(s) + 2)
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"' || c == '\\' || c == '\n' || c == '\r' || c == '\t':
				n++
			case c < 0x20:
				n += 5
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			n += 5 // \ufffd
		case r == '\u2028' || r == '\u2029':
			n += 3
		}
		i += size
	}
	return n
}

// truncatedTargetsJSON stands for a set too large for one record.
func truncatedTargetsJSON(room string, users int, version uint64, pos pipeline.Position) []byte {
	b := append([]byte(`{"room_id":`), pipeline.AppendJSONString(nil, room)...)
	b = append(b, `,"users":null,"truncated":true,"user_count":`...)
	b = strconv.AppendInt(b, int64(users), 10)
	b = append(b, `,"version":`...)
	b = strconv.AppendUint(b, version, 10)
	b = append(b, `,"position":"`...)
	b = append(b, pos.String()...)
	return append(b, `"}`...)
}

func changeJSON(room string, version uint64, c Change) []byte {
	b := append([]byte(`{"room_id":`), pipeline.AppendJSONString(nil, room)...)
	b = append(b, `,"user_id":`...)
	b = pipeline.AppendJSONString(b, c.User)
	if c.Added {
		b = append(b, `,"change":"added"`...)
	} else {
		b = append(b, `,"change":"removed"`...)
	}
	b = append(b, `,"reason":"`...)
	b = append(b, c.Reason...)
	b = append(b, `","version":`...)
	b = strconv.AppendUint(b, version, 10)
	b = append(b, `,"position":"`...)
	b = append(b, c.Pos.String()...)
	return append(b, `"}`...)
}

// SetUpdate is one versioned update of a room's Redis set (sinks/redis
// applies them; see VersionedSets).
type SetUpdate struct {
	Key     string
	Version uint64
	// Full: Add is the whole set, applied when the stored version is below
	// Version. Otherwise SADD Add and SREM Remove, applied only when the
	// stored version is Version-1.
	Full        bool
	Add, Remove []string
}

// SetResult is what became of a SetUpdate.
type SetResult uint8

const (
	SetApplied SetResult = iota // written
	SetSkipped                  // the stored version was already at or above it (a replay)
	SetGap                      // a delta whose predecessor the set lacks: nothing written
)

// VersionedSets keeps versioned Redis sets (sinks/redis implements it):
// ApplySets applies updates in order, one result each; ReplaceSetVersioned
// replaces a set's whole content, read in chunks from next, at version
// (unless the stored version is at or above it), switching atomically.
type VersionedSets interface {
	ApplySets(ctx context.Context, ups []SetUpdate) ([]SetResult, error)
	ReplaceSetVersioned(ctx context.Context, key string, version uint64, next func() ([]string, error)) (bool, error)
}

// RedisOutput keeps one Redis set per room, named by KeyTemplate with
// "{room_id}" replaced (default "notify_targets:{room_id}"), and its
// version in KEY:version. An update that carries its room's full set
// replaces the set; a large room's update (Partial) adds and removes its
// changed users. Versions make both idempotent: a replay is skipped, and a
// delta the set cannot take (its predecessor is missing: Redis lost data,
// or the set predates versions) makes the output replace the whole set
// from the state (Full), at the version the state has then.
type RedisOutput struct {
	Sets        VersionedSets
	KeyTemplate string
	// Full reads a room's full set (Store.ReadFull).
	Full func(ctx context.Context, room string, fn func(fs *FullSet) error) error
	// Gap, when set, is told of each room whose set was replaced after a gap.
	Gap func(room string)
}

func (r *RedisOutput) key(room string) string {
	tmpl := r.KeyTemplate
	if tmpl == "" {
		tmpl = "notify_targets:{room_id}"
	}
	return strings.ReplaceAll(tmpl, "{room_id}", room)
}

// Publish applies the updates to the rooms' sets.
func (r *RedisOutput) Publish(ctx context.Context, ups []RoomUpdate) error {
	if len(ups) == 0 {
		return nil
	}
	sus := make([]SetUpdate, len(ups))
	for i, u := range ups {
		su := SetUpdate{Key: r.key(u.Room), Version: u.Version}
		if u.Partial {
			for _, c := range u.Changes {
				if c.Added {
					su.Add = append(su.Add, c.User)
				} else {
					su.Remove = append(su.Remove, c.User)
				}
			}
		} else {
			su.Full, su.Add = true, u.Users
		}
		sus[i] = su
	}
	res, err := r.Sets.ApplySets(ctx, sus)
	if err != nil {
		return err
	}
	var gaps []string
	for i, x := range res {
		if x == SetGap && (len(gaps) == 0 || gaps[len(gaps)-1] != ups[i].Room) {
			gaps = append(gaps, ups[i].Room)
		}
	}
	for _, room := range dedupeSorted(gaps) {
		if r.Full == nil {
			return fmt.Errorf("redis set of room %s misses an update and no full set can be read", room)
		}
		if err := r.Full(ctx, room, func(fs *FullSet) error { return r.PublishFull(ctx, fs) }); err != nil {
			return err
		}
		if r.Gap != nil {
			r.Gap(room)
		}
	}
	return nil
}

// PublishFull replaces a room's set with its full set (unless Redis holds
// that version or a later one already).
func (r *RedisOutput) PublishFull(ctx context.Context, fs *FullSet) error {
	next, done := fs.Users(ctx)
	defer done()
	_, err := r.Sets.ReplaceSetVersioned(ctx, r.key(fs.Room), fs.Version, next)
	return err
}

// FullPublishers chains full-set publishers; each must succeed.
func FullPublishers(ps ...FullPublisher) FullPublisher {
	return func(ctx context.Context, fs *FullSet) (func(context.Context) error, error) {
		var sends []func(context.Context) error
		for _, p := range ps {
			if p == nil {
				continue
			}
			send, err := p(ctx, fs)
			if err != nil {
				return nil, err
			}
			sends = append(sends, send)
		}
		return func(ctx context.Context) error {
			for _, send := range sends {
				if err := send(ctx); err != nil {
					return err
				}
			}
			return nil
		}, nil
	}
}

// Publishers chains publishers; each must succeed.
func Publishers(ps ...Publisher) Publisher {
	return func(ctx context.Context, ups []RoomUpdate) error {
		for _, p := range ps {
			if p == nil {
				continue
			}
			if err := p(ctx, ups); err != nil {
				return err
			}
		}
		return nil
	}
}
