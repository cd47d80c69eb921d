package config

import (
	"strings"
	"testing"
)

// FuzzParse: any bytes either load into a config that validates, or fail
// with a *config.Error; loading never panics and never quotes values.
func TestTypeErrorHidesDSN(t *testing.T) {
	_, err := Parse("x.yml", []byte(`postgres: "postgres://app:hunter2@db:5432/chat"`), func(string) string { return "" })
	if err == nil || strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("error = %v; want a type error without the password", err)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte("postgres:\n  dsn: postgres://u:hunter2@h:5432/db\n  tables: [events]\nkafka:\n  brokers: [\"k:9092\"]\n"))
	f.Add([]byte("postgres: {dsn: 'dbname=x password=hunter2', tables: [a.b, a.b]}\nkafka: {brokers: [x]}\n"))
	f.Add([]byte("pipeline:\n  entity_streams:\n    - {name: rooms, key: room_id, tables: [x]}\n"))
	f.Add([]byte("postgres: [1, 2]"))
	f.Add([]byte("\t- : :"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse("fuzz.yml", data, func(string) string { return "" })
		if err != nil {
			if _, ok := err.(*Error); !ok {
				t.Fatalf("error of type %T: %v", err, err)
			}
			// yaml quotes offending values in backticks in type errors; they
			// must be hidden (key names in "field X not found" may stay).
			for _, line := range strings.Split(err.Error(), "\n") {
				if strings.Contains(line, "cannot unmarshal") && strings.Contains(line, "`") {
					t.Fatalf("type error quotes a value from the file: %v", err)
				}
			}
			return
		}
		if ps := c.Validate(); len(ps) != 0 {
			t.Fatalf("loaded config does not validate: %v", ps)
		}
	})
}
