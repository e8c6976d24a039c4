//! Registry lookups, single-threaded and on two threads at once.
//!
//! The registry holds six providers, as a build with every provider would: the
//! built-in `local` plus five doubles (`tests/common/mod.rs`) under the other
//! provider names, registered at link time. It is benched in two shapes:
//! `static` (nothing in the overlay: the production shape) and `overlay` (the
//! same, plus one run-time registration, so every read goes through the merged
//! table: the shape of a test that registers doubles).
//!
//! What each operation includes:
//!
//! - `is_registered`: one lookup of `"pipecat"`.
//! - `create`: `create("pipecat", config)` with a valid s2s config: lookup,
//!   [`Config::validate`], the provider's `validate_config` (the double's is a
//!   no-op returning `Ok`), its `create_backend`, which allocates one
//!   zero-size backend in an `Arc` (a 16-byte allocation), and dropping that
//!   backend again (the free). Polled once with a no-op waker; no executor.
//! - `create_premade`: the same on `"vocode"`, whose double hands out a clone
//!   of a backend made beforehand (one per thread) instead of allocating: the
//!   registry's own cost (lookup, validation, dispatch) plus one uncontended
//!   reference-count increment and decrement. (`"vocode"` and `"pipecat"`,
//!   6 and 7 bytes, take the same lookup path.)
//! - `create_unknown`: `create("pipecatt", config)`: a lookup that misses and
//!   the `ProviderNotFound` error, whose message lists the available names
//!   (one allocation), then dropping the error.
//! - `list_providers`: the sorted names as a new `Vec` (one allocation), dropped.
//! - `get_provider`: lookup of `"pipecat"` and a clone of the provider's `Arc`
//!   (a shared reference count: the two-thread case contends on it).
//!
//! Four controls, `registry/control/*`, touch no registry: `compute` (a
//! chain of multiplies on a register, about as long as `create`), `alloc`
//! (the allocation and free `create`'s double makes), `premade` (the
//! clone and drop of a thread's premade backend that `create_premade`'s
//! double makes: the least a `create` that returns an `Arc` can cost) and
//! `shared_arc` (the clone and drop of one `Arc` that every thread shares:
//! what `get_provider` adds to a lookup, contended on two threads). Work that shares
//! nothing should scale perfectly; how far these fall short on two threads
//! is the machine's own limit (two virtual CPUs that may share a core),
//! which the registry's two-thread figures are to be read against.
//!
//! For the two-thread cases each thread runs the whole iteration count at the
//! same time as the other; the time reported is wall time per iteration, so
//! perfect scaling reports the same time as the single-thread case (twice the
//! throughput), and full serialisation reports twice that time. `1_spawned`
//! is the same harness with one thread (spawned, joined, the operation called
//! the same way), the like-for-like baseline for `2_threads`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, criterion_group, criterion_main};
use voice_backends::{BackendRegistry, Config};

const NAMES: [&str; 6] = ["cartesia", "livekit", "local", "pipecat", "vapi", "vocode"];

// `local` is the built-in provider; the other five names get doubles.
fn cartesia() -> common::DoubleProvider {
    common::DoubleProvider::light_value("cartesia")
}
fn livekit() -> common::DoubleProvider {
    common::DoubleProvider::light_value("livekit")
}
fn pipecat() -> common::DoubleProvider {
    common::DoubleProvider::light_value("pipecat")
}
fn vapi() -> common::DoubleProvider {
    common::DoubleProvider::light_value("vapi")
}
fn vocode() -> common::DoubleProvider {
    common::DoubleProvider::premade_value("vocode")
}
voice_backends::register_provider!("cartesia", cartesia);
voice_backends::register_provider!("livekit", livekit);
voice_backends::register_provider!("pipecat", pipecat);
voice_backends::register_provider!("vapi", vapi);
voice_backends::register_provider!("vocode", vocode);

fn registries() -> [(&'static str, Arc<BackendRegistry>); 2] {
    let statics = BackendRegistry::new();
    assert_eq!(statics.list_providers(), NAMES);
    assert!(statics.duplicates().is_empty());
    let overlay = BackendRegistry::new();
    overlay.register("double", common::DoubleProvider::light("double"));
    [
        ("static", Arc::new(statics)),
        ("overlay", Arc::new(overlay)),
    ]
}

/// Polls a future that completes without waiting (the registry's `create`
/// never awaits), so the bench measures the registry, not an executor.
fn ready<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("registry create is expected to complete without waiting"),
    }
}

fn op_is_registered(reg: &BackendRegistry, _: &Config) {
    black_box(reg.is_registered(black_box("pipecat")));
}

fn op_create(reg: &BackendRegistry, config: &Config) {
    black_box(ready(reg.create(black_box("pipecat"), config)).unwrap());
}

fn op_create_premade(reg: &BackendRegistry, config: &Config) {
    black_box(ready(reg.create(black_box("vocode"), config)).unwrap());
}

fn op_create_unknown(reg: &BackendRegistry, config: &Config) {
    let result = ready(reg.create(black_box("pipecatt"), config));
    assert!(result.is_err());
    black_box(result.err());
}

fn op_list_providers(reg: &BackendRegistry, _: &Config) {
    black_box(reg.list_providers());
}

fn op_get_provider(reg: &BackendRegistry, _: &Config) {
    black_box(reg.get_provider(black_box("pipecat")).unwrap());
}

/// Wall time for each of `n` threads to run `iters` operations concurrently.
fn threads<F: Op>(
    n: usize,
    reg: &Arc<BackendRegistry>,
    config: &Arc<Config>,
    op: F,
    iters: u64,
) -> Duration {
    let barrier = Arc::new(Barrier::new(n + 1));
    let workers: Vec<_> = (0..n)
        .map(|_| {
            let (reg, config, barrier) = (reg.clone(), config.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                for _ in 0..iters {
                    op(&reg, &config);
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for w in workers {
        w.join().unwrap();
    }
    start.elapsed()
}

/// An operation; each is its own type (a function item), so the loops below
/// call it directly, as a caller of the registry would, not through a pointer.
trait Op: Fn(&BackendRegistry, &Config) + Copy + Send + 'static {}
impl<F: Fn(&BackendRegistry, &Config) + Copy + Send + 'static> Op for F {}

fn bench_op<F: Op>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    reg: &Arc<BackendRegistry>,
    config: &Arc<Config>,
    op: F,
) {
    group.bench_function(format!("{name}/1_thread"), |b| b.iter(|| op(reg, config)));
    group.bench_function(format!("{name}/1_spawned"), |b| {
        b.iter_custom(|iters| threads(1, reg, config, op, iters))
    });
    group.bench_function(format!("{name}/2_threads"), |b| {
        b.iter_custom(|iters| threads(2, reg, config, op, iters))
    });
}

/// Control: 40 dependent multiplies on a register (about as long as
/// `create`), touching no memory at all.
fn control_compute(_: &BackendRegistry, _: &Config) {
    let mut h = black_box(0xcbf2_9ce4_8422_2325_u64);
    for _ in 0..40 {
        h = (h ^ 0x70).wrapping_mul(0x0100_0000_01b3);
    }
    black_box(h);
}

/// Control: the allocation `create` makes (the double's backend in an `Arc`)
/// and its drop, without the registry.
fn control_alloc(_: &BackendRegistry, _: &Config) {
    let backend: Arc<dyn voice_backends::VoiceBackend> = Arc::new(common::LightBackend);
    black_box(backend);
}

/// Control: what `create_premade`'s double does to hand out its backend (a
/// clone of a thread-local `Arc`), and the caller's drop, without the registry.
fn control_premade(_: &BackendRegistry, _: &Config) {
    thread_local! {
        static PREMADE: Arc<dyn voice_backends::VoiceBackend> = Arc::new(common::LightBackend);
    }
    black_box(PREMADE.with(Arc::clone));
}

/// Control: the clone and drop of one `Arc` shared by every thread, as
/// `get_provider` clones the provider's.
fn control_shared_arc(_: &BackendRegistry, _: &Config) {
    static SHARED: std::sync::OnceLock<Arc<common::LightBackend>> = std::sync::OnceLock::new();
    black_box(Arc::clone(
        SHARED.get_or_init(|| Arc::new(common::LightBackend)),
    ));
}

fn bench(c: &mut Criterion) {
    let config = Arc::new(common::valid_config("pipecat"));
    // What two threads get on this machine for work that shares nothing: the
    // scale the registry's two-thread figures are to be read against.
    let mut group = c.benchmark_group("registry/control");
    let unused = Arc::new(BackendRegistry::new());
    bench_op(&mut group, "compute", &unused, &config, control_compute);
    bench_op(&mut group, "alloc", &unused, &config, control_alloc);
    bench_op(&mut group, "premade", &unused, &config, control_premade);
    bench_op(
        &mut group,
        "shared_arc",
        &unused,
        &config,
        control_shared_arc,
    );
    group.finish();
    for (shape, reg) in registries() {
        let mut group = c.benchmark_group(format!("registry/{shape}"));
        let g = &mut group;
        bench_op(g, "is_registered", &reg, &config, op_is_registered);
        bench_op(g, "create", &reg, &config, op_create);
        bench_op(g, "create_premade", &reg, &config, op_create_premade);
        bench_op(g, "create_unknown", &reg, &config, op_create_unknown);
        bench_op(g, "list_providers", &reg, &config, op_list_providers);
        bench_op(g, "get_provider", &reg, &config, op_get_provider);
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
