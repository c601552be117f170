//! Batching across requests at token granularity: many callers share one session, and all their
//! images are sampled in one `forward` call a step.
//!
//! A request's rows (one per image, twice with guidance) wait only until the next step: then they
//! are prefilled together with whatever else arrived since the last step (one call per prefill
//! length), and their cache rows join the running batch's ([`Session::regroup`]); from there on
//! every row steps in the same call, each at its own position (the graphs take one past length
//! per row, manifest schema 3). A request leaves the batch the step its images are done: they
//! are decoded at once and its rows dropped from the cache, while the others go on. Where the
//! runtime cannot step rows at different positions ([`Session::mixed_positions`]: candle off the
//! CPU), rows prefilled together step together and each such cohort makes its own call.
//!
//! [`Session::regroup`]: crate::Session::regroup
//! [`Session::mixed_positions`]: crate::Session::mixed_positions
//!
//! The batcher runs on a thread of its own; [`Batcher::submit`] checks the request at once (a bad
//! request, a full queue and an oversized request are errors before anything runs) and the reply
//! comes through a callback. Dropping the [`Ticket`] cancels the request: waiting, it is dropped;
//! running, its rows leave the batch at the next step.

use crate::generator::{last_positions, to_images, Decoding, Generator, Output, Request};
use crate::session::{KvCache, RuntimeError};
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Limits of a [`Batcher`].
#[derive(Clone, Copy, Debug)]
pub struct BatcherOptions {
    /// Rows (images, twice with guidance) sampled at once over all cohorts.
    pub max_rows: usize,
    /// Requests that may wait for rows; one more is refused with [`SubmitError::QueueFull`].
    pub max_queue: usize,
    /// How long a request that finds the batcher idle waits for others to start with it: each
    /// arrival extends the wait by this much, up to ten times it (none once `max_rows` wait).
    pub gather: std::time::Duration,
}

impl BatcherOptions {
    /// `max_rows` and `max_queue`, gathering for 2 ms.
    pub fn new(max_rows: usize, max_queue: usize) -> Self {
        BatcherOptions {
            max_rows,
            max_queue,
            gather: std::time::Duration::from_millis(2),
        }
    }
}

/// Why a request was not queued.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Request(#[from] RuntimeError),
    #[error("the queue is full ({0} requests wait); retry later")]
    QueueFull(usize),
    #[error("this request needs {rows} rows (images × rerank candidates, twice with guidance or reranking); the server runs at most {max}")]
    TooLarge { rows: usize, max: usize },
    #[error("the server is shutting down")]
    Stopped,
}

/// What the batcher has done so far (cumulative counts, and the present queue and rows).
#[derive(Clone, Debug, Default)]
pub struct BatcherStats {
    /// Requests waiting for rows.
    pub waiting: usize,
    /// Rows running now.
    pub running_rows: usize,
    /// `forward` calls made, and rows summed over them (prefills included).
    pub forward_calls: u64,
    pub forward_rows: u64,
    /// `forward` calls by their rows: `rows_histogram[i]` counts calls with at most
    /// `ROW_BUCKETS[i]` rows (the last bucket: any).
    pub rows_histogram: Vec<u64>,
    /// Image tokens sampled (one per image per step).
    pub image_tokens: u64,
}

/// Upper bounds of the rows histogram's buckets.
pub const ROW_BUCKETS: [usize; 8] = [1, 2, 4, 8, 16, 32, 64, usize::MAX];

type Reply = Box<dyn FnOnce(Result<Output, RuntimeError>) + Send>;

struct Job {
    decoding: Decoding,
    prefix: Vec<i64>,
    truncated: bool,
    prefix_len: usize,
    cancelled: Arc<AtomicBool>,
    reply: Reply,
}

impl Job {
    fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }
}

/// A queued or running request: dropping it cancels the request.
#[derive(Debug)]
pub struct Ticket {
    cancelled: Arc<AtomicBool>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    stop: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    stats: Mutex<BatcherStats>,
    tokens: AtomicU64,
}

/// Requests from many callers, sampled together on one [`Generator`]'s session.
pub struct Batcher {
    generator: Arc<Generator>,
    options: BatcherOptions,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Batcher {
    pub fn new(generator: Arc<Generator>, options: BatcherOptions) -> Self {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            stats: Mutex::new(BatcherStats {
                rows_histogram: vec![0; ROW_BUCKETS.len()],
                ..Default::default()
            }),
            tokens: AtomicU64::new(0),
        });
        let thread = {
            let (generator, shared) = (generator.clone(), shared.clone());
            std::thread::Builder::new()
                .name("dalle-batcher".into())
                .spawn(move || run(&generator, &shared, options))
                .expect("spawn the batcher thread")
        };
        Batcher {
            generator,
            options,
            shared,
            thread: Some(thread),
        }
    }

    pub fn generator(&self) -> &Generator {
        &self.generator
    }

    pub fn options(&self) -> BatcherOptions {
        self.options
    }

    /// Queue `req`; `reply` is called once with its images (or why it failed), on the batcher's
    /// thread. Not called for a request cancelled before it finished.
    pub fn submit(
        &self,
        req: &Request,
        reply: impl FnOnce(Result<Output, RuntimeError>) + Send + 'static,
    ) -> Result<Ticket, SubmitError> {
        let m = self.generator.manifest();
        let (text, truncated) = self.generator.caption(&req.prompt)?;
        if truncated && req.strict {
            return Err(RuntimeError::Request(format!(
                "the prompt is longer than the model's {} caption tokens (strict)",
                m.geometry.text_len
            ))
            .into());
        }
        // Before `Decoding::new` allocates per image.
        let rows = crate::generator::request_rows(req);
        if rows > self.options.max_rows {
            return Err(SubmitError::TooLarge {
                rows,
                max: self.options.max_rows,
            });
        }
        let (decoding, prefix) = Decoding::new(m, &text, req)?;
        let cancelled = Arc::new(AtomicBool::new(false));
        let job = Job {
            prefix_len: prefix.len() / rows,
            decoding,
            prefix,
            truncated,
            cancelled: cancelled.clone(),
            reply: Box::new(reply),
        };
        let mut q = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.stop {
            return Err(SubmitError::Stopped);
        }
        if q.jobs.len() >= self.options.max_queue {
            return Err(SubmitError::QueueFull(q.jobs.len()));
        }
        q.jobs.push_back(job);
        drop(q);
        self.shared.wake.notify_one();
        Ok(Ticket { cancelled })
    }

    pub fn stats(&self) -> BatcherStats {
        let mut s = self
            .shared
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        s.waiting = self
            .shared
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .jobs
            .len();
        s.image_tokens = self.shared.tokens.load(Ordering::Relaxed);
        s
    }

    /// Refuse new requests, finish every queued and running one, and stop the thread.
    pub fn shutdown(&mut self) {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stop = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Rows that step together in one call, with their cache.
struct Cohort {
    jobs: Vec<Job>,
    cache: KvCache,
    /// Each row's last-position logits from the last `forward`.
    logits: Vec<Vec<f32>>,
}

impl Cohort {
    fn rows(&self) -> usize {
        self.jobs.iter().map(|j| j.decoding.rows()).sum()
    }
}

fn run(generator: &Generator, shared: &Shared, options: BatcherOptions) {
    let mut cohorts: Vec<Cohort> = vec![];
    loop {
        let running: usize = cohorts.iter().map(Cohort::rows).sum();
        let admitted = {
            let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            while cohorts.is_empty() && q.jobs.is_empty() && !q.stop {
                q = shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            if cohorts.is_empty() && q.jobs.is_empty() && q.stop {
                return;
            }
            // Idle until now: give the requests that arrive together (clients answered in the
            // same step come back within a millisecond or two) a moment to join one cohort.
            // Each arrival extends the wait by `gather`, up to 10 × `gather` in all.
            if cohorts.is_empty() {
                let start = std::time::Instant::now();
                let mut deadline = start + options.gather;
                let mut seen = q.jobs.len();
                while !q.stop && waiting_rows(&q.jobs) < options.max_rows {
                    let now = std::time::Instant::now();
                    if q.jobs.len() > seen {
                        seen = q.jobs.len();
                        deadline = (now + options.gather).min(start + 10 * options.gather);
                    }
                    if now >= deadline {
                        break;
                    }
                    q = shared
                        .wake
                        .wait_timeout(q, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
            q.jobs.retain(|j| !j.cancelled());
            let mut admitted = vec![];
            let mut rows = running;
            while let Some(job) = q.jobs.front() {
                if rows + job.decoding.rows() > options.max_rows {
                    break;
                }
                rows += job.decoding.rows();
                admitted.extend(q.jobs.pop_front());
            }
            admitted
        };
        // Newcomers are prefilled together, one call per prefill length (the number of primed
        // codes), each into a cache of its own...
        let mut groups: Vec<Vec<Job>> = vec![];
        for job in admitted {
            match groups
                .iter_mut()
                .find(|g| g[0].prefix_len == job.prefix_len)
            {
                Some(g) => g.push(job),
                None => groups.push(vec![job]),
            }
        }
        for jobs in groups {
            let prefix: Vec<i64> = jobs.iter().flat_map(|j| j.prefix.iter().copied()).collect();
            let b: usize = jobs.iter().map(|j| j.decoding.rows()).sum();
            let mut cohort = Cohort {
                cache: KvCache::new(generator.manifest(), b),
                jobs,
                logits: vec![],
            };
            match forward(generator, shared, &prefix, b, &mut cohort.cache) {
                Ok(logits) => {
                    cohort.logits = logits;
                    cohorts.push(cohort);
                }
                Err(e) => fail(cohort.jobs, &e),
            }
        }
        // ...and then join the running batch: from here on all rows step in one call, each at
        // its own position (where the runtime takes that; else each cohort steps on its own).
        if cohorts.len() > 1 && generator.session().mixed_positions() {
            cohorts = match merge(generator, std::mem::take(&mut cohorts)) {
                Ok(one) => vec![one],
                Err((jobs, e)) => {
                    fail(jobs, &e);
                    vec![]
                }
            };
        }
        let mut still = vec![];
        for cohort in cohorts.drain(..) {
            let Cohort {
                jobs,
                cache,
                logits,
            } = cohort;
            // Each request samples its next tokens; finished and cancelled ones leave.
            let (mut next, mut kept, mut keep_rows, mut done) = (vec![], vec![], vec![], vec![]);
            let mut row = 0;
            for mut job in jobs {
                let rows = job.decoding.rows();
                let span = row..row + rows;
                row += rows;
                if job.cancelled() {
                    continue;
                }
                let step = job.decoding.step(&logits[span.clone()]);
                shared.tokens.fetch_add(
                    (rows / if job.decoding.guided() { 2 } else { 1 }) as u64,
                    Ordering::Relaxed,
                );
                match step {
                    Some(ids) => {
                        next.extend(ids);
                        keep_rows.extend(span);
                        kept.push(job);
                    }
                    None => done.push(job),
                }
            }
            if !done.is_empty() {
                finish(generator, done);
            }
            if kept.is_empty() {
                continue;
            }
            let mut cohort = Cohort {
                jobs: kept,
                cache,
                logits: vec![],
            };
            if keep_rows.len() < row {
                // Rows left: the cache keeps the others' rows only.
                let picks: Vec<(usize, usize)> = keep_rows.iter().map(|&r| (0, r)).collect();
                match regroup(generator, vec![cohort.cache], &picks) {
                    Ok(cache) => cohort.cache = cache,
                    Err(e) => {
                        fail(cohort.jobs, &e);
                        continue;
                    }
                }
            }
            let b = cohort.rows();
            match forward(generator, shared, &next, b, &mut cohort.cache) {
                Ok(logits) => {
                    cohort.logits = logits;
                    still.push(cohort);
                }
                Err(e) => fail(cohort.jobs, &e),
            }
        }
        cohorts = still;
        let running: usize = cohorts.iter().map(Cohort::rows).sum();
        shared
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .running_rows = running;
    }
}

/// One cohort of all `cohorts`' rows, in order, with one cache; on an error, every job and why.
fn merge(generator: &Generator, cohorts: Vec<Cohort>) -> Result<Cohort, (Vec<Job>, RuntimeError)> {
    let mut picks = vec![];
    let (mut jobs, mut caches, mut logits) = (vec![], vec![], vec![]);
    for (i, c) in cohorts.into_iter().enumerate() {
        picks.extend((0..c.cache.batch).map(|r| (i, r)));
        jobs.extend(c.jobs);
        caches.push(c.cache);
        logits.extend(c.logits);
    }
    match regroup(generator, caches, &picks) {
        Ok(cache) => Ok(Cohort {
            jobs,
            cache,
            logits,
        }),
        Err(e) => Err((jobs, e)),
    }
}

/// [`Session::regroup`](crate::Session::regroup); a panic inside the runtime becomes an error.
fn regroup(
    generator: &Generator,
    parts: Vec<KvCache>,
    picks: &[(usize, usize)],
) -> Result<KvCache, RuntimeError> {
    let session = generator.session();
    catch_unwind(AssertUnwindSafe(|| session.regroup(parts, picks)))
        .unwrap_or_else(|_| Err(panicked(session.name())))
}

fn waiting_rows(jobs: &VecDeque<Job>) -> usize {
    jobs.iter().map(|j| j.decoding.rows()).sum()
}

/// One `forward` of `b` rows; a panic inside the runtime becomes an error of these rows only.
fn forward(
    generator: &Generator,
    shared: &Shared,
    ids: &[i64],
    b: usize,
    cache: &mut KvCache,
) -> Result<Vec<Vec<f32>>, RuntimeError> {
    crate::failpoint::fail("forward")?;
    let session = generator.session();
    let vocab = generator.manifest().token_layout().vocab_size();
    let out = catch_unwind(AssertUnwindSafe(|| session.forward(ids, b, cache)))
        .unwrap_or_else(|_| Err(panicked(session.name())))?;
    let mut s = shared.stats.lock().unwrap_or_else(|e| e.into_inner());
    s.forward_calls += 1;
    s.forward_rows += b as u64;
    let bucket = ROW_BUCKETS.iter().position(|&m| b <= m).unwrap_or(0);
    s.rows_histogram[bucket] += 1;
    Ok(last_positions(&out, b, vocab))
}

fn panicked(runtime: &'static str) -> RuntimeError {
    RuntimeError::Run {
        runtime,
        message: "the runtime panicked; this request failed, the server goes on".into(),
    }
}

/// Decode every image of a finished cohort in one call and answer each request.
fn finish(generator: &Generator, jobs: Vec<Job>) {
    let jobs: Vec<Job> = jobs.into_iter().filter(|j| !j.cancelled()).collect();
    if jobs.is_empty() {
        return;
    }
    let mut all = vec![];
    let mut parts = vec![];
    for job in jobs {
        let Job {
            decoding,
            truncated,
            reply,
            ..
        } = job;
        let (codes, caption_fit) = decoding.into_codes();
        all.extend(codes.iter().flatten().map(|&c| c as i64));
        parts.push((codes, caption_fit, truncated, reply));
    }
    let n: usize = parts.iter().map(|p| p.0.len()).sum();
    let session = generator.session();
    let decoded = crate::failpoint::fail("decode").and_then(|_| {
        catch_unwind(AssertUnwindSafe(|| session.decode(&all, n)))
            .unwrap_or_else(|_| Err(panicked(session.name())))
    });
    match decoded {
        Ok(pixels) => {
            let size = generator.manifest().geometry.image_size;
            let mut images = to_images(&pixels, n, size).into_iter();
            for (codes, caption_fit, truncated, reply) in parts {
                let images = images.by_ref().take(codes.len()).collect();
                reply(Ok(Output {
                    codes,
                    images,
                    truncated,
                    caption_fit,
                }));
            }
        }
        Err(e) => {
            for (_, _, _, reply) in parts {
                reply(Err(copy_error(&e)));
            }
        }
    }
}

fn fail(jobs: Vec<Job>, e: &RuntimeError) {
    for job in jobs {
        if !job.cancelled() {
            (job.reply)(Err(copy_error(e)));
        }
    }
}

/// `RuntimeError` is not `Clone` (it carries a manifest error); every request of a failed call
/// gets the same message.
fn copy_error(e: &RuntimeError) -> RuntimeError {
    match e {
        RuntimeError::Run { runtime, message } => RuntimeError::Run {
            runtime,
            message: message.clone(),
        },
        RuntimeError::Request(m) => RuntimeError::Request(m.clone()),
        other => RuntimeError::Request(other.to_string()),
    }
}
