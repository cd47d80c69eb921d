package targets

import (
	"context"
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
		if k.TargetsTopic != "" {
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

// SetReplacer replaces whole Redis sets atomically (sinks/redis implements
// it): members[i] becomes the content of keys[i]; an empty list deletes the
// key. It MUST be idempotent.
type SetReplacer interface {
	ReplaceSets(ctx context.Context, keys []string, members [][]string) error
}

// RedisOutput keeps one Redis set per room, named by KeyTemplate with
// "{room_id}" replaced (default "notify_targets:{room_id}"). Each update
// replaces the room's whole set in one MULTI, so a replay or a missed
// update heals on the room's next update.
type RedisOutput struct {
	Sets        SetReplacer
	KeyTemplate string
}

// Publish replaces the sets of the updated rooms.
func (r *RedisOutput) Publish(ctx context.Context, ups []RoomUpdate) error {
	if len(ups) == 0 {
		return nil
	}
	tmpl := r.KeyTemplate
	if tmpl == "" {
		tmpl = "notify_targets:{room_id}"
	}
	keys := make([]string, len(ups))
	members := make([][]string, len(ups))
	for i, u := range ups {
		keys[i] = strings.ReplaceAll(tmpl, "{room_id}", u.Room)
		members[i] = u.Users
	}
	return r.Sets.ReplaceSets(ctx, keys, members)
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
