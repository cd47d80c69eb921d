package e2e

import (
	"encoding/json"
	"strconv"
	"testing"
	"time"
)

// TestTypeFidelity: every column type round-trips into the envelope as
// DESIGN §3 says (exact numbers, ISO-8601 times, base64 bytea, embedded
// json, NaN/Infinity as strings, NULL as null).
func TestTypeFidelity(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE TABLE typed (
  id int4 PRIMARY KEY,
  i2 int2, i4 int4, i8 int8, n numeric, t text, b bool, f8 float8, f4 float4,
  ts timestamptz, tsl timestamp, d date, u uuid, j json, jb jsonb, by bytea,
  arr int8[], tarr text[], e mood, iv interval, nul text
)`)
	cfg := e.config("types", []string{"public.typed"}, nil)
	e.start(cfg)

	rows := []struct {
		name   string
		insert string
		want   map[string]string // column -> exact JSON
	}{
		{"ordinary values",
			`INSERT INTO typed VALUES (1, 32767, -2147483648, 42, 12.50, 'héllo "q"', true, 1.5, 1.1,
			  '2024-03-01 12:34:56.123456+02', '2024-03-01 12:34:56.5', '2024-02-29', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
			  '{"a": [1, 2]}', '{"b": {"c": null}}', '\xdeadbeef', '{1,2,9007199254740993}', '{"x","y z"}', 'sad', '1 day 02:03:04', NULL)`,
			map[string]string{
				"id": `1`, "i2": `32767`, "i4": `-2147483648`, "i8": `42`, "n": `12.50`, "t": `"héllo \"q\""`, "b": `true`,
				"f8": `1.5`, "f4": `1.1`, "ts": `"2024-03-01T10:34:56.123456Z"`, "tsl": `"2024-03-01T12:34:56.5"`, "d": `"2024-02-29"`,
				"u": `"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"`, "j": `{"a": [1, 2]}`, "jb": `{"b": {"c": null}}`,
				"by": `"3q2+7w=="`, "arr": `[1,2,"9007199254740993"]`, "tarr": `["x","y z"]`, "e": `"sad"`,
				"iv": `"1 day 02:03:04"`, "nul": `null`,
			}},
		{"beyond 2^53 and special floats",
			`INSERT INTO typed (id, i8, n, f8, f4, ts, d) VALUES (2, 9223372036854775807, 123456789012345678901234567890.123456789, 'NaN', '-Infinity', 'infinity', '-infinity')`,
			map[string]string{
				"i8": `"9223372036854775807"`, "n": `"123456789012345678901234567890.123456789"`, "f8": `"NaN"`, "f4": `"-Infinity"`,
				"ts": `"infinity"`, "d": `"-infinity"`, "t": `null`, "arr": `null`,
			}},
		{"safe integer edge and numeric specials",
			`INSERT INTO typed (id, i8, n, f8) VALUES (3, -9007199254740992, 'NaN', 'Infinity')`,
			map[string]string{"i8": `-9007199254740992`, "n": `"NaN"`, "f8": `"Infinity"`}},
		{"empty and odd values",
			`INSERT INTO typed (id, t, by, arr, j) VALUES (4, E'line\nbreak\ttab', '\x', '{}', '[]')`,
			map[string]string{"t": `"line\nbreak\ttab"`, "by": `""`, "arr": `[]`, "j": `[]`}},
	}
	for _, r := range rows {
		e.exec(r.insert)
	}
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 30*time.Second)
	ms := e.read("types.public.typed")
	byID := map[string]envelope{}
	for _, m := range ms {
		byID[string(m.Env.After["id"])] = m.Env
	}
	for i, r := range rows {
		t.Run(r.name, func(t *testing.T) {
			env, ok := byID[jsonInt(i+1)]
			if !ok {
				t.Fatalf("no envelope for id %d", i+1)
			}
			if len(env.After) != 21 {
				t.Errorf("after has %d columns, want all 21", len(env.After))
			}
			for col, want := range r.want {
				got, ok := env.After[col]
				if !ok {
					t.Errorf("%s: missing from after", col)
					continue
				}
				if string(got) != want {
					t.Errorf("%s = %s, want %s", col, got, want)
				}
				if !json.Valid(got) {
					t.Errorf("%s: invalid JSON %s", col, got)
				}
			}
		})
	}
}

func jsonInt(i int) string { return strconv.Itoa(i) }
