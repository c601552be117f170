//! The threads of one decoding step as a team: the thread that runs the step (the leader) and
//! one helper on each other core, which stays with the step and spins between its parallel
//! phases instead of going back to rayon's pool.
//!
//! At batch 1 a step is ~60 short parallel phases (a weight matrix of 0.5–6 MB each, the
//! attention heads of a layer) with a few microseconds of serial work between them. Through
//! rayon each phase is a fork-join of tasks: the other core starts ~2 µs late and the two rarely
//! finish together; both cores were busy for 93% of the matrix-vector time (decode loop of
//! `small`, 49 products a step). Here a phase is a run of parts claimed from its two ends: the
//! leader from the front, the helpers from the back, each reading one contiguous stretch of the
//! weight (the best pattern for this machine's prefetchers, see bench/NOTES.md), and they meet
//! wherever their speeds put the boundary.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// A phase's work: part index → done.
type Job<'a> = dyn Fn(usize) + Sync + 'a;

/// See the module documentation. Made by [`Team::run`]; phases start with [`Team::parallel`].
pub(crate) struct Team {
    /// `phase << 32 | lo << 16 | hi`: parts `lo..hi` of phase `phase` are still unclaimed.
    word: Line<AtomicU64>,
    /// Parts of the current phase that have finished.
    done: Line<AtomicU32>,
    /// A claim takes this share of the unclaimed parts: 1 / (2 × threads).
    share: u64,
    /// The current phase's job, lifetime erased: written by the leader before it publishes the
    /// phase in `word`, read by a helper only after it has claimed a part of that phase, and not
    /// replaced before every claimed part is done.
    job: UnsafeCell<Option<*const Job<'static>>>,
    quit: AtomicBool,
}

/// A value on a cache line of its own (two lines: the prefetcher fetches lines in pairs), so
/// that the cores' writes to one do not evict the other.
#[repr(align(128))]
struct Line<T>(T);

impl<T> std::ops::Deref for Line<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

// SAFETY: `job` is written only by the leader while no part of the previous phase is running
// and read only by threads that hold a claimed, unfinished part of the current phase (see
// `parallel` and `help`); every other field is atomic.
unsafe impl Sync for Team {}

/// Most parts one phase may have (they are counted in 16 bits of `word`).
const MAX_PARTS: usize = u16::MAX as usize;

impl Team {
    /// Runs `f` on this thread as the leader, with a helper spawned for each other thread of
    /// rayon's pool. A helper that does not start (every other thread busy) is not waited for:
    /// the leader then does every part itself.
    pub(crate) fn run<R: Send>(helpers: usize, f: impl FnOnce(&Team) -> R + Send) -> R {
        let team = Team {
            word: Line(AtomicU64::new(0)),
            done: Line(AtomicU32::new(0)),
            share: 2 * (helpers as u64 + 1),
            job: UnsafeCell::new(None),
            quit: AtomicBool::new(false),
        };
        /// Sets `quit` however the leader leaves (a panic included), so that no helper spins on.
        struct Quit<'a>(&'a AtomicBool);
        impl Drop for Quit<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        rayon::scope(|s| {
            for _ in 0..helpers {
                s.spawn(|_| team.help());
            }
            let _quit = Quit(&team.quit);
            f(&team)
        })
    }

    /// Runs `job(i)` for every part `i < parts` on the team and returns when all are done.
    pub(crate) fn parallel(&self, parts: usize, job: &Job<'_>) {
        assert!(parts <= MAX_PARTS, "{parts} parts in one phase");
        if parts == 0 {
            return;
        }
        // SAFETY: the previous phase is over (every claimed part finished before `parallel`
        // returned), so no thread reads `job`; the lifetime is erased only until this call
        // returns, after every part of this phase has finished with it.
        unsafe {
            *self.job.get() = Some(std::mem::transmute::<*const Job<'_>, *const Job<'static>>(
                job,
            ));
        }
        self.done.store(0, Ordering::Relaxed);
        let phase = (self.word.load(Ordering::Relaxed) >> 32) + 1;
        self.word
            .store(phase << 32 | parts as u64, Ordering::Release);
        while let Some(run) = self.claim(phase, true) {
            let n = run.len() as u32;
            // A part that panics here must not unwind this thread's frames (which the job
            // borrows) while a helper is still inside a part of the same job: the phase is
            // closed, the helpers' runs are waited for, and then the panic goes on.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run.for_each(job)));
            self.done.fetch_add(n, Ordering::Release);
            if let Err(panic) = ran {
                let skipped = self.close(phase);
                self.done.fetch_add(skipped, Ordering::Release);
                self.wait(parts);
                std::panic::resume_unwind(panic);
            }
        }
        self.wait(parts);
    }

    /// Spins until `parts` parts of the current phase are counted done.
    fn wait(&self, parts: usize) {
        while self.done.load(Ordering::Acquire) < parts as u32 {
            std::hint::spin_loop();
        }
    }

    /// Takes every unclaimed part of `phase` off the counter; returns how many there were.
    fn close(&self, phase: u64) -> u32 {
        self.take(phase, true, |left| left)
            .map_or(0, |run| run.len() as u32)
    }

    /// Claims the next unclaimed parts of `phase`, from the front or from the back: a share of
    /// what is left (guided scheduling), so that a phase takes a handful of claims, each one
    /// exchange of a cache line between the cores, and still ends on single parts.
    fn claim(&self, phase: u64, front: bool) -> Option<std::ops::Range<usize>> {
        self.take(phase, front, |left| left.div_ceil(self.share))
    }

    /// Takes `how_many(left)` of the `left` unclaimed parts of `phase` from one end of the
    /// counter; None when the phase is over or another.
    fn take(
        &self,
        phase: u64,
        front: bool,
        how_many: impl Fn(u64) -> u64,
    ) -> Option<std::ops::Range<usize>> {
        let mut w = self.word.load(Ordering::Acquire);
        loop {
            let (lo, hi) = ((w >> 16) & 0xffff, w & 0xffff);
            if w >> 32 != phase || lo >= hi {
                return None;
            }
            let take = how_many(hi - lo);
            let (next, parts) = if front {
                (w + (take << 16), lo..lo + take)
            } else {
                (w - take, hi - take..hi)
            };
            match self
                .word
                .compare_exchange_weak(w, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(parts.start as usize..parts.end as usize),
                Err(now) => w = now,
            }
        }
    }

    /// A helper: takes parts from the back of each phase until the leader is done.
    fn help(&self) {
        /// Counts a claimed part as done even if it panics, so that the leader does not wait
        /// forever (the panic then reaches the leader through rayon's scope).
        struct Done<'a>(&'a AtomicU32, u32);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.fetch_add(self.1, Ordering::Release);
            }
        }
        while !self.quit.load(Ordering::Acquire) {
            let phase = self.word.load(Ordering::Acquire) >> 32;
            match self.claim(phase, false) {
                Some(run) => {
                    let _done = Done(&self.done, run.len() as u32);
                    // SAFETY: this thread holds claimed, unfinished parts of `phase`, so the
                    // leader published this phase's job before the claim and keeps it (and what
                    // it borrows) alive until the parts are counted done.
                    let job = unsafe { (*self.job.get()).expect("a phase was published") };
                    run.for_each(|i| unsafe { (*job)(i) });
                }
                None => std::hint::spin_loop(),
            }
        }
    }
}

/// A slice that the parts of a phase write at disjoint indices.
pub(crate) struct Disjoint<'a> {
    ptr: *mut f32,
    len: usize,
    _slice: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: the parts write disjoint indices (the caller's contract on `write`), and nothing reads
// the slice until the phase is over.
unsafe impl Sync for Disjoint<'_> {}

impl<'a> Disjoint<'a> {
    pub(crate) fn new(s: &'a mut [f32]) -> Self {
        Disjoint {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _slice: std::marker::PhantomData,
        }
    }

    /// The run `start .. start + len` as a slice.
    ///
    /// # Safety
    /// No two parts of a phase may take overlapping runs.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn run(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(start + len <= self.len, "run {start}+{len} of {}", self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(start), len)
    }

    /// Writes `v` at `i`.
    ///
    /// # Safety
    /// No two parts of a phase may write the same index.
    pub(crate) unsafe fn write(&self, i: usize, v: f32) {
        assert!(i < self.len, "index {i} of {}", self.len);
        *self.ptr.add(i) = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_of_every_phase_runs_once() {
        let counts: Vec<AtomicU32> = (0..1000).map(|_| AtomicU32::new(0)).collect();
        Team::run(rayon::current_num_threads() - 1, |team| {
            for parts in [1, 2, 3, 17, 1000, 0, 5] {
                for (i, c) in counts.iter().enumerate() {
                    c.store(if i < parts { 0 } else { 7 }, Ordering::Relaxed);
                }
                team.parallel(parts, &|i| {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                });
                for (i, c) in counts.iter().enumerate() {
                    let want = if i < parts { 1 } else { 7 };
                    assert_eq!(c.load(Ordering::Relaxed), want, "part {i} of {parts}");
                }
            }
        });
    }

    #[test]
    fn a_team_whose_helpers_never_start_finishes_alone() {
        // More helpers than the pool has threads: the extra ones start only after the leader
        // is done, and must then leave at once.
        let sum = Team::run(8, |team| {
            let total = AtomicU64::new(0);
            team.parallel(100, &|i| {
                total.fetch_add(i as u64, Ordering::Relaxed);
            });
            total.load(Ordering::Relaxed)
        });
        assert_eq!(sum, 4950);
    }

    #[test]
    fn a_part_that_panics_reaches_the_caller_after_the_other_parts_end() {
        let finished = AtomicU32::new(0);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Team::run(rayon::current_num_threads() - 1, |team| {
                team.parallel(64, &|i| {
                    // The leader claims from the front: part 0 is its first.
                    assert!(i != 0, "part 0 fails");
                    std::thread::sleep(std::time::Duration::from_micros(200));
                    finished.fetch_add(1, Ordering::Relaxed);
                });
            })
        }));
        assert!(caught.is_err());
        // Whatever a helper had claimed was finished before the panic left `parallel`; the
        // rest of the phase was dropped.
        assert!(finished.load(Ordering::Relaxed) < 64);
    }

    #[test]
    fn disjoint_runs_fill_the_slice() {
        let mut v = vec![0f32; 64];
        {
            let d = Disjoint::new(&mut v);
            Team::run(1, |team| {
                // SAFETY: part i writes only 8i .. 8i + 8.
                team.parallel(8, &|i| unsafe { d.run(8 * i, 8) }.fill(i as f32));
            });
        }
        assert!(v.iter().enumerate().all(|(i, &x)| x == (i / 8) as f32));
    }
}
