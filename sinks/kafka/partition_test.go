package kafka_test

import (
	"fmt"
	"math/rand/v2"
	"testing"

	kafkasink "github.com/tidemark/tidemark/sinks/kafka"
)

// javaMurmur2 is a line-by-line transcription of Kafka's
// org.apache.kafka.common.utils.Utils.murmur2, with Java's int arithmetic
// (int32, wrapping) and >>> (unsigned shift), written independently of the
// code under test.
func javaMurmur2(data []byte) int32 {
	length := int32(len(data))
	const seed = int32(-1756908916) // 0x9747b28c as a Java int
	const m = int32(0x5bd1e995)
	const r = 24
	ushr := func(x int32, n uint) int32 { return int32(uint32(x) >> n) }

	h := seed ^ length
	length4 := length / 4
	for i := int32(0); i < length4; i++ {
		i4 := i * 4
		k := int32(data[i4+0]) + int32(data[i4+1])<<8 + int32(data[i4+2])<<16 + int32(uint32(data[i4+3])<<24)
		k *= m
		k ^= ushr(k, r)
		k *= m
		h *= m
		h ^= k
	}
	tail := length &^ 3
	switch length % 4 {
	case 3:
		h ^= int32(data[tail+2]) << 16
		fallthrough
	case 2:
		h ^= int32(data[tail+1]) << 8
		fallthrough
	case 1:
		h ^= int32(data[tail])
		h *= m
	}
	h ^= ushr(h, 13)
	h *= m
	h ^= ushr(h, 15)
	return h
}

// javaPartition is Kafka's BuiltInPartitioner.partitionForKey:
// toPositive(murmur2(key)) % numPartitions, toPositive(n) = n & 0x7fffffff.
func javaPartition(key []byte, n int) int {
	return int(javaMurmur2(key)&0x7fffffff) % n
}

// kafkaVectors are the hashes in Kafka's UtilsTest.testMurmur2 (and the
// empty key, whose hash is seed^0 mixed).
var kafkaVectors = []struct {
	key  string
	hash int32
}{
	{"21", -973932308},
	{"foobar", -790332482},
	{"a-little-bit-long-string", -985981536},
	{"a-little-bit-longer-string", -1486304829},
	{"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971},
	{"abc", 479470107},
	{"", 275646681},
}

func TestReferenceMurmur2MatchesKafka(t *testing.T) {
	for _, v := range kafkaVectors {
		if got := javaMurmur2([]byte(v.key)); got != v.hash {
			t.Errorf("javaMurmur2(%q) = %d, want %d (Kafka UtilsTest)", v.key, got, v.hash)
		}
	}
}

func TestPartitionForKnownVectors(t *testing.T) {
	cases := []struct {
		key  string
		n    int
		want int
	}{
		// toPositive(-790332482) = 1357151166; % 50 = 16.
		{"foobar", 50, 16},
		// toPositive(479470107) = 479470107; % 6 = 3, % 12 = 3, % 7 = 4.
		{"abc", 6, 3},
		{"abc", 12, 3},
		{"abc", 7, 4},
		// toPositive(-973932308) = 1173551340; % 3 = 0, % 10 = 0, % 16 = 12.
		{"21", 3, 0},
		{"21", 10, 0},
		{"21", 16, 12},
		{"anything", 1, 0},
	}
	for _, tc := range cases {
		if got := kafkasink.PartitionFor([]byte(tc.key), tc.n); got != tc.want {
			t.Errorf("PartitionFor(%q, %d) = %d, want %d", tc.key, tc.n, got, tc.want)
		}
	}
	// Every Kafka vector, over a spread of partition counts, derived from
	// the published hash alone.
	for _, v := range kafkaVectors {
		for _, n := range []int{1, 2, 3, 5, 6, 7, 12, 16, 50, 100, 1000, 10000} {
			want := int(uint32(v.hash)&0x7fffffff) % n
			if got := kafkasink.PartitionFor([]byte(v.key), n); got != want {
				t.Errorf("PartitionFor(%q, %d) = %d, want %d", v.key, n, got, want)
			}
		}
	}
}

// TestPartitionForMatchesJava compares with the reference on random keys:
// every length 0..67 (all tail cases), all byte values (sign handling), and
// many partition counts.
func TestPartitionForMatchesJava(t *testing.T) {
	rng := rand.New(rand.NewPCG(0x7469, 0x64656d61726b))
	counts := []int{1, 2, 3, 4, 6, 7, 8, 12, 31, 64, 100, 127, 1000, 4096, 10000}
	mismatches := 0
	for i := 0; i < 20000; i++ {
		key := make([]byte, i%68)
		for j := range key {
			key[j] = byte(rng.UintN(256))
		}
		n := counts[i%len(counts)]
		if i%3 == 0 {
			n = 1 + rng.IntN(5000)
		}
		got, want := kafkasink.PartitionFor(key, n), javaPartition(key, n)
		if got != want {
			mismatches++
			if mismatches <= 10 {
				t.Errorf("PartitionFor(%x, %d) = %d, Java partitioner gives %d", key, n, got, want)
			}
		}
	}
	if mismatches > 10 {
		t.Errorf("%d mismatches in total", mismatches)
	}
}

// TestPartitionForTypicalKeys covers the keys Tidemark actually produces:
// JSON objects of replica-identity or entity-stream columns.
func TestPartitionForTypicalKeys(t *testing.T) {
	for i := 0; i < 500; i++ {
		key := []byte(fmt.Sprintf(`{"room_id":"!r%d:example.org"}`, i))
		for _, n := range []int{3, 6, 12} {
			if got, want := kafkasink.PartitionFor(key, n), javaPartition(key, n); got != want {
				t.Fatalf("PartitionFor(%s, %d) = %d, want %d", key, n, got, want)
			}
			if got := kafkasink.PartitionFor(key, n); got < 0 || got >= n {
				t.Fatalf("PartitionFor(%s, %d) = %d out of range", key, n, got)
			}
		}
	}
}

// TestPartitionForNilKey: the sink hashes a nil key like the empty key, so
// the result is deterministic.
func TestPartitionForNilKey(t *testing.T) {
	for _, n := range []int{1, 3, 6, 12} {
		if got, want := kafkasink.PartitionFor(nil, n), javaPartition([]byte{}, n); got != want {
			t.Errorf("PartitionFor(nil, %d) = %d, want %d (empty key)", n, got, want)
		}
	}
}
