package integrity

import (
	"encoding/json"
	"fmt"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/tidemark/tidemark/invalidation/expr"
	"github.com/tidemark/tidemark/pipeline"
)

// Where is a row condition, written in YAML either as an expression string
// in the shared language of package invalidation/expr (e.g.
// "type = 'm.room.member' AND state_key IS NOT NULL") or, as before, as a
// mapping {column: value}, which means every column's text equals its value
// (the AND of equalities).
type Where struct {
	// Expr is the expression form.
	Expr string
	// Equal is the mapping form.
	Equal map[string]string
}

// WhereExpr is Where's expression form.
func WhereExpr(s string) Where { return Where{Expr: s} }

// WhereEqual is Where's mapping form.
func WhereEqual(m map[string]string) Where { return Where{Equal: m} }

// IsZero reports an absent condition (every row).
func (w Where) IsZero() bool { return strings.TrimSpace(w.Expr) == "" && len(w.Equal) == 0 }

// UnmarshalYAML accepts a string (expression) or a mapping (equalities).
func (w *Where) UnmarshalYAML(n *yaml.Node) error {
	switch n.Kind {
	case yaml.ScalarNode:
		*w = Where{Expr: n.Value}
		return nil
	case yaml.MappingNode:
		var m map[string]string
		if err := n.Decode(&m); err != nil {
			return err
		}
		*w = Where{Equal: m}
		return nil
	}
	return fmt.Errorf("line %d: where is an expression string or a mapping {column: value}", n.Line)
}

// MarshalYAML writes the form it was read in.
func (w Where) MarshalYAML() (any, error) {
	if len(w.Equal) > 0 {
		return w.Equal, nil
	}
	return w.Expr, nil
}

// String is the condition in the expression language ("" for none).
func (w Where) String() string {
	if len(w.Equal) == 0 {
		return strings.TrimSpace(w.Expr)
	}
	var parts []string
	for _, c := range sortedKeys(w.Equal) {
		parts = append(parts, `"`+strings.ReplaceAll(c, `"`, `""`)+`" = '`+strings.ReplaceAll(w.Equal[c], "'", "''")+`'`)
	}
	return strings.Join(parts, " AND ")
}

// parse returns the condition's expression (nil for none).
func (w Where) parse() (*expr.Expr, error) {
	if len(w.Expr) > 0 && len(w.Equal) > 0 {
		return nil, fmt.Errorf("set either an expression or a mapping, not both")
	}
	if w.IsZero() {
		return nil, nil
	}
	return expr.Parse(w.String())
}

// holds evaluates a condition on a change image: nil holds for every row.
// With lenient (a delete's key-only before image), a row holds when the
// columns it lacks could make the condition true; a NULL makes a
// comparison unknown, which does not hold.
func holds(e *expr.Expr, img map[string]json.RawMessage, lenient bool) bool {
	if e == nil {
		return true
	}
	o := e.Eval(func(col string) (string, bool, bool) {
		if _, present := img[col]; !present {
			return "", false, false
		}
		v, ok := pipeline.Text(img, col)
		return v, !ok, true
	})
	if lenient {
		return o.Possibly()
	}
	return o.Definitely()
}
