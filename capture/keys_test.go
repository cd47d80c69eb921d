package capture

import (
	"slices"
	"strings"
	"testing"
)

func TestChooseKey(t *testing.T) {
	cols := []string{"id", "code", "room", "body"}
	for _, c := range []struct {
		name       string
		ti         TableInfo
		configured []string
		unique     []string
		want       []string
		source     string
		warn       bool
		problems   []string
	}{
		{name: "primary key", ti: TableInfo{ReplicaIdentity: 'd', PrimaryKey: []string{"id"}, IdentityColumns: []string{"id"}},
			want: []string{"id"}, source: "primary key"},
		{name: "primary key under FULL", ti: TableInfo{ReplicaIdentity: 'f', PrimaryKey: []string{"id"}, IdentityColumns: cols},
			unique: []string{"code"}, want: []string{"id"}, source: "primary key"},
		{name: "primary key not in the identity index", ti: TableInfo{ReplicaIdentity: 'i', PrimaryKey: []string{"id"}, IdentityColumns: []string{"code"}},
			want: []string{"code"}, source: "replica identity index"},
		{name: "identity index without a primary key", ti: TableInfo{ReplicaIdentity: 'i', IdentityColumns: []string{"code", "room"}},
			unique: []string{"id"}, want: []string{"code", "room"}, source: "replica identity index"},
		{name: "unique index under FULL", ti: TableInfo{ReplicaIdentity: 'f', IdentityColumns: cols},
			unique: []string{"room", "code"}, want: []string{"room", "code"}, source: "unique index u"},
		{name: "whole row", ti: TableInfo{ReplicaIdentity: 'f', IdentityColumns: cols},
			want: cols, source: "whole row", warn: true},
		{name: "configured", ti: TableInfo{ReplicaIdentity: 'f', IdentityColumns: cols, PrimaryKey: []string{"id"}},
			configured: []string{"room"}, unique: []string{"code"}, want: []string{"room"}, source: "postgres.key_columns"},
		{name: "configured, not carried by deletes", ti: TableInfo{ReplicaIdentity: 'd', PrimaryKey: []string{"id"}, IdentityColumns: []string{"id"}},
			configured: []string{"room", "nope"}, want: []string{"room", "nope"}, source: "postgres.key_columns",
			problems: []string{`key column "room" (postgres.key_columns) is not in the replica identity`, `column "nope", which the table does not have`}},
	} {
		t.Run(c.name, func(t *testing.T) {
			ti := c.ti
			ti.Schema, ti.Table, ti.Columns = "public", "t", cols
			k, ps := ChooseKey(ti, c.configured, "u", c.unique)
			if !slices.Equal(k.Columns, c.want) || k.Source != c.source || (k.Warning != "") != c.warn {
				t.Errorf("ChooseKey = %+v, want %v from %q (warning: %v)", k, c.want, c.source, c.warn)
			}
			if len(ps) != len(c.problems) {
				t.Fatalf("problems %v, want %d", ps, len(c.problems))
			}
			for i, p := range ps {
				if !strings.Contains(p.String(), c.problems[i]) || p.Table != "public.t" {
					t.Errorf("problem %q does not say %q", p, c.problems[i])
				}
			}
		})
	}
}
