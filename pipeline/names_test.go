package pipeline

import "testing"

func TestQualifyTable(t *testing.T) {
	for in, want := range map[string]string{"events": "public.events", "chat.events": "chat.events", "Odd Name": "Odd Name", "": ""} {
		if got := QualifyTable(in); got != want {
			t.Errorf("QualifyTable(%q) = %q, want %q", in, got, want)
		}
	}
	if !IsQualifiedTable("a.b") || IsQualifiedTable("a") || IsIdentifier("a.b") || !IsIdentifier("a_1$") {
		t.Error("identifier checks")
	}
}
