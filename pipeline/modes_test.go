package pipeline

import (
	"strings"
	"testing"
	"time"
)

// TestValueModes: each column keeps one JSON type for all its values in
// every mode, decided by its declared type, not by the value.
func TestValueModes(t *testing.T) {
	rel := &Relation{OID: 1, Schema: "public", Table: "t", Columns: []Column{
		{Name: "small", TypeOID: oidNumeric, TypeMod: (10<<16 | 2) + 4}, // numeric(10,2)
		{Name: "wide", TypeOID: oidNumeric, TypeMod: (30<<16 | 0) + 4},  // numeric(30)
		{Name: "free", TypeOID: oidNumeric, TypeMod: -1},                // numeric
		{Name: "big", TypeOID: oidInt8},
		{Name: "doc", TypeOID: oidJSONB},
		{Name: "at", TypeOID: oidTimestamptz},
		{Name: "wall", TypeOID: oidTimestamp},
		{Name: "tod", TypeOID: oidTime},
		{Name: "dur", TypeOID: oidInterval},
		{Name: "day", TypeOID: oidDate},
	}}
	at := time.Date(2024, 1, 2, 3, 4, 5, 600000000, time.UTC)
	rows := []Tuple{
		{{Value: Decimal("12.50")}, {Value: Decimal("1")}, {Value: Decimal("3.25")}, {Int: 7, IsInt: true}, {Value: JSON(`{"a":1}`)},
			{Value: at}, {Value: Timestamp{at}}, {Text: "03:04:05.6", IsText: true}, {Text: "1 day 00:00:01", IsText: true}, {Value: Date{at.Truncate(24 * time.Hour)}}},
		{{Value: Decimal("99999999.99")}, {Value: Decimal("123456789012345678901234567890")}, {Value: Decimal("1234567890.1234567")},
			{Int: 1 << 60, IsInt: true}, {Value: JSON(`[1]`)}, {Value: at}, {Value: Timestamp{at}}, {Text: "24:00:00", IsText: true},
			{Text: "-1 years -2 mons +3 days -04:05:06.5", IsText: true}, {Value: Date{time.Date(1969, 12, 31, 0, 0, 0, 0, time.UTC)}}},
	}
	cases := []struct {
		modes ValueModes
		want  [2]string
	}{
		{ValueModes{}, [2]string{
			`{"small":12.50,"wide":"1","free":"3.25","big":7,"doc":{"a":1},"at":"2024-01-02T03:04:05.6Z","wall":"2024-01-02T03:04:05.6","tod":"03:04:05.6","dur":"1 day 00:00:01","day":"2024-01-02"}`,
			`{"small":99999999.99,"wide":"123456789012345678901234567890","free":"1234567890.1234567","big":1152921504606846976,"doc":[1],"at":"2024-01-02T03:04:05.6Z","wall":"2024-01-02T03:04:05.6","tod":"24:00:00","dur":"-1 years -2 mons +3 days -04:05:06.5","day":"1969-12-31"}`}},
		{ValueModes{JSON: "string", Decimal: "string", Time: "micros", Bigint: "string"}, [2]string{
			`{"small":"12.50","wide":"1","free":"3.25","big":"7","doc":"{\"a\":1}","at":1704164645600000,"wall":1704164645600000,"tod":11045600000,"dur":86401000000,"day":19724}`,
			`{"small":"99999999.99","wide":"123456789012345678901234567890","free":"1234567890.1234567","big":"1152921504606846976","doc":"[1]","at":1704164645600000,"wall":1704164645600000,"tod":86400000000,"dur":-36572706500000,"day":-1}`}},
		{ValueModes{Decimal: "double"}, [2]string{
			`{"small":12.50,"wide":1,"free":3.25,`,
			`{"small":99999999.99,"wide":123456789012345678901234567890,"free":1234567890.1234567,`}},
	}
	for _, tc := range cases {
		l := newEnvelopeLayout(EnvelopeSource{Modes: tc.modes}, rel)
		for i, row := range rows {
			got := string(l.appendImage(nil, row))
			if !strings.HasPrefix(got, tc.want[i]) {
				t.Errorf("modes %+v, row %d:\n got %s\nwant %s", tc.modes, i, got, tc.want[i])
			}
		}
	}
	if err := (ValueModes{JSON: "x"}).Validate(); err == nil || !strings.Contains(err.Error(), `json_mode: "x" is not one of embed, string`) {
		t.Errorf("Validate: %v", err)
	}
}
