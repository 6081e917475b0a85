//! Group commit for FUA writes: one `fdatasync` covers every write that completed before it
//! started, so writers that all need durability (write-through mode: tapdisk never flushes,
//! so every write is FUA) share syncs instead of queueing one each behind the disk.

use std::sync::{Condvar, Mutex, PoisonError};

#[derive(Default)]
struct State {
    /// Requests so far; a request's number is taken after its write completed.
    requested: u64,
    /// Every request up to this one is covered by a finished sync.
    done: u64,
    /// A sync is running.
    running: bool,
}

/// Shares syncs between concurrent writers.
#[derive(Default)]
pub(super) struct GroupSync {
    state: Mutex<State>,
    finished: Condvar,
}

impl GroupSync {
    /// Returns once a sync that started after this call has finished: either this thread runs
    /// `sync` (for itself and every request made before it starts), or it waits for the one
    /// that covers it. Call it after the write to cover has completed.
    pub(super) fn sync(&self, sync: impl FnOnce()) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.requested += 1;
        let mine = st.requested;
        let mut sync = Some(sync);
        while st.done < mine {
            if st.running {
                st = self
                    .finished
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            st.running = true;
            let upto = st.requested;
            drop(st);
            if let Some(f) = sync.take() {
                f();
            }
            st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            st.running = false;
            st.done = st.done.max(upto);
            self.finished.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    #[test]
    fn every_caller_returns_after_a_sync_that_started_after_it_and_syncs_are_shared() {
        let g = Arc::new(GroupSync::default());
        let syncs = Arc::new(AtomicU64::new(0));
        let writes = Arc::new(AtomicU64::new(0));
        let synced = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (g, syncs, writes, synced) =
                    (g.clone(), syncs.clone(), writes.clone(), synced.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let w = writes.fetch_add(1, Ordering::SeqCst) + 1;
                        g.sync(|| {
                            let seen = writes.load(Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_micros(300));
                            syncs.fetch_add(1, Ordering::SeqCst);
                            synced.fetch_max(seen, Ordering::SeqCst);
                        });
                        // The write counted before the call is covered by a finished sync.
                        assert!(synced.load(Ordering::SeqCst) >= w);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = syncs.load(Ordering::SeqCst);
        assert!(
            n < 800,
            "16 writers x 50 writes took {n} syncs: none shared"
        );
    }
}
