//! A minimal, fast in-process fake of the two AWS APIs the worker uses.
//!
//! **Only where moto is too slow.** moto (tests/support, `Stack`) is the
//! emulator for every test that it can serve; this fake is for what it
//! cannot: the benchmarks (tests/bench_rate.rs, tests/bench_soak.rs: rate
//! caps and a thousand calls a second), runs of hundreds of jobs at speed
//! (tests/kill.rs: SIGKILL mid-run), fault injection at speed (failed
//! DeleteMessageBatch entries, a throttling token bucket), and its own
//! self-check (tests/fake_aws_selfcheck.rs). A new test that needs none of
//! that belongs on moto.
//!
//! One HTTP/1.1 server (axum) on `127.0.0.1:0`, dispatching on `x-amz-target`:
//!
//! * **SQS**, AWS JSON 1.0 (`AmazonSQS.<Op>`): `GetQueueAttributes`,
//!   `ReceiveMessage` (long poll, visibility timeout, receive counts, redrive
//!   to the dead-letter queue after `max_receive_count` receives),
//!   `DeleteMessage`, `DeleteMessageBatch` (optional injected failures),
//!   `ChangeMessageVisibility`, `SendMessage`, `SendMessageBatch`.
//! * **Cognito user pools**, AWS JSON 1.1
//!   (`AWSCognitoIdentityProviderService.<Op>`): `ForgotPassword` and
//!   `AdminUserGlobalSignOut` (the worker's `cognito.sign_out`). Both answer
//!   after the same fixed latency, behind one optional token bucket that
//!   answers `TooManyRequestsException` when empty: the worker does not count
//!   on the sign-out having a quota apart from the recovery calls
//!   (docs/outcomes.md, "Ending sessions"), so the fake models that worst
//!   case. Every accepted ForgotPassword call's arrival time, username,
//!   `ClientId` and `SecretHash` is recorded; every accepted sign-out's
//!   arrival time and username, apart, so each operation's figures stay
//!   separate (throttled calls too).
//! * Anything else: 400 `UnknownOperationException`.
//!
//! Field names follow the SDK's own (de)serializers
//! (`aws-sdk-sqs/src/protocol_serde/shape_*.rs`, the schemas in
//! `aws-sdk-cognitoidentityprovider/src/operation/forgot_password/`). The
//! Rust SQS SDK does not check `MD5OfBody`; the fake sends the real digest
//! anyway ([`md5_hex`], the `md-5` crate) so other clients would accept it too.
//!
//! The server runs on its own thread and current-thread Tokio runtime, so it
//! works from plain `#[test]`s and `#[tokio::test]`s alike, and stops when the
//! [`FakeAws`] is dropped. [`run_worker`] runs the real `reset-worker` binary
//! against it and measures its CPU time and peak RSS from `/proc`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::sync::Notify;

pub const ACCOUNT: &str = "123456789012";
pub const REGION: &str = "us-east-1";
/// The job queue every [`FakeAws`] has.
pub const MAIN_QUEUE: &str = "bench";
/// Its redrive target, also a queue of the fake.
pub const DEAD_LETTER_QUEUE: &str = "bench-dlq";

const SQS_JSON: &str = "application/x-amz-json-1.0";
const COGNITO_JSON: &str = "application/x-amz-json-1.1";
const SQS_PREFIX: &str = "AmazonSQS.";
const COGNITO_PREFIX: &str = "AWSCognitoIdentityProviderService.";
/// SQS's limits on one receive / one batch.
const MAX_BATCH: usize = 10;
const MAX_WAIT_SECONDS: u64 = 20;

// ---------------------------------------------------------------------------
// Configuration and counters
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// How long each Cognito call (ForgotPassword, AdminUserGlobalSignOut)
    /// takes, accepted and throttled calls alike.
    pub cognito_latency: Duration,
    /// Cognito's token bucket: `(refill per second, capacity)`. It starts
    /// full, and ForgotPassword and AdminUserGlobalSignOut both draw on it.
    /// `None`: never throttle.
    pub throttle: Option<(f64, f64)>,
    /// Share (0–1) of DeleteMessageBatch entries answered as `Failed`
    /// (`InternalError`, `SenderFault: false`) instead of deleted.
    pub delete_failure_fraction: f64,
    /// The queues' `VisibilityTimeout` attribute, used when a receive names none.
    pub default_visibility: Duration,
    /// The job queue's redrive policy: after this many receives the next
    /// receive moves the message to [`DEAD_LETTER_QUEUE`] instead.
    pub max_receive_count: u32,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            cognito_latency: Duration::from_millis(20),
            throttle: None,
            delete_failure_fraction: 0.0,
            default_visibility: Duration::from_secs(30),
            max_receive_count: 5,
        }
    }
}

/// SQS operations the fake counts (one HTTP request each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SqsOp {
    GetQueueAttributes,
    ReceiveMessage,
    DeleteMessage,
    DeleteMessageBatch,
    ChangeMessageVisibility,
    SendMessage,
    SendMessageBatch,
}

impl SqsOp {
    pub const ALL: [SqsOp; 7] = [
        SqsOp::GetQueueAttributes,
        SqsOp::ReceiveMessage,
        SqsOp::DeleteMessage,
        SqsOp::DeleteMessageBatch,
        SqsOp::ChangeMessageVisibility,
        SqsOp::SendMessage,
        SqsOp::SendMessageBatch,
    ];

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|op| op.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            SqsOp::GetQueueAttributes => "GetQueueAttributes",
            SqsOp::ReceiveMessage => "ReceiveMessage",
            SqsOp::DeleteMessage => "DeleteMessage",
            SqsOp::DeleteMessageBatch => "DeleteMessageBatch",
            SqsOp::ChangeMessageVisibility => "ChangeMessageVisibility",
            SqsOp::SendMessage => "SendMessage",
            SqsOp::SendMessageBatch => "SendMessageBatch",
        }
    }
}

#[derive(Default)]
struct Counters {
    sqs: [AtomicU64; SqsOp::ALL.len()],
    empty_receives: AtomicU64,
    messages_received: AtomicU64,
    redeliveries: AtomicU64,
    messages_deleted: AtomicU64,
    /// Deletes with an outdated receipt handle: "succeed", delete nothing.
    stale_deletes: AtomicU64,
    injected_delete_failures: AtomicU64,
    redriven: AtomicU64,
    throttled: AtomicU64,
    sign_outs_throttled: AtomicU64,
    /// Sum over ForgotPassword calls of arrival → response, in nanoseconds.
    /// Sign-outs are left out: the raw benchmark divides this by the
    /// ForgotPassword calls.
    cognito_busy_nanos: AtomicU64,
    /// Malformed Cognito calls, of either operation.
    cognito_rejected: AtomicU64,
    unknown_operations: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A snapshot of the SQS-side counters.
#[derive(Debug, Clone, Default)]
pub struct SqsStats {
    /// HTTP requests per operation, in [`SqsOp::ALL`] order.
    pub requests: Vec<(SqsOp, u64)>,
    /// Receives that returned no message.
    pub empty_receives: u64,
    /// Messages handed out by receives (redeliveries included).
    pub messages_received: u64,
    /// Handed out with `ApproximateReceiveCount` > 1.
    pub redeliveries: u64,
    pub messages_deleted: u64,
    pub stale_deletes: u64,
    pub injected_delete_failures: u64,
    /// Moved to the dead-letter queue by the redrive policy.
    pub redriven: u64,
}

impl SqsStats {
    pub fn get(&self, op: SqsOp) -> u64 {
        self.requests
            .iter()
            .find(|(o, _)| *o == op)
            .map_or(0, |(_, n)| *n)
    }

    /// Every SQS request made over HTTP.
    pub fn total(&self) -> u64 {
        self.requests.iter().map(|(_, n)| n).sum()
    }
}

// ---------------------------------------------------------------------------
// Queue model
// ---------------------------------------------------------------------------

struct Msg {
    message_id: String,
    body: String,
    md5: String,
    sent_ms: u64,
    first_receive_ms: Option<u64>,
    receive_count: u32,
    visible_at: Instant,
    /// The receipt handle of the latest receive; only it may delete.
    receipt: Option<String>,
    /// `MessageAttributes` as sent (SendMessage), returned on receive.
    attributes: Option<Value>,
}

#[derive(Default)]
struct Queue {
    msgs: HashMap<u64, Msg>,
    /// `(visible_at, key)` of every message, earliest first.
    schedule: BTreeSet<(Instant, u64)>,
}

impl Queue {
    fn push(&mut self, key: u64, msg: Msg) {
        self.schedule.insert((msg.visible_at, key));
        self.msgs.insert(key, msg);
    }

    fn remove(&mut self, key: u64) -> Option<Msg> {
        let msg = self.msgs.remove(&key)?;
        self.schedule.remove(&(msg.visible_at, key));
        Some(msg)
    }

    fn set_visible_at(&mut self, key: u64, at: Instant) {
        if let Some(msg) = self.msgs.get_mut(&key) {
            self.schedule.remove(&(msg.visible_at, key));
            msg.visible_at = at;
            self.schedule.insert((at, key));
        }
    }

    /// The first message visible at `now`, taken out of the schedule.
    fn pop_visible(&mut self, now: Instant) -> Option<u64> {
        let &(at, key) = self.schedule.first()?;
        (at <= now).then(|| {
            self.schedule.pop_first();
            key
        })
    }

    fn counts(&self, now: Instant) -> (u64, u64) {
        let visible = self
            .schedule
            .iter()
            .take_while(|(at, _)| *at <= now)
            .count() as u64;
        (visible, self.msgs.len() as u64 - visible)
    }

    fn next_visible(&self) -> Option<Instant> {
        self.schedule.first().map(|(at, _)| *at)
    }
}

struct Queues {
    by_name: HashMap<String, Queue>,
    next_key: u64,
}

struct CognitoState {
    tokens: f64,
    refilled: Instant,
    accepted_at: Vec<Instant>,
    accepted_users: Vec<String>,
    /// `(Username, ClientId, SecretHash)` of every accepted call.
    accepted_calls: Vec<AcceptedCall>,
    throttled_at: Vec<Instant>,
    /// Accepted AdminUserGlobalSignOut calls: arrival time and username.
    sign_outs_at: Vec<Instant>,
    sign_out_users: Vec<String>,
    sign_outs_throttled_at: Vec<Instant>,
}

impl CognitoState {
    /// Takes a token from the bucket (refilled up to `arrival` first); false
    /// when it is empty. Always true without a throttle.
    fn admit(&mut self, throttle: Option<(f64, f64)>, arrival: Instant) -> bool {
        let Some((rate, burst)) = throttle else {
            return true;
        };
        let elapsed = arrival
            .saturating_duration_since(self.refilled)
            .as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.refilled = self.refilled.max(arrival);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What an accepted ForgotPassword call carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedCall {
    pub username: String,
    pub client_id: String,
    /// `None` when the call had no `SecretHash`.
    pub secret_hash: Option<String>,
}

/// A message on one of the fake's queues, as it stands.
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    pub body: String,
    /// `MessageAttributes` as sent (`{"name": {"DataType", "StringValue"}}`).
    pub attributes: Option<Value>,
}

struct Shared {
    config: FakeConfig,
    base_url: String,
    queues: Mutex<Queues>,
    /// Woken when a message may have become receivable (sent, released).
    arrivals: Notify,
    cognito: Mutex<CognitoState>,
    counters: Counters,
    /// Distinguishes message IDs of different fakes.
    nonce: u32,
    /// Linux thread ID of the server thread, for [`FakeAws::cpu_time`].
    server_tid: Mutex<Option<u32>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Shared {
    fn queue_arn(name: &str) -> String {
        format!("arn:aws:sqs:{REGION}:{ACCOUNT}:{name}")
    }

    fn new_msg(&self, key: u64, body: String, attributes: Option<Value>) -> Msg {
        Msg {
            message_id: format!(
                "{:08x}-{:04x}-4{:03x}-8000-{:012x}",
                self.nonce,
                (key >> 48) & 0xffff,
                (key >> 36) & 0xfff,
                key & 0xffff_ffff_ffff
            ),
            md5: md5_hex(body.as_bytes()),
            body,
            sent_ms: now_ms(),
            first_receive_ms: None,
            receive_count: 0,
            visible_at: Instant::now(),
            receipt: None,
            attributes,
        }
    }

    /// Adds messages to `queue`; returns their message IDs and body digests.
    fn send(&self, queue: &str, bodies: Vec<(String, Option<Value>)>) -> Vec<(String, String)> {
        let mut out = Vec::with_capacity(bodies.len());
        {
            let mut queues = lock(&self.queues);
            let first_key = queues.next_key;
            queues.next_key += bodies.len() as u64;
            let msgs: Vec<(u64, Msg)> = bodies
                .into_iter()
                .enumerate()
                .map(|(i, (body, attrs))| {
                    let key = first_key + i as u64;
                    (key, self.new_msg(key, body, attrs))
                })
                .collect();
            let q = queues
                .by_name
                .get_mut(queue)
                .expect("send: queue checked by caller");
            for (key, msg) in msgs {
                out.push((msg.message_id.clone(), msg.md5.clone()));
                q.push(key, msg);
            }
        }
        self.arrivals.notify_waiters();
        out
    }
}

/// `<key>.<receive count>.<random>`: opaque to clients, parseable here.
fn receipt_key(receipt: &str) -> Option<u64> {
    receipt.split('.').next()?.parse().ok()
}

// ---------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------

/// A running fake. Dropping it stops the server (pending long polls end).
pub struct FakeAws {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeAws {
    /// Binds `127.0.0.1:0` and serves until dropped.
    pub fn start(config: FakeConfig) -> FakeAws {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("listener address");
        let mut by_name = HashMap::new();
        by_name.insert(MAIN_QUEUE.to_string(), Queue::default());
        by_name.insert(DEAD_LETTER_QUEUE.to_string(), Queue::default());
        let tokens = config.throttle.map_or(0.0, |(_, burst)| burst);
        let shared = Arc::new(Shared {
            base_url: format!("http://{addr}"),
            config,
            queues: Mutex::new(Queues {
                by_name,
                next_key: 1,
            }),
            arrivals: Notify::new(),
            cognito: Mutex::new(CognitoState {
                tokens,
                refilled: Instant::now(),
                accepted_at: Vec::new(),
                accepted_users: Vec::new(),
                accepted_calls: Vec::new(),
                throttled_at: Vec::new(),
                sign_outs_at: Vec::new(),
                sign_out_users: Vec::new(),
                sign_outs_throttled_at: Vec::new(),
            }),
            counters: Counters::default(),
            nonce: fastrand::u32(..),
            server_tid: Mutex::new(None),
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let tid_slot = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fake-aws".into())
            .spawn(move || {
                // /proc/thread-self -> /proc/<pid>/task/<tid>
                *lock(&tid_slot.server_tid) = std::fs::read_link("/proc/thread-self")
                    .ok()
                    .and_then(|p| p.file_name()?.to_str()?.parse().ok());
                drop(tid_slot);
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("fake-aws runtime");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("tokio listener for fake-aws");
                    tokio::select! {
                        r = axum::serve(listener, app) => r.expect("fake-aws server"),
                        _ = stop_rx => {}
                    }
                });
                // Dropping the runtime cancels open connections and long polls.
            })
            .expect("spawn fake-aws thread");
        FakeAws {
            shared,
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`, the endpoint for both services.
    pub fn url(&self) -> String {
        self.shared.base_url.clone()
    }

    pub fn queue_url(&self) -> String {
        format!("{}/{ACCOUNT}/{MAIN_QUEUE}", self.shared.base_url)
    }

    pub fn dead_letter_queue_url(&self) -> String {
        format!("{}/{ACCOUNT}/{DEAD_LETTER_QUEUE}", self.shared.base_url)
    }

    /// Puts messages with these bodies on the job queue, visible at once
    /// (in process: no HTTP request, not counted).
    pub fn enqueue<I, S>(&self, bodies: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let bodies = bodies.into_iter().map(|b| (b.into(), None)).collect();
        self.shared.send(MAIN_QUEUE, bodies);
    }

    /// HTTP requests of one SQS operation so far.
    pub fn sqs_requests(&self, op: SqsOp) -> u64 {
        self.shared.counters.sqs[op as usize].load(Ordering::Relaxed)
    }

    pub fn sqs_stats(&self) -> SqsStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SqsStats {
            requests: SqsOp::ALL
                .into_iter()
                .map(|op| (op, self.sqs_requests(op)))
                .collect(),
            empty_receives: get(&c.empty_receives),
            messages_received: get(&c.messages_received),
            redeliveries: get(&c.redeliveries),
            messages_deleted: get(&c.messages_deleted),
            stale_deletes: get(&c.stale_deletes),
            injected_delete_failures: get(&c.injected_delete_failures),
            redriven: get(&c.redriven),
        }
    }

    /// Arrival times of accepted ForgotPassword calls, in order.
    pub fn accepted_call_times(&self) -> Vec<Instant> {
        let mut times = lock(&self.shared.cognito).accepted_at.clone();
        times.sort();
        times
    }

    /// Usernames of accepted ForgotPassword calls, in arrival order.
    pub fn accepted_usernames(&self) -> Vec<String> {
        lock(&self.shared.cognito).accepted_users.clone()
    }

    /// Every accepted ForgotPassword call's username, `ClientId` and
    /// `SecretHash`, in arrival order.
    pub fn accepted_calls(&self) -> Vec<AcceptedCall> {
        lock(&self.shared.cognito).accepted_calls.clone()
    }

    /// Arrival times of accepted AdminUserGlobalSignOut calls, in order.
    pub fn accepted_sign_out_times(&self) -> Vec<Instant> {
        let mut times = lock(&self.shared.cognito).sign_outs_at.clone();
        times.sort();
        times
    }

    /// Usernames of accepted AdminUserGlobalSignOut calls, in arrival order.
    pub fn accepted_sign_out_usernames(&self) -> Vec<String> {
        lock(&self.shared.cognito).sign_out_users.clone()
    }

    /// `(username, arrival)` of every accepted ForgotPassword call, in the
    /// order the fake recorded them: pairs a user's reset with their sign-out.
    pub fn accepted_resets_by_user(&self) -> Vec<(String, Instant)> {
        let c = lock(&self.shared.cognito);
        c.accepted_users
            .iter()
            .cloned()
            .zip(c.accepted_at.iter().copied())
            .collect()
    }

    /// `(username, arrival)` of every accepted AdminUserGlobalSignOut call,
    /// in the order the fake recorded them.
    pub fn accepted_sign_outs_by_user(&self) -> Vec<(String, Instant)> {
        let c = lock(&self.shared.cognito);
        c.sign_out_users
            .iter()
            .cloned()
            .zip(c.sign_outs_at.iter().copied())
            .collect()
    }

    /// Arrival times of throttled AdminUserGlobalSignOut calls, in order.
    pub fn throttled_sign_out_times(&self) -> Vec<Instant> {
        let mut times = lock(&self.shared.cognito).sign_outs_throttled_at.clone();
        times.sort();
        times
    }

    /// AdminUserGlobalSignOut calls answered TooManyRequestsException.
    pub fn throttled_sign_out_count(&self) -> u64 {
        self.shared
            .counters
            .sign_outs_throttled
            .load(Ordering::Relaxed)
    }

    /// The messages on `queue` ([`MAIN_QUEUE`], [`DEAD_LETTER_QUEUE`]), visible
    /// or not, oldest first (in process: not counted).
    pub fn messages(&self, queue: &str) -> Vec<QueuedMessage> {
        let queues = lock(&self.shared.queues);
        let Some(q) = queues.by_name.get(queue) else {
            return Vec::new();
        };
        let mut keys: Vec<&u64> = q.msgs.keys().collect();
        keys.sort();
        keys.into_iter()
            .map(|k| QueuedMessage {
                body: q.msgs[k].body.clone(),
                attributes: q.msgs[k].attributes.clone(),
            })
            .collect()
    }

    /// Arrival times of throttled ForgotPassword calls, in order.
    pub fn throttled_call_times(&self) -> Vec<Instant> {
        let mut times = lock(&self.shared.cognito).throttled_at.clone();
        times.sort();
        times
    }

    /// CPU time (user + system) the fake's server thread has used so far.
    pub fn cpu_time(&self) -> Duration {
        let tid = *lock(&self.shared.server_tid);
        tid.and_then(|tid| {
            proc_stat(&format!("/proc/self/task/{tid}/stat"))
                .map(|(_, ticks)| Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second()))
        })
        .unwrap_or_default()
    }

    /// Total time ForgotPassword calls spent in the fake (arrival to
    /// response, accepted and throttled): divided by a span, the mean number
    /// of calls in flight; divided by the calls, the latency really served.
    pub fn cognito_busy_time(&self) -> Duration {
        Duration::from_nanos(
            self.shared
                .counters
                .cognito_busy_nanos
                .load(Ordering::Relaxed),
        )
    }

    /// ForgotPassword calls answered TooManyRequestsException.
    pub fn throttled_count(&self) -> u64 {
        self.shared.counters.throttled.load(Ordering::Relaxed)
    }

    /// Cognito calls refused as malformed: ForgotPassword without ClientId
    /// or Username, AdminUserGlobalSignOut without UserPoolId or Username.
    pub fn cognito_rejected_count(&self) -> u64 {
        self.shared
            .counters
            .cognito_rejected
            .load(Ordering::Relaxed)
    }

    /// Requests with an `x-amz-target` the fake does not implement.
    pub fn unknown_operations(&self) -> u64 {
        self.shared
            .counters
            .unknown_operations
            .load(Ordering::Relaxed)
    }

    /// Messages on the job queue not yet deleted, visible or in flight.
    pub fn queue_depth(&self) -> usize {
        let (visible, in_flight) = self.queue_counts(MAIN_QUEUE);
        (visible + in_flight) as usize
    }

    /// `(ApproximateNumberOfMessages, ApproximateNumberOfMessagesNotVisible)`.
    pub fn queue_counts(&self, queue: &str) -> (u64, u64) {
        lock(&self.shared.queues)
            .by_name
            .get(queue)
            .map_or((0, 0), |q| q.counts(Instant::now()))
    }
}

impl Drop for FakeAws {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn handle(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if let Some(op) = target.strip_prefix(SQS_PREFIX)
        && let Some(op) = SqsOp::from_name(op)
    {
        bump(&shared.counters.sqs[op as usize]);
        return match parse_body(&body) {
            Some(input) => sqs(&shared, op, &input).await,
            None => not_json(SQS_JSON),
        };
    }
    if let Some(op) = target.strip_prefix(COGNITO_PREFIX)
        && matches!(op, "ForgotPassword" | "AdminUserGlobalSignOut")
    {
        let Some(input) = parse_body(&body) else {
            return not_json(COGNITO_JSON);
        };
        return if op == "ForgotPassword" {
            forgot_password(&shared, &input).await
        } else {
            admin_user_global_sign_out(&shared, &input).await
        };
    }
    bump(&shared.counters.unknown_operations);
    let content_type = if target.starts_with(COGNITO_PREFIX) {
        COGNITO_JSON
    } else {
        SQS_JSON
    };
    reply(
        StatusCode::BAD_REQUEST,
        content_type,
        &json!({"__type": "UnknownOperationException", "message": format!("unknown operation {target:?}")}),
        &[("x-amzn-errortype", "UnknownOperationException")],
    )
}

fn parse_body(body: &[u8]) -> Option<Value> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .filter(Value::is_object)
}

fn not_json(content_type: &'static str) -> Response {
    reply(
        StatusCode::BAD_REQUEST,
        content_type,
        &json!({"__type": "SerializationException", "message": "body is not a JSON object"}),
        &[("x-amzn-errortype", "SerializationException")],
    )
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: &Value,
    extra: &[(&'static str, &str)],
) -> Response {
    let mut resp = (status, serde_json::to_vec(body).unwrap_or_default()).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    let request_id = format!(
        "{:08x}-0000-4000-8000-{:012x}",
        fastrand::u32(..),
        fastrand::u64(..) & 0xffff_ffff_ffff
    );
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        h.insert("x-amzn-requestid", v);
    }
    for (name, value) in extra {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(*name, v);
        }
    }
    resp
}

// ---------------------------------------------------------------------------
// SQS
// ---------------------------------------------------------------------------

fn sqs_ok(body: &Value) -> Response {
    reply(StatusCode::OK, SQS_JSON, body, &[])
}

/// An SQS JSON-protocol error: `__type` with the Smithy shape ID, and the
/// query-compatible code in `x-amzn-query-error`.
fn sqs_error(shape: &str, query_code: &str, message: &str) -> Response {
    reply(
        StatusCode::BAD_REQUEST,
        SQS_JSON,
        &json!({"__type": format!("com.amazonaws.sqs#{shape}"), "message": message}),
        &[("x-amzn-query-error", &format!("{query_code};Sender"))],
    )
}

fn invalid_parameter(message: &str) -> Response {
    sqs_error(
        "InvalidParameterValueException",
        "InvalidParameterValue",
        message,
    )
}

fn str_field<'a>(input: &'a Value, name: &str) -> Option<&'a str> {
    input.get(name).and_then(Value::as_str)
}

fn int_field(input: &Value, name: &str) -> Option<i64> {
    input.get(name).and_then(Value::as_i64)
}

async fn sqs(shared: &Shared, op: SqsOp, input: &Value) -> Response {
    let Some(queue_url) = str_field(input, "QueueUrl") else {
        return sqs_error(
            "MissingParameter",
            "MissingParameter",
            "QueueUrl is required",
        );
    };
    let name = queue_url.rsplit('/').next().unwrap_or_default().to_owned();
    if !lock(&shared.queues).by_name.contains_key(&name) {
        return sqs_error(
            "QueueDoesNotExist",
            "AWS.SimpleQueueService.NonExistentQueue",
            "The specified queue does not exist.",
        );
    }
    match op {
        SqsOp::GetQueueAttributes => get_queue_attributes(shared, &name, input),
        SqsOp::ReceiveMessage => receive_message(shared, &name, input).await,
        SqsOp::DeleteMessage => {
            let Some(receipt) = str_field(input, "ReceiptHandle") else {
                return invalid_parameter("ReceiptHandle is required");
            };
            if delete_one(shared, &name, receipt) {
                sqs_ok(&json!({}))
            } else {
                receipt_invalid()
            }
        }
        SqsOp::DeleteMessageBatch => delete_message_batch(shared, &name, input),
        SqsOp::ChangeMessageVisibility => change_visibility(shared, &name, input),
        SqsOp::SendMessage => {
            let Some(body) = str_field(input, "MessageBody") else {
                return invalid_parameter("MessageBody is required");
            };
            let attrs = input.get("MessageAttributes").cloned();
            let sent = shared.send(&name, vec![(body.to_owned(), attrs)]);
            let (id, md5) = &sent[0];
            sqs_ok(&json!({"MessageId": id, "MD5OfMessageBody": md5}))
        }
        SqsOp::SendMessageBatch => send_message_batch(shared, &name, input),
    }
}

/// A batch request's `Entries`, or the error SQS answers for them.
fn batch_entries(input: &Value) -> Result<&Vec<Value>, [&'static str; 3]> {
    let entries = input
        .get("Entries")
        .and_then(Value::as_array)
        .filter(|e| !e.is_empty())
        .ok_or([
            "EmptyBatchRequest",
            "AWS.SimpleQueueService.EmptyBatchRequest",
            "There should be at least one entry in the request.",
        ])?;
    if entries.len() > MAX_BATCH {
        return Err([
            "TooManyEntriesInBatchRequest",
            "AWS.SimpleQueueService.TooManyEntriesInBatchRequest",
            "Maximum number of entries per request are 10.",
        ]);
    }
    let ids: HashSet<&str> = entries.iter().filter_map(|e| str_field(e, "Id")).collect();
    if ids.len() != entries.len() {
        return Err([
            "BatchEntryIdsNotDistinct",
            "AWS.SimpleQueueService.BatchEntryIdsNotDistinct",
            "Entry Ids must be present and distinct.",
        ]);
    }
    Ok(entries)
}

fn receipt_invalid() -> Response {
    sqs_error(
        "ReceiptHandleIsInvalid",
        "ReceiptHandleIsInvalid",
        "The input receipt handle is invalid.",
    )
}

fn get_queue_attributes(shared: &Shared, name: &str, input: &Value) -> Response {
    let wanted: Vec<&str> = input
        .get("AttributeNames")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let (visible, in_flight) = lock(&shared.queues)
        .by_name
        .get(name)
        .map_or((0, 0), |q| q.counts(Instant::now()));
    let mut attrs = Map::new();
    let mut put = |k: &str, v: String| {
        attrs.insert(k.to_owned(), Value::String(v));
    };
    put("QueueArn", Shared::queue_arn(name));
    put(
        "VisibilityTimeout",
        shared.config.default_visibility.as_secs().to_string(),
    );
    put("ApproximateNumberOfMessages", visible.to_string());
    put(
        "ApproximateNumberOfMessagesNotVisible",
        in_flight.to_string(),
    );
    put("ApproximateNumberOfMessagesDelayed", "0".into());
    put("DelaySeconds", "0".into());
    put("ReceiveMessageWaitTimeSeconds", "0".into());
    put("MessageRetentionPeriod", "345600".into());
    put("MaximumMessageSize", "262144".into());
    if name == MAIN_QUEUE {
        put(
            "RedrivePolicy",
            json!({
                "deadLetterTargetArn": Shared::queue_arn(DEAD_LETTER_QUEUE),
                "maxReceiveCount": shared.config.max_receive_count,
            })
            .to_string(),
        );
    }
    if !wanted.is_empty() && !wanted.contains(&"All") {
        attrs.retain(|k, _| wanted.contains(&k.as_str()));
    }
    sqs_ok(&json!({ "Attributes": attrs }))
}

/// One received message, ready to serialize.
struct Delivery {
    message_id: String,
    receipt: String,
    body: String,
    md5: String,
    receive_count: u32,
    sent_ms: u64,
    first_receive_ms: u64,
    attributes: Option<Value>,
}

/// Takes up to `max` visible messages of `name`. Messages past the redrive
/// limit move to the dead-letter queue instead.
fn take_visible(shared: &Shared, name: &str, max: usize, visibility: Duration) -> Vec<Delivery> {
    let now = Instant::now();
    let mut queues = lock(&shared.queues);
    let mut out = Vec::new();
    let mut redriven = Vec::new();
    // Re-scheduled after the loop, so a 0 s visibility cannot hand the same
    // message out twice in one receive.
    let mut taken = Vec::new();
    let Some(q) = queues.by_name.get_mut(name) else {
        return out;
    };
    while out.len() < max {
        let Some(key) = q.pop_visible(now) else { break };
        let Some(msg) = q.msgs.get_mut(&key) else {
            continue;
        };
        if name == MAIN_QUEUE && msg.receive_count >= shared.config.max_receive_count {
            if let Some(mut m) = q.msgs.remove(&key) {
                m.receive_count = 0;
                m.receipt = None;
                m.visible_at = now;
                redriven.push((key, m));
            }
            continue;
        }
        msg.receive_count += 1;
        let receipt = format!("{key}.{}.{:016x}", msg.receive_count, fastrand::u64(..));
        msg.receipt = Some(receipt.clone());
        msg.visible_at = now + visibility;
        let first_receive_ms = *msg.first_receive_ms.get_or_insert_with(now_ms);
        out.push(Delivery {
            message_id: msg.message_id.clone(),
            receipt,
            body: msg.body.clone(),
            md5: msg.md5.clone(),
            receive_count: msg.receive_count,
            sent_ms: msg.sent_ms,
            first_receive_ms,
            attributes: msg.attributes.clone(),
        });
        taken.push(key);
    }
    for key in taken {
        q.schedule.insert((now + visibility, key));
    }
    if !redriven.is_empty()
        && let Some(dlq) = queues.by_name.get_mut(DEAD_LETTER_QUEUE)
    {
        for (key, m) in redriven {
            bump(&shared.counters.redriven);
            dlq.push(key, m);
        }
    }
    out
}

fn next_visible(shared: &Shared, name: &str) -> Option<Instant> {
    lock(&shared.queues)
        .by_name
        .get(name)
        .and_then(Queue::next_visible)
}

async fn receive_message(shared: &Shared, name: &str, input: &Value) -> Response {
    let max = int_field(input, "MaxNumberOfMessages").unwrap_or(1);
    if !(1..=MAX_BATCH as i64).contains(&max) {
        return invalid_parameter("MaxNumberOfMessages must be between 1 and 10");
    }
    let wait = int_field(input, "WaitTimeSeconds").unwrap_or(0);
    if !(0..=MAX_WAIT_SECONDS as i64).contains(&wait) {
        return invalid_parameter("WaitTimeSeconds must be between 0 and 20");
    }
    let visibility = match int_field(input, "VisibilityTimeout") {
        Some(v) if (0..=43_200).contains(&v) => Duration::from_secs(v as u64),
        Some(_) => return invalid_parameter("VisibilityTimeout must be between 0 and 43200"),
        None => shared.config.default_visibility,
    };
    let deadline = Instant::now() + Duration::from_secs(wait as u64);
    let messages = loop {
        // Registered before looking, so a send in between is not missed.
        let mut arrival = pin!(shared.arrivals.notified());
        arrival.as_mut().enable();
        let got = take_visible(shared, name, max as usize, visibility);
        let now = Instant::now();
        if !got.is_empty() || now >= deadline {
            break got;
        }
        // Also wake when an in-flight message's visibility runs out.
        let wake = next_visible(shared, name).map_or(deadline, |t| t.min(deadline));
        tokio::select! {
            _ = arrival => {}
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    };
    let c = &shared.counters;
    if messages.is_empty() {
        bump(&c.empty_receives);
        return sqs_ok(&json!({}));
    }
    c.messages_received
        .fetch_add(messages.len() as u64, Ordering::Relaxed);

    let requested: Vec<&str> = ["AttributeNames", "MessageSystemAttributeNames"]
        .iter()
        .filter_map(|k| input.get(*k).and_then(Value::as_array))
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let all = requested.contains(&"All");
    let want_attrs = input
        .get("MessageAttributeNames")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty());
    let list: Vec<Value> = messages
        .into_iter()
        .map(|m| {
            if m.receive_count > 1 {
                bump(&c.redeliveries);
            }
            let mut sys = Map::new();
            let mut put = |k: &str, v: String| {
                if all || requested.contains(&k) {
                    sys.insert(k.to_owned(), Value::String(v));
                }
            };
            put("ApproximateReceiveCount", m.receive_count.to_string());
            put("SentTimestamp", m.sent_ms.to_string());
            put(
                "ApproximateFirstReceiveTimestamp",
                m.first_receive_ms.to_string(),
            );
            put("SenderId", "AIDAFAKEFAKEFAKEFAKE".into());
            let mut obj = Map::new();
            obj.insert("MessageId".into(), m.message_id.into());
            obj.insert("ReceiptHandle".into(), m.receipt.into());
            obj.insert("MD5OfBody".into(), m.md5.into());
            obj.insert("Body".into(), m.body.into());
            if !sys.is_empty() {
                obj.insert("Attributes".into(), Value::Object(sys));
            }
            if want_attrs && let Some(attrs) = m.attributes {
                obj.insert("MessageAttributes".into(), attrs);
            }
            Value::Object(obj)
        })
        .collect();
    sqs_ok(&json!({ "Messages": list }))
}

/// Deletes the message `receipt` names, if it is its latest receipt handle.
/// An outdated handle "succeeds" without deleting, as SQS does; an unknown
/// one (already deleted) succeeds too. False: not a receipt handle at all.
fn delete_one(shared: &Shared, name: &str, receipt: &str) -> bool {
    let Some(key) = receipt_key(receipt) else {
        return false;
    };
    let mut queues = lock(&shared.queues);
    let Some(q) = queues.by_name.get_mut(name) else {
        return true;
    };
    match q.msgs.get(&key) {
        Some(m) if m.receipt.as_deref() == Some(receipt) => {
            q.remove(key);
            bump(&shared.counters.messages_deleted);
        }
        Some(_) => bump(&shared.counters.stale_deletes),
        None => {}
    }
    true
}

fn delete_message_batch(shared: &Shared, name: &str, input: &Value) -> Response {
    let entries = match batch_entries(input) {
        Ok(e) => e,
        Err([shape, code, message]) => return sqs_error(shape, code, message),
    };
    let mut successful = Vec::new();
    let mut failed = Vec::new();
    for entry in entries {
        let id = str_field(entry, "Id").unwrap_or_default();
        let fraction = shared.config.delete_failure_fraction;
        if fraction > 0.0 && fastrand::f64() < fraction {
            bump(&shared.counters.injected_delete_failures);
            failed.push(json!({"Id": id, "SenderFault": false, "Code": "InternalError", "Message": "injected failure"}));
            continue;
        }
        let deleted = str_field(entry, "ReceiptHandle")
            .is_some_and(|receipt| delete_one(shared, name, receipt));
        if deleted {
            successful.push(json!({ "Id": id }));
        } else {
            failed.push(json!({"Id": id, "SenderFault": true, "Code": "ReceiptHandleIsInvalid", "Message": "The input receipt handle is invalid."}));
        }
    }
    sqs_ok(&json!({"Successful": successful, "Failed": failed}))
}

fn change_visibility(shared: &Shared, name: &str, input: &Value) -> Response {
    let (Some(receipt), Some(vt)) = (
        str_field(input, "ReceiptHandle"),
        int_field(input, "VisibilityTimeout"),
    ) else {
        return invalid_parameter("ReceiptHandle and VisibilityTimeout are required");
    };
    if !(0..=43_200).contains(&vt) {
        return invalid_parameter("VisibilityTimeout must be between 0 and 43200");
    }
    let invalid = receipt_invalid;
    let Some(key) = receipt_key(receipt) else {
        return invalid();
    };
    let now = Instant::now();
    {
        let mut queues = lock(&shared.queues);
        let Some(q) = queues.by_name.get_mut(name) else {
            return invalid();
        };
        match q.msgs.get(&key) {
            Some(m) if m.receipt.as_deref() == Some(receipt) => {
                if m.visible_at <= now {
                    return sqs_error(
                        "MessageNotInflight",
                        "AWS.SimpleQueueService.MessageNotInflight",
                        "The message referred to isn't in flight.",
                    );
                }
                q.set_visible_at(key, now + Duration::from_secs(vt as u64));
            }
            _ => return invalid(),
        }
    }
    if vt == 0 {
        shared.arrivals.notify_waiters();
    }
    sqs_ok(&json!({}))
}

fn send_message_batch(shared: &Shared, name: &str, input: &Value) -> Response {
    let entries = match batch_entries(input) {
        Ok(e) => e,
        Err([shape, code, message]) => return sqs_error(shape, code, message),
    };
    let mut ok_ids = Vec::new();
    let mut bodies = Vec::new();
    let mut failed = Vec::new();
    for entry in entries {
        let id = str_field(entry, "Id").unwrap_or_default();
        match str_field(entry, "MessageBody") {
            Some(body) => {
                ok_ids.push(id);
                bodies.push((body.to_owned(), entry.get("MessageAttributes").cloned()));
            }
            None => failed.push(json!({"Id": id, "SenderFault": true, "Code": "MissingParameter", "Message": "MessageBody is required"})),
        }
    }
    let sent = if bodies.is_empty() {
        Vec::new()
    } else {
        shared.send(name, bodies)
    };
    let successful: Vec<Value> = ok_ids
        .into_iter()
        .zip(sent)
        .map(|(id, (message_id, md5))| {
            json!({"Id": id, "MessageId": message_id, "MD5OfMessageBody": md5})
        })
        .collect();
    sqs_ok(&json!({"Successful": successful, "Failed": failed}))
}

// ---------------------------------------------------------------------------
// Cognito
// ---------------------------------------------------------------------------

fn cognito_error(code: &str, message: &str) -> Response {
    reply(
        StatusCode::BAD_REQUEST,
        COGNITO_JSON,
        &json!({"__type": code, "message": message}),
        &[("x-amzn-errortype", code)],
    )
}

async fn forgot_password(shared: &Shared, input: &Value) -> Response {
    let arrival = Instant::now();
    let (Some(client_id), Some(username)) = (
        str_field(input, "ClientId").filter(|s| !s.is_empty()),
        str_field(input, "Username").filter(|s| !s.is_empty()),
    ) else {
        bump(&shared.counters.cognito_rejected);
        return cognito_error(
            "InvalidParameterException",
            "ClientId and Username are required",
        );
    };
    let accepted = {
        let mut c = lock(&shared.cognito);
        let ok = c.admit(shared.config.throttle, arrival);
        if ok {
            c.accepted_at.push(arrival);
            c.accepted_users.push(username.to_owned());
            c.accepted_calls.push(AcceptedCall {
                username: username.to_owned(),
                client_id: client_id.to_owned(),
                secret_hash: str_field(input, "SecretHash").map(str::to_owned),
            });
        } else {
            c.throttled_at.push(arrival);
        }
        ok
    };
    if !accepted {
        bump(&shared.counters.throttled);
    }
    if !shared.config.cognito_latency.is_zero() {
        tokio::time::sleep(shared.config.cognito_latency).await;
    }
    shared
        .counters
        .cognito_busy_nanos
        .fetch_add(arrival.elapsed().as_nanos() as u64, Ordering::Relaxed);
    if accepted {
        reply(
            StatusCode::OK,
            COGNITO_JSON,
            &json!({"CodeDeliveryDetails": {
                "DeliveryMedium": "EMAIL",
                "AttributeName": "email",
                "Destination": "x***@e***",
            }}),
            &[],
        )
    } else {
        cognito_error("TooManyRequestsException", "Rate exceeded")
    }
}

/// `AdminUserGlobalSignOut`: the same latency and token bucket as
/// ForgotPassword; success is an empty object, as Cognito answers.
async fn admin_user_global_sign_out(shared: &Shared, input: &Value) -> Response {
    let arrival = Instant::now();
    let (Some(_pool), Some(username)) = (
        str_field(input, "UserPoolId").filter(|s| !s.is_empty()),
        str_field(input, "Username").filter(|s| !s.is_empty()),
    ) else {
        bump(&shared.counters.cognito_rejected);
        return cognito_error(
            "InvalidParameterException",
            "UserPoolId and Username are required",
        );
    };
    let accepted = {
        let mut c = lock(&shared.cognito);
        let ok = c.admit(shared.config.throttle, arrival);
        if ok {
            c.sign_outs_at.push(arrival);
            c.sign_out_users.push(username.to_owned());
        } else {
            c.sign_outs_throttled_at.push(arrival);
        }
        ok
    };
    if !accepted {
        bump(&shared.counters.sign_outs_throttled);
    }
    if !shared.config.cognito_latency.is_zero() {
        tokio::time::sleep(shared.config.cognito_latency).await;
    }
    if accepted {
        reply(StatusCode::OK, COGNITO_JSON, &json!({}), &[])
    } else {
        cognito_error("TooManyRequestsException", "Rate exceeded")
    }
}

/// Lower-case hex MD5 digest of `data` (for MD5OfBody / MD5OfMessageBody).
pub fn md5_hex(data: &[u8]) -> String {
    use md5::{Digest, Md5};
    format!("{:x}", Md5::digest(data))
}

// ---------------------------------------------------------------------------
// Running the worker binary against the fake
// ---------------------------------------------------------------------------

/// How a [`run_worker`] run ended and what it cost.
#[derive(Debug)]
pub struct WorkerRun {
    /// Exit code; `None` if a signal ended it (e.g. killed at the timeout).
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub wall: Duration,
    /// User + system CPU time of the worker process, read from
    /// `/proc/PID/stat` of the exited (not yet reaped) process.
    pub cpu: Duration,
    /// Peak resident set (`VmHWM`), sampled while it ran, in KiB.
    pub peak_rss_kib: u64,
    /// Everything it wrote to stdout and stderr.
    pub log: String,
}

impl WorkerRun {
    /// A numeric field of the worker's final `"worker stopped"` log line
    /// (`sent`, `skipped`, `rejected`, `deferred`, `released`).
    pub fn summary_field(&self, field: &str) -> Option<u64> {
        self.log
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .rfind(|v| v.get("message").and_then(Value::as_str) == Some("worker stopped"))
            .and_then(|v| v.get(field).and_then(Value::as_u64))
    }
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// `(state, utime + stime in ticks)` from a `/proc/.../stat` file.
fn proc_stat(path: &str) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name may hold spaces; fields restart after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let state = fields.first()?.chars().next()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((state, utime + stime))
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Runs `reset-worker run ARGS...` against `fake` until it exits or
/// `timeout` passes (then it is killed), measuring CPU and peak RSS.
///
/// Env: both AWS endpoints = the fake, region us-east-1, credentials
/// test/test, no IMDS, no shared config files; `RESET_WORKER_SQS__QUEUE_URL`
/// = the fake's job queue, `RESET_WORKER_COGNITO__CLIENT_ID=bench`, metrics on
/// a free loopback port, 1 s long polls, JSON logs at `info`, a fresh SQLite
/// ledger in the run's temp dir. `env` adds to
/// or overrides these, and `FAKE_AWS_WORKER_ENV` (`K=V,K=V`) to all that;
/// inherited `RESET_WORKER_*` and `AWS_*` variables are removed.
pub fn run_worker(
    fake: &FakeAws,
    env: &[(&str, &str)],
    args: &[&str],
    timeout: Duration,
) -> WorkerRun {
    let log_dir = tempfile::Builder::new()
        .prefix("reset-worker-fake.")
        .tempdir()
        .expect("temp dir for worker log");
    let log_path: PathBuf = log_dir.path().join("worker.log");
    let log = File::create(&log_path).expect("worker log file");

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reset-worker"));
    cmd.arg("run").args(args);
    for (key, _) in std::env::vars_os() {
        if let Some(key) = key.to_str()
            && (key.starts_with("RESET_WORKER_") || key.starts_with("AWS_"))
        {
            cmd.env_remove(key);
        }
    }
    let url = fake.url();
    let queue_url = fake.queue_url();
    let metrics = format!("127.0.0.1:{}", super::free_port());
    let ledger = log_dir.path().join("ledger.sqlite3");
    let ledger = ledger.to_string_lossy();
    let defaults: [(&str, &str); 14] = [
        ("AWS_ENDPOINT_URL_SQS", &url),
        ("AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER", &url),
        ("AWS_REGION", REGION),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/dev/null"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
        ("RESET_WORKER_SQS__QUEUE_URL", &queue_url),
        ("RESET_WORKER_COGNITO__CLIENT_ID", "bench"),
        ("RESET_WORKER_METRICS__LISTEN", &metrics),
        ("RESET_WORKER_SQS__WAIT_TIME_SECONDS", "1"),
        ("RESET_WORKER_LOG_FORMAT", "json"),
        ("RESET_WORKER_LEDGER__PATH", &ledger),
    ];
    cmd.env("RUST_LOG", "info");
    for (k, v) in defaults.iter().chain(env) {
        cmd.env(k, v);
    }
    // Experiments: `FAKE_AWS_WORKER_ENV="KEY=VALUE,KEY=VALUE"` adds to (and
    // wins over) all of the above.
    if let Ok(extra) = std::env::var("FAKE_AWS_WORKER_ENV") {
        for pair in extra.split(',').filter(|p| !p.trim().is_empty()) {
            if let Some((k, v)) = pair.split_once('=') {
                cmd.env(k.trim(), v.trim());
            }
        }
    }
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup worker log"))
        .stderr(log)
        .spawn()
        .expect("spawn reset-worker");
    let pid = child.id();
    let ticks = clock_ticks_per_second();
    let mut peak_rss_kib = 0;
    let mut cpu_ticks = 0;
    let mut timed_out = false;
    // Poll without reaping: an exited child stays a zombie, whose stat still
    // holds its final CPU times, until `wait` below.
    while let Some((state, t)) = proc_stat(&format!("/proc/{pid}/stat")) {
        cpu_ticks = t;
        if state == 'Z' || state == 'X' {
            break;
        }
        if let Some(hwm) = vm_hwm_kib(pid) {
            peak_rss_kib = peak_rss_kib.max(hwm);
        }
        if started.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            std::thread::sleep(Duration::from_millis(50));
            if let Some((_, t)) = proc_stat(&format!("/proc/{pid}/stat")) {
                cpu_ticks = t;
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = child.wait().expect("wait for reset-worker");
    let wall = started.elapsed();
    WorkerRun {
        exit_code: status.code(),
        timed_out,
        wall,
        cpu: Duration::from_secs_f64(cpu_ticks as f64 / ticks),
        peak_rss_kib,
        log: std::fs::read_to_string(&log_path).unwrap_or_default(),
    }
}
