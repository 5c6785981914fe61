package storage

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	bolt "go.etcd.io/bbolt"
)

const benchRecords = 100_000

// big is one database of benchRecords realistic records, built once and
// shared by the read benchmarks.
var big struct {
	once      sync.Once
	dir       string
	db        *DB
	keys      []string
	valueSize int
	err       error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if big.db != nil {
		big.db.Close()
	}
	if big.dir != "" {
		os.RemoveAll(big.dir)
	}
	os.Exit(code)
}

// benchKey looks like the keys containerd's metadata layer passes down.
func benchKey(i int) string {
	return fmt.Sprintf("default/%d/sha256:%064x", i, uint64(i)*0x9e3779b97f4a7c15)
}

// buildRecords writes n records shaped like image layer chains (depth up to
// 10, committed, one label each) with an active or view on every fifth.
func buildRecords(db *DB, n int) ([]string, error) {
	ctx := context.Background()
	keys := make([]string, 0, n)
	const batch = 5000
	parent := ""
	for start := 0; start < n; start += batch {
		err := db.Update(ctx, func(tx *Tx) error {
			for i := start; i < min(start+batch, n); i++ {
				key := benchKey(i)
				id, err := tx.AllocateID()
				if err != nil {
					return err
				}
				s := Snapshot{Key: key, Kind: active, Parent: parent, State: StateReady, DeviceID: id, Size: 10 << 30, FSType: "ext4"}
				if i%5 == 4 {
					s.Kind = kview
					if i%10 == 9 {
						s.Kind = active
					}
					s.Labels = map[string]string{"containerd.io/snapshot/cri.container": "yes"}
					if _, err := tx.CreateSnapshot(s); err != nil {
						return err
					}
					keys = append(keys, key)
					continue
				}
				s.Key = key + "-extract"
				if _, err := tx.CreateSnapshot(s); err != nil {
					return err
				}
				labels := map[string]string{"containerd.io/snapshot/cri.layer-digest": fmt.Sprintf("sha256:%064x", i)}
				if _, err := tx.commitFresh(s.Key, key, snapshots.Usage{Size: 1 << 20, Inodes: 100}, snapshots.WithLabels(labels)); err != nil {
					return err
				}
				keys = append(keys, key)
				parent = key
				if i%10 == 8 {
					parent = ""
				}
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	return keys, nil
}

func bigDB(b *testing.B) *DB {
	big.once.Do(func() {
		if big.dir, big.err = os.MkdirTemp("", "storage-bench-"); big.err != nil {
			return
		}
		if big.db, big.err = Open(context.Background(), filepath.Join(big.dir, "big.db"), WithNoSync()); big.err != nil {
			return
		}
		if big.keys, big.err = buildRecords(big.db, benchRecords); big.err != nil {
			return
		}
		big.err = big.db.View(context.Background(), func(tx *Tx) error {
			return tx.snapshots.ForEach(func(k, v []byte) error { big.valueSize += len(k) + len(v); return nil })
		})
	})
	if big.err != nil {
		b.Fatal(big.err)
	}
	return big.db
}

func syncModes(b *testing.B, fn func(b *testing.B, opts ...Opt)) {
	b.Run("fsync", func(b *testing.B) { fn(b) })
	b.Run("nosync", func(b *testing.B) { fn(b, WithNoSync()) })
}

func openBenchDB(b *testing.B, opts ...Opt) *DB {
	db, err := Open(context.Background(), filepath.Join(b.TempDir(), "db"), opts...)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { db.Close() })
	return db
}

func reportRate(b *testing.B, unit string) {
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), unit)
}

// BenchmarkCreate is the snapshotter's create (benchCreate).
func BenchmarkCreate(b *testing.B) {
	syncModes(b, func(b *testing.B, opts ...Opt) {
		db := openBenchDB(b, opts...)
		ctx := context.Background()
		b.ResetTimer()
		for i := range b.N {
			if err := benchCreate(ctx, db, benchKey(i)); err != nil {
				b.Fatal(err)
			}
		}
		reportRate(b, "records/s")
	})
}

// benchCreate is the snapshotter's create of key: one transaction to
// allocate, write the record and the journal intent, one to mark it ready.
func benchCreate(ctx context.Context, db *DB, key string) error {
	var seq uint64
	err := db.Update(ctx, func(tx *Tx) error {
		id, err := tx.AllocateID()
		if err != nil {
			return err
		}
		if _, err := tx.CreateSnapshot(Snapshot{Key: key, Kind: active, State: StateCreating, DeviceID: id, Size: 10 << 30, FSType: "ext4"}); err != nil {
			return err
		}
		seq, err = tx.AddJournal(Entry{Op: OpCreateThin, DeviceID: id, Key: key})
		return err
	})
	if err != nil {
		return err
	}
	return db.Update(ctx, func(tx *Tx) error {
		if _, err := tx.SetState(key, StateReady); err != nil {
			return err
		}
		return tx.FinishJournal(seq)
	})
}

// BenchmarkCreateParallel is BenchmarkCreate from 16 goroutines at once,
// as a burst of containers does, with and without group commit.
func BenchmarkCreateParallel(b *testing.B) {
	for _, grouped := range []bool{true, false} {
		name := "grouped"
		if !grouped {
			name = "alone"
		}
		b.Run(name, func(b *testing.B) {
			syncModes(b, func(b *testing.B, opts ...Opt) {
				db := openBenchDB(b, opts...)
				db.group.off = !grouped
				ctx := context.Background()
				var next atomic.Int64
				b.SetParallelism(16)
				b.ResetTimer()
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						if err := benchCreate(ctx, db, benchKey(int(next.Add(1)))); err != nil {
							b.Error(err)
							return
						}
					}
				})
				reportRate(b, "records/s")
			})
		})
	}
}

func prepareActives(b *testing.B, db *DB, n int) {
	err := db.Update(context.Background(), func(tx *Tx) error {
		for i := range n {
			id, err := tx.AllocateID()
			if err != nil {
				return err
			}
			if _, err := tx.CreateSnapshot(Snapshot{Key: benchKey(i), Kind: active, State: StateReady, DeviceID: id}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
}

// BenchmarkCommit is one commit transaction.
func BenchmarkCommit(b *testing.B) {
	syncModes(b, func(b *testing.B, opts ...Opt) {
		db := openBenchDB(b, opts...)
		prepareActives(b, db, b.N)
		labels := snapshots.WithLabels(map[string]string{"containerd.io/snapshot/x": "y"})
		b.ResetTimer()
		for i := range b.N {
			err := db.Update(context.Background(), func(tx *Tx) error {
				_, err := tx.commitFresh(benchKey(i), benchKey(i)+"-c", snapshots.Usage{Size: 1}, labels)
				return err
			})
			if err != nil {
				b.Fatal(err)
			}
		}
		reportRate(b, "records/s")
	})
}

// BenchmarkRemove is the snapshotter's remove: drop the record and journal
// the delete, then release the id once the pool is done.
func BenchmarkRemove(b *testing.B) {
	syncModes(b, func(b *testing.B, opts ...Opt) {
		db := openBenchDB(b, opts...)
		prepareActives(b, db, b.N)
		ctx := context.Background()
		b.ResetTimer()
		for i := range b.N {
			var id uint32
			var seq uint64
			err := db.Update(ctx, func(tx *Tx) error {
				s, err := tx.RemoveSnapshot(benchKey(i))
				if err != nil {
					return err
				}
				id = s.DeviceID
				seq, err = tx.AddJournal(Entry{Op: OpDelete, DeviceID: id, Key: s.Key})
				return err
			})
			if err == nil {
				err = db.Update(ctx, func(tx *Tx) error {
					if err := tx.ReleaseID(id); err != nil {
						return err
					}
					return tx.FinishJournal(seq)
				})
			}
			if err != nil {
				b.Fatal(err)
			}
		}
		reportRate(b, "records/s")
	})
}

func BenchmarkStat100k(b *testing.B) {
	db := bigDB(b)
	rng := rand.New(rand.NewPCG(1, 2))
	b.ResetTimer()
	for range b.N {
		key := big.keys[rng.IntN(len(big.keys))]
		err := db.View(context.Background(), func(tx *Tx) error {
			_, err := tx.Stat(key)
			return err
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	reportRate(b, "stats/s")
}

func BenchmarkWalk100k(b *testing.B) {
	db := bigDB(b)
	for _, tc := range []struct {
		name    string
		filters []string
		want    int
	}{
		{"all", nil, benchRecords},
		{"kind", []string{"kind==active"}, benchRecords / 10},
		{"label", []string{`labels."containerd.io/snapshot/cri.container"==yes`}, benchRecords / 5},
	} {
		b.Run(tc.name, func(b *testing.B) {
			for range b.N {
				n := 0
				err := db.View(context.Background(), func(tx *Tx) error {
					return tx.Walk(func(snapshots.Info) error { n++; return nil }, tc.filters...)
				})
				if err != nil {
					b.Fatal(err)
				}
				if n != tc.want {
					b.Fatalf("walked %d, want %d", n, tc.want)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/benchRecords, "ns/snapshot")
		})
	}
}

// BenchmarkAllocateID100k allocates and releases in a database with 100k
// ids in use, showing allocation does not scan.
func BenchmarkAllocateID100k(b *testing.B) {
	db := bigDB(b)
	b.ResetTimer()
	for range b.N {
		err := db.Update(context.Background(), func(tx *Tx) error {
			id, err := tx.AllocateID()
			if err != nil {
				return err
			}
			return tx.ReleaseID(id)
		})
		if err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkBytesPerSnapshot reports the database file size per record for
// the 100k database as written and after bbolt compaction, and the bytes of
// key plus encoded record alone.
func BenchmarkBytesPerSnapshot(b *testing.B) {
	db := bigDB(b)
	size, err := db.Size()
	if err != nil {
		b.Fatal(err)
	}
	compacted := filepath.Join(b.TempDir(), "compact.db")
	dst, err := bolt.Open(compacted, 0o600, &bolt.Options{NoSync: true})
	if err != nil {
		b.Fatal(err)
	}
	if err := bolt.Compact(dst, db.db, 1<<20); err != nil {
		b.Fatal(err)
	}
	dst.Close()
	fi, err := os.Stat(compacted)
	if err != nil {
		b.Fatal(err)
	}
	for range b.N {
		// Nothing to time: this benchmark only reports sizes.
	}
	b.ReportMetric(float64(size)/benchRecords, "file-bytes/snapshot")
	b.ReportMetric(float64(fi.Size())/benchRecords, "compact-bytes/snapshot")
	b.ReportMetric(float64(big.valueSize)/benchRecords, "record-bytes/snapshot")
}
