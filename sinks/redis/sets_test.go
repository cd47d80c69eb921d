package redis

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/tidemark/tidemark/internal/redistest"
)

// assertSet fails t unless key holds exactly want (in any order) and its
// version key holds version ("" for none).
func assertSet(t *testing.T, c *goredis.Client, key string, want []string, version string) {
	t.Helper()
	ctx := context.Background()
	got, err := c.SMembers(ctx, key).Result()
	if err != nil {
		t.Fatalf("SMEMBERS %s: %v", key, err)
	}
	if !slices.Equal(sortedCopy(got), sortedCopy(want)) {
		if len(got) > 20 || len(want) > 20 {
			t.Errorf("%s has %d members, want %d", key, len(got), len(want))
		} else {
			t.Errorf("%s = %v, want %v", key, sortedCopy(got), sortedCopy(want))
		}
	}
	v, err := c.Get(ctx, key+VersionSuffix).Result()
	if errors.Is(err, goredis.Nil) {
		v, err = "", nil
	}
	if err != nil || v != version {
		t.Errorf("%s%s = %q, %v; want %q", key, VersionSuffix, v, err, version)
	}
}

func applySets(t *testing.T, s *Sink, ups ...SetUpdate) []SetResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := s.ApplySets(ctx, ups)
	if err != nil {
		t.Fatalf("ApplySets: %v", err)
	}
	if len(res) != len(ups) {
		t.Fatalf("ApplySets returned %d results for %d updates", len(res), len(ups))
	}
	return res
}

func wantResults(t *testing.T, got []SetResult, want ...SetResult) {
	t.Helper()
	if !slices.Equal(got, want) {
		t.Errorf("results %v, want %v", got, want)
	}
}

// Deltas apply in sequence; a replayed older version is skipped and
// changes nothing; a delta after a missing version is a gap and writes
// nothing, also when there is no version key yet.
func TestApplySetsDeltas(t *testing.T) {
	t.Parallel()
	srv := redistest.ForTest(t)
	c := srv.Client()
	s := newSink(t, srv, Config{})

	wantResults(t, applySets(t, s, SetUpdate{Key: "room:a", Version: 1, Add: []string{"u1", "u2"}}), SetApplied)
	wantResults(t, applySets(t, s, SetUpdate{Key: "room:a", Version: 2, Add: []string{"u3"}, Remove: []string{"u1"}}), SetApplied)
	wantResults(t, applySets(t, s, SetUpdate{Key: "room:a", Version: 3, Remove: []string{"u2", "absent"}}), SetApplied)
	assertSet(t, c, "room:a", []string{"u3"}, "3")

	// A replay (after a crash) of versions 2 and 3.
	wantResults(t, applySets(t, s,
		SetUpdate{Key: "room:a", Version: 2, Add: []string{"u9"}, Remove: []string{"u3"}},
		SetUpdate{Key: "room:a", Version: 3, Add: []string{"u8"}}), SetSkipped, SetSkipped)
	assertSet(t, c, "room:a", []string{"u3"}, "3")

	// Version 4 is missing.
	wantResults(t, applySets(t, s, SetUpdate{Key: "room:a", Version: 5, Add: []string{"u5"}, Remove: []string{"u3"}}), SetGap)
	assertSet(t, c, "room:a", []string{"u3"}, "3")

	// No version key: only version 1 applies as a delta.
	wantResults(t, applySets(t, s, SetUpdate{Key: "room:b", Version: 2, Add: []string{"u1"}}), SetGap)
	if n := c.Exists(context.Background(), "room:b", "room:b"+VersionSuffix).Val(); n != 0 {
		t.Errorf("a gap wrote %d keys", n)
	}

	// Removing the last member deletes the set; its version stays.
	wantResults(t, applySets(t, s, SetUpdate{Key: "room:a", Version: 4, Remove: []string{"u3"}}), SetApplied)
	assertSet(t, c, "room:a", nil, "4")
	wantResults(t, applySets(t, s, SetUpdate{Key: "room:a", Version: 5, Add: []string{"u5"}}), SetApplied)
	assertSet(t, c, "room:a", []string{"u5"}, "5")

	if _, err := s.ApplySets(context.Background(), []SetUpdate{{Key: "room:a", Version: 0}}); err == nil {
		t.Error("ApplySets accepted version 0")
	}
}

// A Full update replaces the content over a lower (or no) version and is
// skipped over a higher or equal one; one with no members deletes the set
// and stores the version; one with more members than Lua's unpack takes
// applies whole.
func TestApplySetsFull(t *testing.T) {
	t.Parallel()
	srv := redistest.ForTest(t)
	c := srv.Client()
	s := newSink(t, srv, Config{})

	wantResults(t, applySets(t, s, SetUpdate{Key: "room:a", Version: 1, Add: []string{"u1", "u2"}}), SetApplied)
	wantResults(t, applySets(t, s, SetUpdate{Key: "room:a", Version: 7, Full: true, Add: []string{"u2", "u3"}, Remove: []string{"u3"}}), SetApplied)
	assertSet(t, c, "room:a", []string{"u2", "u3"}, "7")

	for _, v := range []uint64{6, 7} {
		wantResults(t, applySets(t, s, SetUpdate{Key: "room:a", Version: v, Full: true, Add: []string{"x"}}), SetSkipped)
		assertSet(t, c, "room:a", []string{"u2", "u3"}, "7")
	}
	// A delta may follow.
	wantResults(t, applySets(t, s, SetUpdate{Key: "room:a", Version: 8, Add: []string{"u4"}}), SetApplied)
	assertSet(t, c, "room:a", []string{"u2", "u3", "u4"}, "8")

	wantResults(t, applySets(t, s, SetUpdate{Key: "room:a", Version: 9, Full: true}), SetApplied)
	assertSet(t, c, "room:a", nil, "9")

	big := keyRange("user", 20000)
	wantResults(t, applySets(t, s, SetUpdate{Key: "room:big", Version: 3, Full: true, Add: big}), SetApplied)
	assertSet(t, c, "room:big", big, "3")
	wantResults(t, applySets(t, s, SetUpdate{Key: "room:big", Version: 4, Remove: big[:12000], Add: []string{"new"}}), SetApplied)
	assertSet(t, c, "room:big", append([]string{"new"}, big[12000:]...), "4")

	// Versions beyond Lua's exact numbers compare exactly.
	const huge = uint64(1<<63 + 1)
	wantResults(t, applySets(t, s, SetUpdate{Key: "room:h", Version: huge, Full: true, Add: []string{"a"}}), SetApplied)
	wantResults(t, applySets(t, s, SetUpdate{Key: "room:h", Version: huge - 1, Full: true, Add: []string{"b"}}), SetSkipped)
	wantResults(t, applySets(t, s, SetUpdate{Key: "room:h", Version: huge + 1, Add: []string{"c"}}), SetApplied)
	assertSet(t, c, "room:h", []string{"a", "c"}, fmt.Sprint(huge+1))
}

// Several versions of one key in one call, across batches, apply in order,
// after a SCRIPT FLUSH too (EVAL instead of EVALSHA).
func TestApplySetsInOrder(t *testing.T) {
	t.Parallel()
	srv := redistest.ForTest(t)
	c := srv.Client()
	s := newSink(t, srv, Config{BatchSize: 2})
	for round := range 2 {
		if err := c.ScriptFlush(context.Background()).Err(); err != nil {
			t.Fatal(err)
		}
		a, b := fmt.Sprintf("room:a%d", round), fmt.Sprintf("room:b%d", round)
		res := applySets(t, s,
			SetUpdate{Key: a, Version: 1, Add: []string{"u1"}},
			SetUpdate{Key: a, Version: 2, Add: []string{"u2"}},
			SetUpdate{Key: b, Version: 1, Full: true, Add: []string{"v1"}},
			SetUpdate{Key: a, Version: 3, Remove: []string{"u1"}},
			SetUpdate{Key: a, Version: 2, Add: []string{"again"}},
			SetUpdate{Key: a, Version: 4, Add: []string{"u4"}},
			SetUpdate{Key: b, Version: 3, Add: []string{"v3"}},
		)
		wantResults(t, res, SetApplied, SetApplied, SetApplied, SetApplied, SetSkipped, SetApplied, SetGap)
		assertSet(t, c, a, []string{"u2", "u4"}, "4")
		assertSet(t, c, b, []string{"v1"}, "1")
	}
}

// An update the server refuses fails ApplySets with an error naming the
// batch and the key.
func TestApplySetsError(t *testing.T) {
	t.Parallel()
	srv := redistest.ForTest(t)
	c := srv.Client()
	s := newSink(t, srv, Config{BatchSize: 2})
	if err := c.Set(context.Background(), "room:str", "not a set", 0).Err(); err != nil {
		t.Fatal(err)
	}
	_, err := s.ApplySets(context.Background(), []SetUpdate{
		{Key: "room:a", Version: 1, Add: []string{"u1"}},
		{Key: "room:a", Version: 2, Add: []string{"u2"}},
		{Key: "room:str", Version: 1, Add: []string{"u1"}},
	})
	if err == nil || !strings.Contains(err.Error(), "updates 3-3 of 3; earlier batches applied") || !strings.Contains(err.Error(), `"room:str"`) || !strings.Contains(err.Error(), "WRONGTYPE") {
		t.Fatalf("ApplySets = %v; want an error naming the batch, the key and WRONGTYPE", err)
	}
	assertSet(t, c, "room:a", []string{"u1", "u2"}, "2")
}

// chunks yields members in chunks of size; after each chunk it calls
// after(i) (i counts from 0), whose error it returns as next's.
func chunks(members []string, size int, after func(i int) error) func() ([]string, error) {
	i := 0
	return func() ([]string, error) {
		if i > 0 && after != nil {
			if err := after(i - 1); err != nil {
				return nil, err
			}
		}
		if i*size >= len(members) {
			return nil, nil
		}
		chunk := members[i*size : min((i+1)*size, len(members))]
		i++
		return chunk, nil
	}
}

// ReplaceSetVersioned replaces a set of 25,000 members, written in chunks
// of 1,000, atomically: a reader counting the members between every two
// chunks sees only the old or the new size. The version is stored and the
// temporary key is gone.
func TestReplaceSetVersionedAtomic(t *testing.T) {
	t.Parallel()
	srv := redistest.ForTest(t)
	c := srv.Client()
	s := newSink(t, srv, Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	old := keyRange("old", 10)
	wantResults(t, applySets(t, s, SetUpdate{Key: "room:a", Version: 3, Full: true, Add: old}), SetApplied)

	var (
		reads   atomic.Int64
		stop    = make(chan struct{})
		wg      sync.WaitGroup
		mu      sync.Mutex
		sizes   = map[int64]int{}
		readErr error
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		reader := srv.Client()
		for {
			select {
			case <-stop:
				return
			default:
			}
			n, err := reader.SCard(ctx, "room:a").Result()
			mu.Lock()
			if err != nil && readErr == nil {
				readErr = err
			}
			sizes[n]++
			mu.Unlock()
			reads.Add(1)
		}
	}()
	// Between two chunks, wait until the reader has counted again.
	waitRead := func(int) error {
		seen := reads.Load()
		for reads.Load() < seen+2 {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			time.Sleep(100 * time.Microsecond)
		}
		return nil
	}
	members := keyRange("user", 25000)
	ok, err := s.ReplaceSetVersioned(ctx, "room:a", 4, chunks(members, 1000, waitRead))
	_ = waitRead(0)
	close(stop)
	wg.Wait()
	if err != nil || !ok {
		t.Fatalf("ReplaceSetVersioned = %v, %v; want true", ok, err)
	}
	if readErr != nil {
		t.Fatalf("SCARD: %v", readErr)
	}
	for n, times := range sizes {
		if n != int64(len(old)) && n != int64(len(members)) {
			t.Errorf("a reader saw %d members (%d times); want only %d or %d", n, times, len(old), len(members))
		}
	}
	if sizes[int64(len(members))] == 0 {
		t.Errorf("the reader never saw the new set: %v", sizes)
	}
	assertSet(t, c, "room:a", members, "4")
	if n := c.Exists(ctx, "room:a"+BuildingSuffix).Val(); n != 0 {
		t.Error("the temporary key is left")
	}
	// Deltas follow the replacement.
	wantResults(t, applySets(t, s, SetUpdate{Key: "room:a", Version: 5, Add: []string{"late"}}), SetApplied)
	if n := c.SCard(ctx, "room:a").Val(); n != 25001 {
		t.Errorf("SCARD after a delta = %d", n)
	}

	// An empty replacement deletes the set and keeps the version.
	ok, err = s.ReplaceSetVersioned(ctx, "room:a", 6, chunks(nil, 1, nil))
	if err != nil || !ok {
		t.Fatalf("empty ReplaceSetVersioned = %v, %v; want true", ok, err)
	}
	assertSet(t, c, "room:a", nil, "6")
}

// ReplaceSetVersioned changes nothing when the stored version is at least
// its own: at the start (next is not called), or when it became so while
// the members were written.
func TestReplaceSetVersionedSkipped(t *testing.T) {
	t.Parallel()
	srv := redistest.ForTest(t)
	c := srv.Client()
	s := newSink(t, srv, Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	wantResults(t, applySets(t, s, SetUpdate{Key: "room:a", Version: 5, Full: true, Add: []string{"u1", "u2"}}), SetApplied)

	for _, v := range []uint64{4, 5} {
		called := false
		ok, err := s.ReplaceSetVersioned(ctx, "room:a", v, func() ([]string, error) { called = true; return nil, nil })
		if err != nil || ok {
			t.Fatalf("ReplaceSetVersioned at %d over 5 = %v, %v; want false", v, ok, err)
		}
		if called {
			t.Errorf("ReplaceSetVersioned at %d over 5 read the members", v)
		}
		assertSet(t, c, "room:a", []string{"u1", "u2"}, "5")
	}

	// A newer update lands while version 6 is being built.
	ok, err := s.ReplaceSetVersioned(ctx, "room:a", 6, chunks(keyRange("user", 30), 10, func(i int) error {
		if i == 0 {
			if _, err := s.ApplySets(ctx, []SetUpdate{{Key: "room:a", Version: 7, Full: true, Add: []string{"u7"}}}); err != nil {
				return err
			}
		}
		return nil
	}))
	if err != nil || ok {
		t.Fatalf("ReplaceSetVersioned overtaken by version 7 = %v, %v; want false", ok, err)
	}
	assertSet(t, c, "room:a", []string{"u7"}, "7")
	if n := c.Exists(ctx, "room:a"+BuildingSuffix).Val(); n != 0 {
		t.Error("the temporary key is left")
	}
}

// When next fails midway, ReplaceSetVersioned returns its error and leaves
// the old content and version, and no temporary key; a stale temporary key
// (from a crash) does not leak into the next replacement.
func TestReplaceSetVersionedFails(t *testing.T) {
	t.Parallel()
	srv := redistest.ForTest(t)
	c := srv.Client()
	s := newSink(t, srv, Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	wantResults(t, applySets(t, s, SetUpdate{Key: "room:a", Version: 2, Full: true, Add: []string{"u1", "u2"}}), SetApplied)

	boom := errors.New("database went away")
	ok, err := s.ReplaceSetVersioned(ctx, "room:a", 3, chunks(keyRange("user", 5000), 1000, func(i int) error {
		if i == 2 {
			return boom
		}
		return nil
	}))
	if !errors.Is(err, boom) || ok {
		t.Fatalf("ReplaceSetVersioned = %v, %v; want false and the error of next", ok, err)
	}
	t.Logf("error: %v", err)
	assertSet(t, c, "room:a", []string{"u1", "u2"}, "2")
	if n := c.Exists(ctx, "room:a"+BuildingSuffix).Val(); n != 0 {
		t.Error("the temporary key is left")
	}

	if err := c.SAdd(ctx, "room:a"+BuildingSuffix, "stale").Err(); err != nil {
		t.Fatal(err)
	}
	ok, err = s.ReplaceSetVersioned(ctx, "room:a", 3, chunks([]string{"u3"}, 10, nil))
	if err != nil || !ok {
		t.Fatalf("ReplaceSetVersioned = %v, %v; want true", ok, err)
	}
	assertSet(t, c, "room:a", []string{"u3"}, "3")
}

// A user with exactly ACLRules(UseVersionedSets) (and a key pattern) can
// run ApplySets and ReplaceSetVersioned, after a SCRIPT FLUSH too; given
// MULTI, Check passes for it and fails for a user without SREM, naming it.
func TestVersionedSetsACL(t *testing.T) {
	t.Parallel()
	probe, err := New(Config{Addr: "h:1"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	rules := strings.Fields(probe.ACLRules(UseVersionedSets))
	var nosrem []string
	for _, r := range rules {
		if r != "+srem" {
			nosrem = append(nosrem, r)
		}
	}
	srv := redistest.ForTest(t,
		redistest.WithUser("sets", userPassword, append([]string{"~room:*"}, rules...)...),
		redistest.WithUser("checked", userPassword, append(append([]string{"~*"}, rules...), "+multi")...),
		redistest.WithUser("nosrem", userPassword, append(append([]string{"~*"}, nosrem...), "+multi")...))
	c := srv.Client()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	s := newSink(t, srv, Config{Username: "sets", Password: userPassword})
	if err := s.Check(ctx, UseVersionedSets); err != nil {
		t.Fatalf("Check: %v", err)
	}
	for round := range 2 {
		if err := c.ScriptFlush(ctx).Err(); err != nil {
			t.Fatal(err)
		}
		key := fmt.Sprintf("room:%d", round)
		res, err := s.ApplySets(ctx, []SetUpdate{
			{Key: key, Version: 1, Full: true, Add: []string{"u1", "u2"}},
			{Key: key, Version: 2, Add: []string{"u3"}, Remove: []string{"u1"}},
		})
		if err != nil {
			t.Fatalf("ApplySets: %v", err)
		}
		wantResults(t, res, SetApplied, SetApplied)
		if err := c.ScriptFlush(ctx).Err(); err != nil {
			t.Fatal(err)
		}
		ok, err := s.ReplaceSetVersioned(ctx, key, 3, chunks(keyRange("user", 25), 10, nil))
		if err != nil || !ok {
			t.Fatalf("ReplaceSetVersioned = %v, %v", ok, err)
		}
		assertSet(t, c, key, keyRange("user", 25), "3")
		ok, err = s.ReplaceSetVersioned(ctx, key, 4, chunks(nil, 10, nil))
		if err != nil || !ok {
			t.Fatalf("empty ReplaceSetVersioned = %v, %v", ok, err)
		}
		assertSet(t, c, key, nil, "4")
	}

	if err := newSink(t, srv, Config{Username: "checked", Password: userPassword}).Check(ctx, UseVersionedSets); err != nil {
		t.Fatalf("Check with MULTI: %v", err)
	}
	err = newSink(t, srv, Config{Username: "nosrem", Password: userPassword}).Check(ctx, UseVersionedSets)
	if err == nil || !IsPermanent(err) || !strings.Contains(err.Error(), "may not run SREM") || !strings.Contains(err.Error(), "+srem") {
		t.Fatalf("Check without SREM = %v; want a permanent error naming SREM and the rule", err)
	}
}
