package snapshotter

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/thin-snapshotter/thin-snapshotter/internal/dmtest"
	"github.com/thin-snapshotter/thin-snapshotter/storage"
)

// TestIntegrationCommitCutAfterRecord: on the real kernel, a commit whose
// record is written but whose device the pool never made (the process
// stopped while commitAtOnce waited for the pool) is finished by the next
// start from the warm device, which holds the committed content.
func TestIntegrationCommitCutAfterRecord(t *testing.T) {
	dmtest.Require(t)
	ctx := context.Background()
	root := t.TempDir()
	cfg := testConfig(root)
	s, err := New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := destroy(root); err != nil {
			t.Error(err)
		}
	})
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	mnt := t.TempDir()
	withMounted(ctx, t, s, "a", mnt, func() {
		if err := os.WriteFile(filepath.Join(mnt, "f"), []byte("committed"), 0o644); err != nil {
			t.Fatal(err)
		}
	})
	if err := s.Commit(ctx, "c", "a"); err != nil {
		t.Fatal(err)
	}
	var c storage.Snapshot
	if err := s.db.View(ctx, func(tx *storage.Tx) (err error) {
		c, err = tx.GetSnapshot("c")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	// The state a stop between the record and the pool's answer leaves:
	// the record, the warm device, and no device on the record's id.
	if err := s.deleteThin(c.DeviceID); err != nil {
		t.Fatal(err)
	}
	s.stopBackground()
	for _, v := range slices.Backward(s.closers) {
		if err := v(); err != nil {
			t.Fatal(err)
		}
	}

	s2, err := New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s2.Close() })
	st, err := s2.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.LastRecovery.FinishedCommits != 1 {
		t.Errorf("recovery %+v, want one finished commit", st.LastRecovery)
	}
	if _, err := s2.View(ctx, "v", "c"); err != nil {
		t.Fatal(err)
	}
	withMounted(ctx, t, s2, "v", mnt, func() {
		if b, err := os.ReadFile(filepath.Join(mnt, "f")); err != nil || string(b) != "committed" {
			t.Errorf("file in the finished commit: %q, %v", b, err)
		}
	})
	if err := s2.Remove(ctx, "v"); err != nil {
		t.Fatal(err)
	}
	if r, err := s2.CheckOnline(ctx); err != nil || !r.Clean {
		t.Errorf("check after the finished commit: %+v, %v", r, err)
	}
}
