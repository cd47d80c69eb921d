package config

import (
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

const examplePath = "../../deploy/tidemark.example.yml"

// The example shipped in deploy/ must stay a valid config.
func TestDeployExampleLoads(t *testing.T) {
	data, err := os.ReadFile(examplePath)
	if err != nil {
		t.Fatal(err)
	}
	c, err := Parse("deploy/tidemark.example.yml", data, func(string) string { return "" })
	if err != nil {
		t.Fatalf("example config: %v", err)
	}
	if len(c.Postgres.Tables) != 6 || len(c.Pipeline.EntityStreams) != 1 || c.Kafka.ReplicationFactor != 3 {
		t.Errorf("example decoded unexpectedly: %+v", c)
	}
}

// TestDeployExampleListsEveryField: deploy/tidemark.example.yml sets every
// field of Config, found by reflection over the yaml tags: nested structs,
// pointers to them, inline structs, and the elements of lists of structs
// (a field counts when any element sets it). Scalars, lists of scalars and
// maps count once their key is present.
func TestDeployExampleListsEveryField(t *testing.T) {
	data, err := os.ReadFile(examplePath)
	if err != nil {
		t.Fatal(err)
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		t.Fatal(err)
	}
	if len(doc.Content) != 1 {
		t.Fatalf("the example holds %d YAML documents, want 1", len(doc.Content))
	}
	for _, path := range missingFields(reflect.TypeFor[Config](), []*yaml.Node{doc.Content[0]}, "") {
		t.Errorf("deploy/tidemark.example.yml does not list %s", path)
	}
}

// TestMissingFields checks the checker on a small struct.
func TestMissingFields(t *testing.T) {
	type leaf struct {
		A string `yaml:"a"`
		B int    `yaml:"b,omitempty"`
	}
	type inline struct {
		leaf `yaml:",inline"`
		C    bool `yaml:"c"`
	}
	type root struct {
		Leaf    leaf              `yaml:"leaf"`
		Ptr     *leaf             `yaml:"ptr"`
		List    []leaf            `yaml:"list"`
		Inline  inline            `yaml:"inline"`
		Map     map[string]string `yaml:"map"`
		Skipped string            `yaml:"-"`
		hidden  string
	}
	_ = root{}.hidden
	cases := []struct {
		name string
		yaml string
		want []string
	}{
		{"complete", `{leaf: {a: x, b: 1}, ptr: {a: x, b: 1}, list: [{a: x}, {b: 1}], inline: {a: x, b: 1, c: true}, map: {}}`, nil},
		{"empty", `{}`, []string{"inline", "leaf", "list", "map", "ptr"}},
		{"nested fields", `{leaf: {a: x}, ptr: null, list: [{a: x}], inline: {c: true}, map: {k: v}}`,
			[]string{"inline.a", "inline.b", "leaf.b", "list[].b", "ptr.a", "ptr.b"}},
		{"empty list of structs", `{leaf: {a: x, b: 1}, ptr: {a: x, b: 1}, list: [], inline: {a: x, b: 1, c: true}, map: {}}`,
			[]string{"list[]"}},
	}
	for _, tc := range cases {
		var doc yaml.Node
		if err := yaml.Unmarshal([]byte(tc.yaml), &doc); err != nil {
			t.Fatal(err)
		}
		got := missingFields(reflect.TypeFor[root](), []*yaml.Node{doc.Content[0]}, "")
		slices.Sort(got)
		if !slices.Equal(got, tc.want) {
			t.Errorf("%s: missing %v, want %v", tc.name, got, tc.want)
		}
	}
}

var unmarshalerType = reflect.TypeFor[yaml.Unmarshaler]()

// missingFields returns the paths of typ's yaml fields that none of nodes
// (the values decoded into typ) sets, below path.
func missingFields(typ reflect.Type, nodes []*yaml.Node, path string) []string {
	for typ.Kind() == reflect.Pointer {
		typ = typ.Elem()
	}
	if reflect.PointerTo(typ).Implements(unmarshalerType) {
		return nil // decodes itself: a scalar here
	}
	switch typ.Kind() {
	case reflect.Struct:
		return missingStructFields(typ, nodes, path)
	case reflect.Slice, reflect.Array:
		elem := typ.Elem()
		for elem.Kind() == reflect.Pointer {
			elem = elem.Elem()
		}
		if elem.Kind() != reflect.Struct {
			return nil
		}
		var items []*yaml.Node
		for _, n := range nodes {
			if n.Kind == yaml.SequenceNode {
				items = append(items, n.Content...)
			}
		}
		if len(items) == 0 {
			return []string{path + "[]"} // no element shows the fields
		}
		return missingFields(elem, items, path+"[]")
	case reflect.Map:
		var values []*yaml.Node
		for _, n := range nodes {
			if n.Kind == yaml.MappingNode {
				for i := 1; i < len(n.Content); i += 2 {
					values = append(values, resolve(n.Content[i]))
				}
			}
		}
		if len(values) == 0 {
			return nil // an empty map shows the key, which is enough
		}
		return missingFields(typ.Elem(), values, path+".*")
	}
	return nil
}

func missingStructFields(typ reflect.Type, nodes []*yaml.Node, path string) []string {
	var missing []string
	for i := range typ.NumField() {
		f := typ.Field(i)
		tag := f.Tag.Get("yaml")
		name, opts, _ := strings.Cut(tag, ",")
		if name == "-" {
			continue
		}
		if slices.Contains(strings.Split(opts, ","), "inline") {
			missing = append(missing, missingFields(f.Type, nodes, path)...)
			continue
		}
		if !f.IsExported() {
			continue
		}
		if name == "" {
			name = strings.ToLower(f.Name) // yaml.v3's default key
		}
		p := name
		if path != "" {
			p = path + "." + name
		}
		var values []*yaml.Node
		for _, n := range nodes {
			if v := lookup(n, name); v != nil {
				values = append(values, v)
			}
		}
		if len(values) == 0 {
			missing = append(missing, p)
			continue
		}
		missing = append(missing, missingFields(f.Type, values, p)...)
	}
	return missing
}

// lookup returns the value of key in mapping node n (nil if absent).
func lookup(n *yaml.Node, key string) *yaml.Node {
	n = resolve(n)
	if n.Kind != yaml.MappingNode {
		return nil
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value == key {
			return resolve(n.Content[i+1])
		}
	}
	return nil
}

func resolve(n *yaml.Node) *yaml.Node {
	for n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	return n
}
