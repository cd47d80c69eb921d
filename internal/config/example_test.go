package config

import (
	"os"
	"testing"
)

// The example shipped in deploy/ must stay a valid config.
func TestDeployExampleLoads(t *testing.T) {
	data, err := os.ReadFile("../../deploy/tidemark.example.yml")
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
